"""Inference-time search baselines for ReNO, compared at an equal number of reward calls (images scored).

best_of_n: draw N initial noises (seeds seed, seed+1, ...), generate each once, keep the best by weighted
reward. With the same seed and generator settings its first candidate is ReNO's first image, and
N = ReNO's reward calls (its `iterations`) matches the budget.

fk_steering (Singhal et al. 2025, Feynman-Kac steering): K particles denoised together; at resampling steps
the rewards of their decoded x0 predictions give potentials (max / add / diff / rt), and particles are
resampled multinomially (only when ESS < K/2 if adaptive), always at the final step, where the potential is
exp(lambda * r) / product of the potentials already applied. Weights are clamped to [0, 1e10], NaN -> 0.
Reward calls = K x number of resampling steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusion_align.few_step import DDIM_COMPATIBLE, _generators, draw_noise, make_generator
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


def fk_schedule(num_steps: int, frequency: int, window: tuple[int, int]) -> list[int]:
    """Step indices (0 = noisiest) that resample: every `frequency` steps inside [window[0], window[1]], and
    the final step."""
    start, end = window
    return sorted({i for i in range(start, min(end, num_steps - 1) + 1) if (i - start) % frequency == 0}
                  | {num_steps - 1})  # fmt: skip


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
    """FK steering with the backbone's scheduler (DDIM-eta for DDIM-type schedulers); returns the best final
    particle. resample_window: inclusive step-index range (0 = noisiest step)."""
    from diffusers import DDIMScheduler

    if potential not in ("max", "add", "diff", "rt"):
        raise ValueError(f"potential {potential!r}: choose max, add, diff or rt")
    rewards, weights = as_reward_dict(reward, weights)
    own = backbone.scheduler
    ddim = type(own).__name__ in DDIM_COMPATIBLE
    sched = DDIMScheduler.from_config(own.config) if ddim else type(own).from_config(own.config)
    sched.set_timesteps(num_steps, device=backbone.device)
    k = num_particles
    seeds = list(range(seed, seed + k))
    gens = _generators(seeds)
    picker = torch.Generator().manual_seed(seed + 2**31)  # resampling draws, apart from step noise
    embeds = backbone.encode_prompts([prompt], negative_prompt, guidance=guidance_scale > 1, size=size)
    embeds = embeds.repeat_interleave(k)
    x = (draw_noise(backbone, seeds, size) * sched.init_noise_sigma).to(backbone.dtype)
    resample_at = set(fk_schedule(num_steps, resample_frequency, resample_window))
    r_prev = torch.full((k,), -torch.inf) if potential == "max" else torch.zeros(k)
    product = torch.ones(k, dtype=torch.float64)  # potentials applied so far, per lineage
    calls, final = 0, None
    step_kwargs = {"eta": eta} if ddim else {}
    for i, t in enumerate(tqdm(sched.timesteps, desc="fk-steering", disable=not progress)):
        out = backbone.predict(sched.scale_model_input(x, t), t, embeds, guidance_scale)
        x_prev, x0 = sched.step(out, t, x, generator=gens, return_dict=False, **step_kwargs)[:2]
        if i in resample_at:
            images = backbone.decode(x0.to(backbone.dtype))
            r, _ = score(rewards, weights, images, [prompt] * k)
            r = r.float().cpu()
            calls += k
            if i == num_steps - 1:  # undo the earlier potentials: the target is exp(lambda * r) alone
                w = torch.exp(lmbda * r.double()) / product
                final = (r, images.float().cpu())
            elif potential == "diff":
                w = torch.exp(lmbda * (r - r_prev).double())
            else:
                r = {"max": torch.maximum(r, r_prev), "add": r + r_prev, "rt": r}[potential]
                w = torch.exp(lmbda * r.double())
            w = torch.nan_to_num(w, nan=0.0).clamp(0, 1e10)
            ess = w.sum() ** 2 / (w**2).sum().clamp(min=1e-300)
            if w.sum() > 0 and (not adaptive or ess < k / 2 or i == num_steps - 1):
                idx = torch.multinomial(w.float() / w.sum().float(), k, replacement=True, generator=picker)
                x_prev, r, product = x_prev[idx.to(x.device)], r[idx], product[idx] * w[idx]
                if final is not None:
                    final = (final[0][idx], final[1][idx])
            r_prev = r
        x = x_prev
    best = int(final[0].argmax())
    return SearchResult(
        best_image=final[1][best],
        best_noise=None,
        best_reward=float(final[0][best]),
        best_seed=seed,
        rewards=final[0],
        reward_calls=calls,
    )
