"""The trainer's evaluation: images of the eval prompts with fixed seeds, their raw rewards, a captioned grid.

Image i uses seed `sampling.seed + i`, like `diffusion-align sample`. Scores are raw (`components` /
`raw_total`): evaluation never updates the reward's running normalisation, so before/after compare.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffusion_align.engine.rollout import generate
from diffusion_align.errors import UserError
from diffusion_align.images import save_grid


@torch.no_grad()
def evaluate(
    policy, reward, eval_reward, prompts, sampling, autocast, grid: Path, progress: bool, diversity=None,
    write: bool = True,
):  # fmt: skip
    """({"reward": mean raw total, "reward/<name>": ..., "extra/<name>": ...}, the grid's path, the same keys
    per-image scores as lists: {key: [score of image i]}).
    `reward` is the training reward (its `components`, `raw_total`, `names`), `eval_reward` extra rewards
    or None, `sampling` a `training_run.EvalSampling`, `autocast` a context-manager factory, `diversity` None
    or a `rewards.diversity.ClipDiversity` (adds "diversity": per-prompt diversity of the images; a video's
    middle frame stands for it). `write`: False computes everything but saves no grid (its path is None)."""
    s, backbone = sampling, policy.backbone
    images, parts = [], []
    backbone.unet.eval()
    for start in tqdm(
        range(0, len(prompts), s.batch_size), desc=f"eval {grid.stem}", leave=False, disable=not progress
    ):
        batch = prompts[start : start + s.batch_size]
        gens = [torch.Generator(backbone.device).manual_seed(s.seed + start + i) for i in range(len(batch))]
        with autocast():
            _, traj = generate(
                backbone, policy.sampler, batch, gens, s.num_steps, s.guidance_scale, s.eta,
                s.negative_prompt, s.size,
            )  # fmt: skip
        images.append(traj.images.float().cpu())
        scores = reward.components(traj.images.float(), batch)
        if eval_reward is not None:
            extra = eval_reward.components(traj.images.float(), batch)
            scores.update({f"extra/{k}": v for k, v in extra.items()})
        parts.append({k: v.cpu() for k, v in scores.items()})
    components = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    total = reward.raw_total({k: components[k] for k in reward.names})
    result = {
        "reward": total.mean().item(),
        **{k if k.startswith("extra/") else f"reward/{k}": v.mean().item() for k, v in components.items()},
    }
    if diversity is not None:
        every = torch.cat(images)
        result["diversity"] = diversity(every[:, every.shape[1] // 2] if every.ndim == 5 else every, prompts)
    bad = [k for k, v in result.items() if not math.isfinite(v)]
    if bad:
        raise UserError(f"non-finite evaluation reward ({bad[0]}) at '{grid.stem}'; check the reward model")
    captions = [f"{p} [{r:.3g}]" for p, r in zip(prompts, total.tolist(), strict=True)]
    per_image = {"reward": total.tolist()}
    per_image.update(
        {k if k.startswith("extra/") else f"reward/{k}": v.tolist() for k, v in components.items()}
    )
    path = save_grid(torch.cat(images), grid, captions=captions) if write else None
    return result, path, per_image
