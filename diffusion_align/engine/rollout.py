"""The one denoising loop: the only place that calls the denoiser step after step.

Training, evaluation, `sample`, reward backprop, ReNO, best-of-N and FK steering all run `rollout`; they
differ only in its arguments:
- DDPO / D3PO / PRDP: empty gradient window; the trajectory and its log-probs are stored for re-scoring.
- DRaFT-K / AlignProp: `start` at the cut, from a stored latent, with gradient on every step from there
  (`grad_steps`), optionally checkpointed.
- ReNO: `grad_to_noise=True` keeps the whole chain differentiable back to x_T.
- FK steering: `on_step` sees every step's result and may resample the particles.
Steps outside the window call the denoiser under `no_grad`; the sampler update itself stays
differentiable, so gradient from a later window still reaches earlier latents through the linear path (as
in AlignProp). The sampler (`samplers.Sampler`) owns the step math: DDIM-eta, a diffusers scheduler, or a
flow-matching sampler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as grad_checkpoint
from tqdm.auto import tqdm

from diffusion_align.math.samplers import Step


@dataclass
class Trajectory:
    """One batch of denoising chains.

    latents: (B, S+1, C, h, w) detached, x_T first and x_0 last; log_probs: (B, S) float32 log p(x_prev|x_t)
    under the sampling weights (None when eta == 0); timesteps: (S,); x0: (B, C, h, w) final latent carrying
    the window's gradient; images: (B, 3, H, W) in [0, 1] (None when not decoded).
    """

    latents: Tensor
    log_probs: Tensor | None
    timesteps: Tensor
    x0: Tensor
    images: Tensor | None = None


# on_step(i, t, step) may return a replacement for step.prev (e.g. resampled particles) or None
StepCallback = Callable[[int, Tensor, Step], Tensor | None]


def rollout(
    backbone,
    sampler,
    embeds,
    x_T: Tensor,
    num_steps: int,
    guidance_scale: float,
    eta: float | list[float] | None = None,
    grad_steps: Iterable[int] = (),
    grad_to_noise: bool = False,
    checkpoint: bool = False,
    generator: torch.Generator | list[torch.Generator] | None = None,
    decode: bool = True,
    progress: bool | str = False,
    start: int = 0,
    on_step: StepCallback | None = None,
) -> Trajectory:
    """Denoise x_T (B, C, h, w) conditioned on `embeds` through steps start..num_steps-1 of `sampler`.

    start: the first step index, x_T then being the latent at that step (e.g. a stored one); the returned
    latents hold x_T and the steps run (S - start + 1 of them), log_probs the steps run;
    grad_steps: step indices (0 = noisiest; negatives count from the end) whose denoiser call keeps gradient;
    eta: the sampler's noise level, or one per step (Flow-GRPO-Fast's SDE window: 0 outside it); with a
    per-step list, log_probs has a column per step, 0 where the step drew no noise;
    checkpoint: recompute those calls in backward (activation checkpointing) to save memory;
    generator: the per-step noise source (a list gives one stream per sample, making samples independent of
    batch composition); progress: show a bar (a string names it).
    """
    timesteps = sampler.timesteps(num_steps, device=x_T.device)
    eta = sampler.eta if eta is None else eta
    per_step = isinstance(eta, (list, tuple))
    window = set(range(num_steps)) if grad_to_noise else {i % num_steps for i in grad_steps}
    x_t, latents, log_probs = x_T, [x_T.detach()], []
    desc = progress if isinstance(progress, str) else "denoising"
    steps = tqdm(range(start, num_steps), desc=desc, leave=False, disable=not progress)
    for i in steps:
        t = timesteps[i]
        x_in = sampler.scale_input(x_t, t)
        with torch.set_grad_enabled(i in window):
            if checkpoint and i in window:
                out = grad_checkpoint(backbone.predict, x_in, t, embeds, guidance_scale, use_reentrant=False)
            else:
                out = backbone.predict(x_in, t, embeds, guidance_scale)
        step = sampler.step(out, t, x_t, num_steps, eta[i] if per_step else eta, generator)
        x_t = step.prev
        if on_step is not None and (replaced := on_step(i, t, step)) is not None:
            x_t = replaced
        if step.log_prob is not None:
            log_probs.append(step.log_prob)
        elif per_step:  # a deterministic step of a windowed chain: nothing to score, keep the columns aligned
            log_probs.append(torch.zeros(len(x_t), device=x_t.device))
        latents.append(x_t.detach())
    images = None
    if decode:
        with torch.set_grad_enabled(bool(window) and x_t.requires_grad):
            images = backbone.decode(x_t)
    return Trajectory(
        latents=torch.stack(latents, dim=1),
        log_probs=torch.stack(log_probs, dim=1) if log_probs else None,
        timesteps=timesteps,
        x0=x_t,
        images=images,
    )


def generate(
    backbone,
    sampler,
    prompts: list[str],
    generators: list[torch.Generator],
    num_steps: int,
    guidance_scale: float,
    eta: float | None = None,
    negative_prompt: str | None = None,
    size: tuple[int, int] | None = None,
    x_T: Tensor | None = None,
    **rollout_options,
):
    """Prompts -> (PromptEmbeds, Trajectory): encode, draw x_T (one generator per sample, which then also
    draws that sample's step noise) unless given, and `rollout`. Sampling, evaluation and the strategies'
    collection all start here, so an image depends only on its prompt, seed and settings."""
    embeds = backbone.encode_prompts(prompts, negative_prompt, guidance=guidance_scale > 1, size=size)
    if x_T is None:
        x_T = backbone.initial_noise(len(prompts), generators, size)
    traj = rollout(
        backbone,
        sampler,
        embeds,
        x_T,
        num_steps,
        guidance_scale,
        eta,
        generator=generators,
        **rollout_options,
    )
    return embeds, traj
