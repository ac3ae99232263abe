"""Transition math of the denoising chain: each step is a Gaussian p(x_prev | x_t) = N(mean, std^2).

Log-prob convention (DDPO's, kept so published clip ranges and betas mean the same here):
`log_prob` is the Gaussian log-density **averaged** over the latent dimensions (C, h, w), not summed, and
is always computed in float32. A PPO `clip_range` of 1e-4 is therefore a per-dimension scale.

DDIM-eta (Song et al. 2021, eq. 12): with a_t = alpha_bar_t and a_p = alpha_bar_prev,
    x0_hat = from the model output per prediction type (epsilon, v_prediction, sample)
    std    = eta * sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
    mean   = sqrt(a_p) * x0_hat + sqrt(1 - a_p - std^2) * eps_hat
eta = 1 is DDPM-equivalent; eta = 0 is the deterministic DDIM sampler (std = 0, log-prob undefined).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class DDIMSampler:
    """DDIM-eta transitions on the schedule of a diffusers `DDIMScheduler` (or any scheduler config with
    `alphas_cumprod`-compatible betas). Holds no model; `set_timesteps` mirrors the scheduler's spacing."""

    def __init__(self, scheduler, eta: float = 1.0):
        self.scheduler = scheduler
        self.eta = float(eta)
        config = scheduler.config
        self.prediction_type = config.prediction_type
        self.num_train_timesteps = config.num_train_timesteps
        self.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
        final = 1.0 if config.set_alpha_to_one else float(self.alphas_cumprod[0])
        self.final_alpha_cumprod = torch.tensor(final, dtype=torch.float64)
        self.clip_sample = config.clip_sample
        self.clip_sample_range = getattr(config, "clip_sample_range", 1.0)
        if getattr(config, "thresholding", False):
            raise NotImplementedError("dynamic thresholding is not supported by DDIMSampler")

    @classmethod
    def from_scheduler(cls, scheduler, eta: float = 1.0) -> DDIMSampler:
        from diffusers import DDIMScheduler

        if not isinstance(scheduler, DDIMScheduler):
            scheduler = DDIMScheduler.from_config(scheduler.config)
        return cls(scheduler, eta)

    def timesteps(self, num_steps: int) -> Tensor:
        """(S,) int64 timesteps from noisiest to cleanest, exactly as `DDIMScheduler.set_timesteps`."""
        self.scheduler.set_timesteps(num_steps)
        return self.scheduler.timesteps.clone()

    def _alphas(self, t: Tensor | int, num_steps: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """alpha_bar at t and at t - T/num_steps (final_alpha_cumprod below 0), broadcastable on `like`."""
        t = torch.as_tensor(t, device="cpu").long().reshape(-1)
        prev_t = t - self.num_train_timesteps // num_steps
        a_t = self.alphas_cumprod[t]
        a_p = torch.where(prev_t >= 0, self.alphas_cumprod[prev_t.clamp(min=0)], self.final_alpha_cumprod)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return a_t.view(shape).to(like.device, torch.float32), a_p.view(shape).to(like.device, torch.float32)

    def transition(
        self, model_output: Tensor, t: Tensor | int, x_t: Tensor, num_steps: int, eta: float | None = None
    ) -> tuple[Tensor, Tensor]:
        """Mean and std of p(x_prev | x_t).

        model_output, x_t: (B, C, h, w) latents; t: a timestep, or (B,) timesteps (one per sample).
        Returns mean (B, C, h, w) in float32 and std broadcastable to it ((1 or B, 1, 1, 1), float32).
        """
        eta = self.eta if eta is None else float(eta)
        a_t, a_p = self._alphas(t, num_steps, x_t)
        x_t, model_output = x_t.float(), model_output.float()
        if self.prediction_type == "epsilon":
            x0 = (x_t - (1 - a_t).sqrt() * model_output) / a_t.sqrt()
            eps = model_output
        elif self.prediction_type == "v_prediction":
            x0 = a_t.sqrt() * x_t - (1 - a_t).sqrt() * model_output
            eps = a_t.sqrt() * model_output + (1 - a_t).sqrt() * x_t
        elif self.prediction_type == "sample":
            x0 = model_output
            eps = (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        else:
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}")
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        variance = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
        std = eta * variance.sqrt()
        mean = a_p.sqrt() * x0 + (1 - a_p - std**2).clamp(min=0).sqrt() * eps
        return mean, std


def gaussian_log_prob(x_prev: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(x_prev; mean, std^2) averaged over all non-batch dims, in float32. Returns (B,).

    `x_prev` is detached: the log-prob is a function of the policy through `mean` only (DDPO).
    """
    x_prev, mean, std = x_prev.detach().float(), mean.float(), std.float()
    log_prob = -((x_prev - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def gaussian_kl(mean_p: Tensor, mean_q: Tensor, std: Tensor) -> Tensor:
    """KL(N(mean_p, std^2) || N(mean_q, std^2)) per sample, averaged over non-batch dims (same convention),
    in float32: DDPO's per-step KL(pi_theta || pi_ref) with `mean_q` the reference's mean."""
    kl = (mean_p.float() - mean_q.float()) ** 2 / (2 * std.float() ** 2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))
