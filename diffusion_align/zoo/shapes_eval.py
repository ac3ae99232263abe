"""Measure the shapes models: CLIP retrieval on held-out captions and the generator's prompt adherence.

Adherence is judged by the programmatic detector of `rewards.shapes`; its own accuracy on the real
images of the same scenes (and on their VAE reconstructions) is reported beside it as the ceiling.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffusion_align.zoo import shapes_data as data
from diffusion_align.zoo.shapes_models import CLIP_MEAN, CLIP_STD
from rewards.shapes import BACKGROUNDS, COUNTS, SHAPE_COLORS, SHAPES, Scene, adherence, detect, parse_caption


def _clip_features(clip, tok, images: torch.Tensor | None = None, texts: list[str] | None = None):
    if images is not None:
        mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        feats = clip.get_image_features(pixel_values=(images - mean) / std)
    else:
        feats = clip.get_text_features(**tok(texts, padding=True, return_tensors="pt"))
    return F.normalize(getattr(feats, "pooler_output", feats), dim=-1)


def _swap(scene: Scene, key: str) -> Scene:
    # The next value of `key` in the vocabulary order: a deterministic wrong caption.
    values = {
        "color": list(SHAPE_COLORS),
        "shape": list(SHAPES),
        "count": list(COUNTS),
        "background": list(BACKGROUNDS),
    }
    vals = values[key]
    return Scene(**{**scene.as_dict(), key: vals[(vals.index(getattr(scene, key)) + 1) % len(vals)]})


@torch.no_grad()
def clip_retrieval(clip, tok, split: str, n: int = 500) -> dict:
    """Top-1/top-5 caption retrieval among the distinct captions of `n` images, plus pairwise accuracy
    of the right caption against the same caption with one attribute changed."""
    batch = data.make_split(split, n)
    captions = sorted(set(batch.captions))
    img = _clip_features(clip, tok, images=batch.images)
    txt = _clip_features(clip, tok, texts=captions)
    sim = img @ txt.T  # (n, C)
    target = torch.tensor([captions.index(c) for c in batch.captions])
    rank = (sim > sim[torch.arange(n), target][:, None]).sum(1)
    res = {
        "n_images": n,
        "n_candidate_captions": len(captions),
        "top1": float((rank == 0).float().mean()),
        "top5": float((rank < 5).float().mean()),
        "top1_chance": 1 / len(captions),
        "top5_chance": min(1.0, 5 / len(captions)),
    }
    for key in ("color", "shape", "count", "background"):
        wrong = _clip_features(clip, tok, texts=[_swap(s, key).caption() for s in batch.scenes])
        right = txt[target]
        res[f"pairwise_vs_wrong_{key}"] = float(((img * right).sum(1) > (img * wrong).sum(1)).float().mean())
    res["pairwise_chance"] = 0.5
    return res


def _reference_images(prompts: list[str], seeds: list[int]) -> torch.Tensor:
    # Real images of the prompted scenes, so the detector's ceiling is measured on the same captions.
    imgs = [
        data.render(parse_caption(p), np.random.default_rng([99, s]))
        for p, s in zip(prompts, seeds, strict=True)
    ]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0


@torch.no_grad()
def generate(
    pipe, prompts: list[str], seeds: list[int], guidance: float, steps: int, batch: int = 64, **call_kwargs
):
    """(N, 3, 32, 32) images in [0, 1]; image i uses generator seed `seeds[i]`."""
    out = []
    for i in tqdm(range(0, len(prompts), batch), desc=f"generate cfg={guidance}", leave=False):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch]]
        res = pipe(
            prompts[i : i + batch],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            output_type="pt",
            **call_kwargs,
        )
        out.append(res.images.float().cpu())
    return torch.cat(out)


def grid_png(images: torch.Tensor, captions: list[str], path: Path, cols: int = 8, scale: int = 4) -> None:
    """Save images (N, 3, H, W) in [0, 1] upscaled `scale`x with their wrapped captions underneath."""
    from PIL import Image, ImageDraw, ImageFont

    n, _, h, w = images.shape
    cw, text_h = w * scale, 44
    rows = (n + cols - 1) // cols
    canvas = Image.new("RGB", (cols * (cw + 6), rows * (h * scale + text_h + 6)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    arr = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    for i in range(n):
        x, y = (i % cols) * (cw + 6) + 3, (i // cols) * (h * scale + text_h + 6) + 3
        canvas.paste(Image.fromarray(arr[i]).resize((cw, h * scale), Image.NEAREST), (x, y))
        lines = textwrap.wrap(captions[i], width=cw // 6)
        draw.multiline_text((x, y + h * scale + 2), "\n".join(lines[:4]), fill="black", font=font, spacing=1)
    canvas.save(path)


def evaluate(
    pipeline_dir: str | Path,
    clip_dir: str | Path,
    out_dir: str | Path,
    n_prompts: int = 64,
    steps: int = 50,
) -> dict:
    """Write `metrics.json` and the grids into `out_dir` and return the metrics: CLIP retrieval, then the
    `shapes` pipeline's adherence (DDIM, eta 0)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel, CLIPTokenizer

    clip = CLIPModel.from_pretrained(clip_dir, dtype=torch.float32).eval()
    tok = CLIPTokenizer.from_pretrained(clip_dir)
    metrics: dict = {"clip_retrieval": {s: clip_retrieval(clip, tok, s) for s in ("heldout", "val")}}
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, dtype=torch.float32)
    metrics.update(adherence_report(pipe, out_dir, n_prompts, steps, scheduler="DDIM eta=0"))
    (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def evaluate_flow(
    pipeline_dir: str | Path, out_dir: str | Path, n_prompts: int = 64, steps: int = 40
) -> dict:
    """`metrics.json` and grids of the `shapes-flow` pipeline's adherence (Euler ODE, its T5 length)."""
    from diffusers import StableDiffusion3Pipeline

    from diffusion_align.zoo.shapes_models import FLOW_T5_TOKENS

    pipe = StableDiffusion3Pipeline.from_pretrained(
        pipeline_dir, text_encoder_3=None, tokenizer_3=None, dtype=torch.float32
    )
    metrics = adherence_report(
        pipe, out_dir, n_prompts, steps, "flow Euler ODE", guidances=(1.0, 3.0, 4.5, 7.5),
        max_sequence_length=FLOW_T5_TOKENS,
    )  # fmt: skip
    (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def adherence_report(
    pipe,
    out_dir: str | Path,
    n_prompts: int = 64,
    steps: int = 50,
    scheduler: str = "",
    seeds_per_prompt: int = 2,
    guidances: tuple[float, ...] = (1.0, 3.0, 7.5),
    grid_guidance: float = 3.0,
    **call_kwargs,
) -> dict:
    """The detector's adherence of `pipe`'s images (held-out and seen captions, several guidance scales)
    beside its ceiling on real images and their VAE reconstructions; grids in `out_dir`. `call_kwargs` go to
    every pipeline call."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.set_progress_bar_config(disable=True)
    metrics: dict = {
        "generation": {"steps": steps, "scheduler": scheduler, "seeds_per_prompt": seeds_per_prompt}
    }
    for split, prompts in (
        ("heldout", data.heldout_prompts(n_prompts)),
        ("val", data.make_split("val", n_prompts).captions),  # seen combinations, as sampled
    ):
        ps = [p for p in prompts for _ in range(seeds_per_prompt)]
        seeds = list(range(len(ps)))
        scenes = [parse_caption(p) for p in ps]
        real = _reference_images(ps, seeds)
        with torch.no_grad():
            posterior = pipe.vae.encode(real * 2 - 1).latent_dist.mean
            recon = pipe.vae.decode(posterior).sample.div(2).add(0.5).clamp(0, 1)
        res = {
            "n_prompts": len(prompts),
            "n_images": len(ps),
            "detector_on_real_images": adherence(detect(real), scenes),
            "detector_on_vae_reconstructions": adherence(detect(recon), scenes),
        }
        for g in guidances:
            images = generate(pipe, ps, seeds, g, steps, **call_kwargs)
            res[f"generated_cfg{g:g}"] = adherence(detect(images), scenes)
            if split == "heldout" and g == grid_guidance:
                grid_png(images[::seeds_per_prompt][:48], prompts[:48], out_dir / "heldout_grid.png")
            if split == "val" and g == grid_guidance:
                grid_png(images[::seeds_per_prompt][:24], prompts[:24], out_dir / "val_grid.png")
        metrics[f"adherence_{split}"] = res
    return metrics
