"""`diffusion-align sample [CONFIG] [key=value ...]`: generate images with our rollout (optionally a LoRA).

Image i of a run uses seed `--seed + i`, so any image can be regenerated alone, whatever the batch size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diffusion_align.errors import UserError

HELP = "Generate images (and a grid) for prompts given by flags or a config, optionally with a LoRA."

_EPILOG = """\
examples:
  diffusion-align sample --model shapes --prompt "two small red circles on the left on a blue background"
  diffusion-align sample configs/quickstart.yaml --lora runs/quickstart/lora --out runs/quickstart/after
  diffusion-align sample --model stable-diffusion-v1-5/stable-diffusion-v1-5 --prompts prompts.txt \\
      sample.num_steps=30 model.dtype=float16

Prompts come from --prompt (repeatable), else --prompts FILE, else the config's prompts.eval list.
Flags override the config; key=value overrides apply to any config key.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EPILOG
    parser.add_argument(
        "args", nargs="*", metavar="[CONFIG] [key=value]", help="a YAML config and/or overrides"
    )
    parser.add_argument("--model", help="built-in name (tiny-sd, shapes, ...), local folder or hub id")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts", metavar="FILE", help=".txt (one per line) or .jsonl with a 'prompt' key")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--num-steps", type=int, help="DDIM steps (config: sample.num_steps)")
    parser.add_argument(
        "--guidance", type=float, help="classifier-free guidance scale (sample.guidance_scale)"
    )
    parser.add_argument("--eta", type=float, help="DDIM eta (sample.eta); 0 = deterministic")
    parser.add_argument("--seed", type=int, help="seed of the first image (sample.seed)")
    parser.add_argument("--num-per-prompt", type=int, default=1, help="images per prompt (default 1)")
    parser.add_argument("--batch-size", type=int, help="images per denoising call (sample.batch_size)")
    parser.add_argument("--lora", metavar="DIR", help="a LoRA folder saved by `train` (diffusers format)")
    parser.add_argument("--out", default="samples_out", help="output folder (default: samples_out)")


def _config(args):
    from diffusion_align.config import load_config

    files = [a for a in args.args if "=" not in a]
    overrides = [a for a in args.args if "=" in a]
    if len(files) > 1:
        raise UserError(f"expected at most one config file, got {files}; overrides look like key=value")
    flags = {
        "model.pretrained": args.model,
        "sample.num_steps": args.num_steps,
        "sample.guidance_scale": args.guidance,
        "sample.eta": args.eta,
        "sample.seed": args.seed,
        "sample.batch_size": args.batch_size,
        "sample.negative_prompt": args.negative_prompt,
    }
    overrides += [f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]
    return load_config(files[0] if files else {}, overrides)


def _prompts(args, config) -> list[str]:
    if args.prompt:
        prompts = list(args.prompt)
    else:
        from diffusion_align.prompts import load_prompts

        source = args.prompts or config.prompts.eval
        prompts = load_prompts(source)[: None if args.prompts else config.prompts.eval_count]
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise UserError(
            "no prompts to sample: pass --prompt TEXT, --prompts FILE or a config with prompts.eval"
        )
    return prompts


def _load_lora(backbone, directory: str, model: str) -> None:
    """Through diffusers' own loader: the rank comes from the file, and it proves the format. Checked first:
    a LoRA of another base model is a one-line error naming both."""
    from diffusion_align.engine.lora_files import check_lora_fits

    path = Path(directory)
    check_lora_fits(path, backbone.unet, model, prefix=f"{backbone.lora_prefix}.")
    if getattr(backbone, "is_video", False):
        backbone.load_lora(str(path))  # TextToVideoSD's UNet3D has no diffusers LoRA loader
    else:
        backbone.pipe.load_lora_weights(str(path))


def run(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from diffusion_align.commands.score_files import INDEX
    from diffusion_align.config.loading import save_config
    from diffusion_align.config.registry import build_backbone, build_sampler
    from diffusion_align.engine.rollout import generate
    from diffusion_align.images import save_grid, save_images, slug

    if args.num_per_prompt < 1:
        raise UserError(f"--num-per-prompt={args.num_per_prompt} must be at least 1")
    config = _config(args)
    prompts = [p for p in _prompts(args, config) for _ in range(args.num_per_prompt)]
    s = config.sample
    backbone = build_backbone(config.model)
    if args.lora:
        _load_lora(backbone, args.lora, config.model.pretrained)
    sampler = build_sampler(backbone, s)
    if s.num_steps < 10 and backbone.scheduler.config.get("timestep_spacing") == "leading":  # (not flow)
        print(  # leading spacing puts the last of few steps near t=1: the image is mostly noise
            f"diffusion-align sample: warning: {s.num_steps} steps with this model's 'leading' timestep "
            "spacing give noisy images; use 10 or more steps, or `diffusion-align reno` (trailing spacing)",
            file=sys.stderr,
        )
    size = (s.height, s.width) if s.height and s.width else None

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    images, rows = [], []
    for start in tqdm(range(0, len(prompts), s.batch_size), desc="sampling", unit="batch"):
        batch = prompts[start : start + s.batch_size]
        seeds = range(s.seed + start, s.seed + start + len(batch))
        generators = [torch.Generator(backbone.device).manual_seed(seed) for seed in seeds]
        with torch.no_grad():
            _, traj = generate(
                backbone, sampler, batch, generators, s.num_steps, s.guidance_scale, s.eta,
                s.negative_prompt, size,
            )  # fmt: skip
        names = [f"{start + i:04d}_{slug(p)}" for i, p in enumerate(batch)]
        video = getattr(backbone, "is_video", False)  # (B, T, 3, H, W): mp4 + gif, first frame as the image
        if video:
            from diffusion_align.videos import save_videos

            save_videos(traj.images, out / "videos", names)
        frames = traj.images[:, 0] if video else traj.images
        save_images(frames, out / "images", names)
        images.append(frames.cpu())
        rows += [
            {"file": f"images/{n}.png", "prompt": p, "seed": seed}
            | ({"video": f"videos/{n}.mp4", "gif": f"videos/{n}.gif"} if video else {})
            for n, p, seed in zip(names, batch, seeds, strict=True)
        ]
    save_grid(torch.cat(images), out / "grid.png", captions=prompts)
    (out / INDEX).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} images and grid.png to {out}")
    return 0
