"""Inference-time search baselines for ReNO, compared at an equal number of reward calls (images scored).

best_of_n: draw N initial noises (seeds seed, seed+1, ...), generate each once, keep the best by weighted
reward. With the same seed and generator settings its first candidate is ReNO's first image, and
N = ReNO's reward calls (its `iterations`) matches the budget.

fk_steering (Singhal et al. 2025, Feynman-Kac steering), following the official `fkd_class.py`: K particles
denoised together; at resampling steps the rewards of their decoded x0 predictions give potentials (max /
add / diff / rt) and particles are resampled multinomially, only when ESS < K/2 if adaptive, and at the final
step only when ESS < K/2 whatever `adaptive` says. The final potential is exp(lambda * p) / product of the
potentials already applied, p being the potential's value (max(r, r_prev) for max, r + r_prev for add, r
for rt); diff keeps exp(lambda * (r - r_prev)). Weights are clamped to [0, 1e10], NaN -> 0. The returned
pick is the best by reward of the final particles. Reward calls = K x number of resampling steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusion_align.engine.few_step import NoiseToImage, draw_noise, make_generator, make_sampler
from diffusion_align.methods.reno import reno_reward


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
    reward = reno_reward(reward, weights)
    generate = make_generator(backbone, num_steps, guidance_scale, scheduler, size=size)
    embeds = backbone.encode_prompts([prompt], negative_prompt, guidance=guidance_scale > 1, size=size)
    totals, best = [], (-float("inf"), None, None, None)
    for start in tqdm(range(0, n, batch_size), desc="best-of-n", disable=not progress):
        seeds = list(range(seed + start, seed + min(n, start + batch_size)))
        z = draw_noise(backbone, seeds, size)
        images = generate(z, embeds.repeat_interleave(len(seeds)), seeds)
        total, _ = reward.score(images, [prompt] * len(seeds))
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


def fk_schedule(num_steps: int, frequency: int, window: tuple[int, int]) -> list[int]:
    """Step indices (0 = noisiest) that resample: every `frequency` steps inside [window[0], window[1]], and
    the final step."""
    start, end = window
    return sorted({i for i in range(start, min(end, num_steps - 1) + 1) if (i - start) % frequency == 0}
                  | {num_steps - 1})  # fmt: skip


class FKResampler:
    """FK steering's weighting and resampling of K particles, one call per resampling step (the rule of the
    official `FKD.resample`). Holds the population's potential values and the product of the potentials
    applied so far to each lineage (it grows only when particles are resampled).
    """

    def __init__(self, num_particles: int, lmbda: float, potential: str, adaptive: bool, generator=None):
        if potential not in ("max", "add", "diff", "rt"):
            raise ValueError(f"potential {potential!r}: choose max, add, diff or rt")
        self.k, self.lmbda, self.potential, self.adaptive = num_particles, float(lmbda), potential, adaptive
        self.generator = generator
        # -inf: the first max potential is the reward itself (the official starts from a reward floor that
        # defaults to 0, the same for rewards >= 0)
        start = -torch.inf if potential == "max" else 0.0
        self.population = torch.full((num_particles,), start, dtype=torch.float64)
        self.product = torch.ones(num_particles, dtype=torch.float64)
        self.weights: Tensor | None = None  # the last step's weights (K,), float64

    def __call__(self, r: Tensor, final: bool) -> Tensor | None:
        """r: (K,) rewards of the particles' x0 predictions. Returns the resampled indices (K,), or None
        when the particles are kept."""
        r = r.detach().double().cpu()
        if self.potential == "diff":
            value, w = r, torch.exp(self.lmbda * (r - self.population))
        else:
            value = {"max": torch.maximum(r, self.population), "add": r + self.population, "rt": r}[
                self.potential
            ]
            w = torch.exp(self.lmbda * value)
            if final:  # the target is exp(lambda * value) alone: undo the potentials already applied
                w = w / self.product
        w = torch.nan_to_num(w.clamp(0, 1e10), nan=0.0)
        self.weights = w
        total = w.sum()
        keep = not total > 0  # every weight 0 (NaN rewards): nothing to resample by
        if not keep and (self.adaptive or final):
            keep = bool(1 / ((w / total) ** 2).sum() >= self.k / 2)  # ESS >= K/2
        if keep:
            self.population = value
            return None
        idx = torch.multinomial(w / w.sum(), self.k, replacement=True, generator=self.generator)
        self.population, self.product = value[idx], self.product[idx] * w[idx]
        return idx


@torch.no_grad()
def fk_steering(
    backbone,
    reward,
    prompt: str,
    num_particles: int = 4,
    weights: Mapping[str, float] | None = None,
    num_steps: int = 10,
    guidance_scale: float = 0.0,
    lmbda: float = 10.0,
    potential: str = "max",
    resample_frequency: int = 1,
    resample_window: tuple[int, int] = (0, 10**9),
    adaptive: bool = True,
    eta: float = 1.0,
    seed: int = 0,
    negative_prompt: str | None = None,
    size: tuple[int, int] | None = None,
    progress: bool = True,
) -> SearchResult:
    """FK steering with the backbone's scheduler (DDIM-eta with trailing spacing for DDIM-type schedulers,
    as `few_step.make_sampler`), the particles resampled inside the one loop through its `on_step`; returns
    the best final particle. resample_window: inclusive step-index range (0 = noisiest step)."""
    reward = reno_reward(reward, weights)
    k = num_particles
    # resampling draws come from their own generator, apart from the step noise
    resampler = FKResampler(k, lmbda, potential, adaptive, torch.Generator().manual_seed(seed + 2**31))
    seeds = list(range(seed, seed + k))
    embeds = backbone.encode_prompts([prompt], negative_prompt, guidance=guidance_scale > 1, size=size)
    resample_at = set(fk_schedule(num_steps, resample_frequency, resample_window))
    calls, final = 0, None

    def steer(i: int, t, step) -> Tensor | None:
        """Score the particles' x0 predictions at a resampling step and resample them."""
        nonlocal calls, final
        if i not in resample_at:
            return None
        images = backbone.decode(step.x0.to(backbone.dtype))
        r, _ = reward.score(images, [prompt] * k)
        r, images = r.float().cpu(), images.float().cpu()
        calls += k
        idx = resampler(r, final=i == num_steps - 1)
        prev = step.prev
        if idx is not None:
            prev, r, images = prev[idx.to(prev.device)], r[idx], images[idx]
        final = (r, images)
        return prev

    generate = NoiseToImage(backbone, make_sampler(backbone, "auto", eta, size), num_steps, guidance_scale)
    generate.run(
        draw_noise(backbone, seeds, size),
        embeds.repeat_interleave(k),
        seeds,
        on_step=steer,
        decode=False,
        progress="fk-steering" if progress else False,
    )
    # the final particles' images are their last x0 predictions (scored within the budget), so the pick
    # is the official one, the best final particle by reward
    best = int(final[0].argmax())
    return SearchResult(
        best_image=final[1][best],
        best_noise=None,
        best_reward=float(final[0][best]),
        best_seed=seed,
        rewards=final[0],
        reward_calls=calls,
    )
