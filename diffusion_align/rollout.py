"""The one denoising loop. Every strategy and ReNO samples through `rollout`.

The gradient window (`grad_steps`) is the single knob that separates the methods:
- DDPO / D3PO / PRDP: empty window; the trajectory and its log-probs are stored for later re-scoring.
- DRaFT-K / AlignProp: the last K (or a random contiguous tail of) steps run with gradient.
- ReNO: `grad_to_noise=True` keeps the whole chain differentiable back to x_T.
Steps outside the window call the denoiser under `no_grad`; the DDIM update itself stays differentiable, so
gradient from a later window still reaches earlier latents through the linear path (as in AlignProp).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor
from torch.utils.checkpoint import checkpoint as grad_checkpoint
from tqdm.auto import tqdm

from diffusion_align.samplers import gaussian_log_prob


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


def rollout(
    backbone,
    sampler,
    embeds,
    x_T: Tensor,
    num_steps: int,
    guidance_scale: float,
    eta: float | None = None,
    grad_steps: Iterable[int] = (),
    grad_to_noise: bool = False,
    checkpoint: bool = False,
    generator: torch.Generator | list[torch.Generator] | None = None,
    decode: bool = True,
    progress: bool = False,
) -> Trajectory:
    """Denoise x_T (B, C, h, w) conditioned on `embeds` in `num_steps` DDIM-eta steps.

    grad_steps: step indices (0 = noisiest; negatives count from the end) whose denoiser call keeps gradient;
    checkpoint: recompute those calls in backward (activation checkpointing) to save memory;
    generator: the per-step noise source (a list gives one stream per sample, making samples independent of
    batch composition).
    """
    timesteps = sampler.timesteps(num_steps).to(x_T.device)
    eta = sampler.eta if eta is None else eta
    window = set(range(num_steps)) if grad_to_noise else {i % num_steps for i in grad_steps}
    x_t, latents, log_probs = x_T, [x_T.detach()], []
    for i, t in enumerate(tqdm(timesteps, desc="denoising", leave=False, disable=not progress)):
        with torch.set_grad_enabled(i in window):
            if checkpoint and i in window:
                out = grad_checkpoint(backbone.predict, x_t, t, embeds, guidance_scale, use_reentrant=False)
            else:
                out = backbone.predict(x_t, t, embeds, guidance_scale)
        mean, std = sampler.transition(out, t, x_t, num_steps, eta)
        if eta > 0:  # same draw as DDIMScheduler.step(eta, generator), so pipelines are reproduced exactly
            noise = randn_tensor(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
            x_t = (mean + std * noise).to(x_T.dtype)
            # scored after the cast: the stored latent is what later re-scoring sees (ratio exactly 1)
            log_probs.append(gaussian_log_prob(x_t, mean.detach(), std))
        else:
            x_t = mean.to(x_T.dtype)
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
