"""`diffusion-align reno --model M --prompt P --reward NAME[=WEIGHT] ...`: ReNO initial-noise optimisation.

Writes OUT/best.png (best image by weighted reward), OUT/strip.png (images across iterations, captioned with
their reward), OUT/history.json (per-iteration rewards, regulariser and gradient norm) and
OUT/best_noise.safetensors; with --regenerate-steps also OUT/regenerated.png, with --best-of-n also
OUT/best_of_n.png (the baseline at the same number of reward calls).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

HELP = "Optimise the initial noise of a one/few-step model against differentiable rewards (ReNO)."

_EPILOG = """\
examples:
  diffusion-align reno --model stabilityai/sd-turbo --prompt "a cat in a hat" --reward hpsv2=5 \\
      --reward imagereward=1 --iterations 50 --dtype float16 --out reno_out
  diffusion-align reno --model shapes --steps 2 --guidance 3 --prompt "one large red circle on a white \\
      background" --reward shapes_color_soft --iterations 20 --best-of-n --out reno_shapes
  diffusion-align reno --model shapes --steps 2 --guidance 3 --prompt "two small blue squares on a black \\
      background" --reward clip --reward-arg clip.pretrained=shapes-clip --out reno_clip

Reward weights default to ReNO's (hpsv2 5, imagereward 1, clip 0.01, pickscore 0.05; others 1).
--scheduler auto uses the model's own scheduler (SD-Turbo: Euler ancestral, trailing spacing); DDIM-type
schedulers (SD 1.x/2.x, shapes) go through the project's DDIM rollout with trailing spacing (1 step =
t 999); native keeps the model's shipped spacing. Models not distilled for few steps give blurry images at
1-2 steps. Bundled model names work as reward paths (shapes-clip). A reward given as module:attr imports
and runs that code: a config or flag is code.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EPILOG
    parser.add_argument(
        "--model", required=True, help="built-in name (tiny-sd, shapes), local folder or hub id"
    )
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument(
        "--reward",
        action="append",
        required=True,
        metavar="NAME[=WEIGHT]",
        help="differentiable reward (repeat)",
    )
    parser.add_argument(
        "--reward-arg", action="append", default=[], metavar="NAME.KEY=VALUE", help="reward loader argument"
    )
    parser.add_argument("--iterations", type=int, default=50, help="images generated and scored (default 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1, help="denoising steps of the generator (default 1)")
    parser.add_argument("--guidance", type=float, default=0.0, help="CFG scale; <= 1 disables (default 0)")
    parser.add_argument(
        "--scheduler", default="auto", help="auto, ddim, native, euler_ancestral, euler or lcm (default auto)"
    )
    parser.add_argument("--lr", type=float, default=5.0, help="learning rate (default 5)")
    parser.add_argument(
        "--optimizer", choices=("sgd", "adam"), default="sgd", help="sgd = Nesterov, momentum 0.9"
    )
    parser.add_argument("--grad-clip", type=float, default=0.1, help="gradient-norm clip (default 0.1)")
    parser.add_argument("--reg-weight", type=float, default=0.01, help="noise-norm regulariser weight")
    parser.add_argument(
        "--regenerate-steps", type=int, help="also render the best noise with this many steps"
    )
    parser.add_argument("--regenerate-model", help="model for --regenerate-steps (default: --model)")
    parser.add_argument(
        "--best-of-n", action="store_true", help="also run best-of-N at the same reward calls"
    )
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument(
        "--vae-dtype", choices=("float32", "same"), default="float32", help="keep the VAE in fp32 (default)"
    )
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute denoiser activations"
    )
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)"
    )
    parser.add_argument("--out", default="reno_out", help="output folder (default: reno_out)")


def check_flags(args) -> None:
    """One-line error for a numeric flag out of range, before any model is loaded."""
    from diffusion_align.config.ranges import POSITIVE, Range, at_least, check_range

    for flag, value, allowed in (
        ("--iterations", args.iterations, at_least(1)),
        ("--steps", args.steps, at_least(1)),
        ("--guidance", args.guidance, Range(0)),
        ("--lr", args.lr, POSITIVE),
        ("--grad-clip", args.grad_clip, POSITIVE),
        ("--reg-weight", args.reg_weight, Range(0)),
        ("--regenerate-steps", args.regenerate_steps, at_least(1)),
    ):
        check_range(flag, value, allowed)


def _finite(value):
    """`value` with non-finite floats replaced by None, so the report stays valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def build_reno_reward(specs: list[str], reward_args: list[str], device):
    """--reward/--reward-arg -> one `rewards.Combined`; a bare NAME gets ReNO's default weight."""
    from diffusion_align.commands.score_inputs import parse_reward_args, parse_reward_specs
    from diffusion_align.config.registry import build_reward
    from diffusion_align.config.settings import RewardSettings
    from diffusion_align.methods.reno import RENO_DEFAULT_WEIGHTS

    parsed = parse_reward_specs(specs)
    explicit = {spec.partition("=")[0].strip() for spec in specs if "=" in spec}
    kwargs = parse_reward_args(reward_args, [n for n, _ in parsed])
    settings = [
        RewardSettings(n, w if n in explicit else RENO_DEFAULT_WEIGHTS.get(n, 1.0), args=kwargs[n])
        for n, w in parsed
    ]
    return build_reward(settings, device)


def _load(name: str, args):
    import torch

    from diffusion_align.engine.backbones import load_backbone

    backbone = load_backbone(name, dtype=args.dtype, device=args.device)
    # half-precision VAEs overflow (ReNO upcasts the SDXL/Hyper-SD VAE)
    if args.vae_dtype == "float32" and backbone.vae.dtype != torch.float32:
        backbone.vae.to(torch.float32)
    return backbone


def run(args) -> int:
    import torch
    from safetensors.torch import save_file

    from diffusion_align.config.settings import check_num_steps
    from diffusion_align.images import save_grid, save_images
    from diffusion_align.methods.reno import reno, require_differentiable

    check_flags(args)
    backbone = _load(args.model, args)
    check_num_steps(args.steps, backbone.scheduler, "--steps")
    reward = build_reno_reward(args.reward, args.reward_arg, backbone.device)
    require_differentiable(reward)  # before any generation
    if args.gradient_checkpointing:
        backbone.enable_memory_options(gradient_checkpointing=True)
    regen = _load(args.regenerate_model, args) if args.regenerate_model else None
    if args.regenerate_steps is not None:
        check_num_steps(args.regenerate_steps, (regen or backbone).scheduler, "--regenerate-steps")
    common = dict(
        num_steps=args.steps, guidance_scale=args.guidance, seed=args.seed, scheduler=args.scheduler,
        negative_prompt=args.negative_prompt,
    )  # fmt: skip
    result = reno(
        backbone, reward, args.prompt, iterations=args.iterations, lr=args.lr,
        optimizer=args.optimizer, grad_clip=args.grad_clip, reg_weight=args.reg_weight,
        regenerate_steps=args.regenerate_steps, regenerate_backbone=regen, **common,
    )  # fmt: skip

    out = Path(args.out)
    save_images(result.best_image[None], out, ["best"])
    captions = [f"it {i}: {result.history[i]['reward']:.4g}" for i in result.strip_iterations]
    save_grid(result.strip, out / "strip.png", captions=captions, cols=len(captions))
    save_file({"z": result.best_noise.contiguous().cpu()}, str(out / "best_noise.safetensors"))
    report = {
        "prompt": args.prompt,
        "model": args.model,
        "seed": args.seed,
        "weights": reward.weights,
        "settings": {
            k: getattr(args, k) for k in ("steps", "guidance", "scheduler", "lr", "optimizer", "dtype")
        },
        "reward_calls": result.reward_calls,
        "initial_reward": result.initial_reward,
        "best_reward": result.best_reward,
        "best_iteration": result.best_iteration,
        "history": result.history,
    }
    if result.regenerated is not None:
        save_images(result.regenerated[None], out, ["regenerated"])
        report["regenerated"] = {"steps": args.regenerate_steps, "rewards": result.regenerated_rewards}
    if args.best_of_n:
        from diffusion_align.methods.search import best_of_n

        with torch.no_grad():
            bon = best_of_n(backbone, reward, args.prompt, result.reward_calls, **common)
        save_images(bon.best_image[None], out, ["best_of_n"])
        report["best_of_n"] = {
            "n": bon.reward_calls,
            "best_reward": bon.best_reward,
            "best_seed": bon.best_seed,
        }
    (out / "history.json").write_text(json.dumps(_finite(report), indent=1))  # NaN is not JSON: null
    line = f"reward {result.initial_reward:.4g} -> best {result.best_reward:.4g} (it {result.best_iteration})"
    if args.best_of_n:
        line += f"; best-of-{bon.reward_calls}: {bon.best_reward:.4g}"
    print(f"{line}; wrote best.png, strip.png, history.json to {out}")
    return 0
