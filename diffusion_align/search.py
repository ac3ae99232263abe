"""Inference-time search baselines for ReNO, compared at an equal number of reward calls (images scored).

best_of_n: draw N initial noises (seeds seed, seed+1, ...), generate each once, keep the best by weighted
reward. With the same seed and generator settings its first candidate is ReNO's first image, and
N = ReNO's reward calls (its `iterations`) matches the budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusion_align.few_step import draw_noise, make_generator
from diffusion_align.reno import as_reward_dict, score


@dataclass
class SearchResult:
    """best_image: (3, H, W) in [0, 1]; best_noise: (1, C, h, w) float32; rewards: (N,) weighted totals of
    every candidate in seed order; reward_calls: images scored."""

    best_image: Tensor
    best_noise: Tensor
    best_reward: float
    best_seed: int
    rewards: Tensor
    reward_calls: int


@torch.no_grad()
def best_of_n(
    backbone,
    reward,
    prompt: str,
    n: int,
    weights: Mapping[str, float] | None = None,
    num_steps: int = 1,
    guidance_scale: float = 0.0,
    seed: int = 0,
    scheduler: str = "auto",
    negative_prompt: str | None = None,
    size: tuple[int, int] | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> SearchResult:
    """The best of `n` samples of `backbone` for `prompt` under the weighted `reward` (any reward works)."""
    rewards, weights = as_reward_dict(reward, weights)
    generate = make_generator(backbone, num_steps, guidance_scale, scheduler)
    embeds = backbone.encode_prompts([prompt], negative_prompt, guidance=guidance_scale > 1, size=size)
    totals, best = [], (-float("inf"), None, None, None)
    for start in tqdm(range(0, n, batch_size), desc="best-of-n", disable=not progress):
        seeds = list(range(seed + start, seed + min(n, start + batch_size)))
        z = draw_noise(backbone, seeds, size)
        images = generate(z, embeds.repeat_interleave(len(seeds)), seeds)
        total, _ = score(rewards, weights, images, [prompt] * len(seeds))
        totals.append(total.float().cpu())
        i = int(total.argmax())
        if float(total[i]) > best[0]:
            best = (float(total[i]), images[i].float().cpu(), z[i : i + 1].clone(), seeds[i])
    return SearchResult(
        best_image=best[1],
        best_noise=best[2],
        best_reward=best[0],
        best_seed=best[3],
        rewards=torch.cat(totals),
        reward_calls=n,
    )
