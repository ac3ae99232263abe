"""Transition math of the denoising chain: each step is a Gaussian p(x_prev | x_t) = N(mean, std^2).

Log-prob convention (DDPO's, kept so published clip ranges and betas mean the same here):
`log_prob` is the Gaussian log-density **averaged** over the latent dimensions (C, h, w), not summed, and
is always computed in float32. A PPO `clip_range` of 1e-4 is therefore a per-dimension scale.

DDIM-eta (Song et al. 2021, eq. 12): with a_t = alpha_bar_t and a_p = alpha_bar_prev,
    x0_hat = from the model output per prediction type (epsilon, v_prediction, sample)
    std    = eta * sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
    mean   = sqrt(a_p) * x0_hat + sqrt(1 - a_p - std^2) * eps_hat
eta = 1 is DDPM-equivalent; eta = 0 is the deterministic DDIM sampler (std = 0, log-prob undefined).

The sampler protocol (`Sampler` below) is what `rollout`, the policy and the strategies use. A new sampler
family (a flow-matching ODE/SDE) is one new class with these methods; nothing else changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor


@dataclass
class Step:
    """One denoising step's result. prev: x_prev in x_t's dtype; log_prob: (B,) float32 log p(prev | x_t)
    (None for a deterministic step or a sampler without Gaussian transitions); x0: the step's prediction of
    the clean latent (None where the sampler does not form one)."""

    prev: Tensor
    log_prob: Tensor | None = None
    x0: Tensor | None = None


class Sampler(Protocol):
    """How a chain of denoiser outputs becomes a chain of latents.

    timesteps(num_steps, device): (S,) model timesteps, noisiest first; resets any per-chain state.
    scale_input(x_t, t): the denoiser's input at t (identity for DDIM and flow samplers).
    step(model_output, t, x_t, num_steps, eta, generator) -> Step: draw x_prev (the noise from `generator`,
        a list giving one stream per sample).
    transition(model_output, t, x_t, num_steps, eta) -> (mean, std): the Gaussian p(x_prev | x_t);
    log_prob(x_prev, mean, std) -> (B,) and kl(mean_p, mean_q, std) -> (B,): what the likelihood methods
        (DDPO, D3PO, PRDP, Flow-GRPO) score stored steps with (`gaussian_log_prob`/`gaussian_kl` here).
        Samplers without Gaussian transitions (`SchedulerSampler`) raise; rollouts still work.
    add_noise(x0, noise, t): a draw of the forward process q(x_t | x0) (DRaFT-LV re-noising, offline data);
    training_target(x0, noise, t): what the denoiser should output at that x_t (Diffusion-DPO, SFT).
    eta: the default noise level of `step`/`transition`; init_noise_sigma: the scale of x_T.
    """

    eta: float
    init_noise_sigma: float

    def timesteps(self, num_steps: int, device=None) -> Tensor: ...

    def scale_input(self, x_t: Tensor, t: Tensor) -> Tensor: ...

    def step(self, model_output, t, x_t, num_steps: int, eta: float | None, generator=None) -> Step: ...

    def transition(self, model_output, t, x_t, num_steps: int, eta: float | None = None): ...

    def log_prob(self, x_prev: Tensor, mean: Tensor, std: Tensor) -> Tensor: ...

    def kl(self, mean_p: Tensor, mean_q: Tensor, std: Tensor) -> Tensor: ...

    def add_noise(self, x0: Tensor, noise: Tensor, t) -> Tensor: ...

    def training_target(self, x0: Tensor, noise: Tensor, t) -> Tensor: ...


def gaussian_step(
    mean: Tensor, std: Tensor, like: Tensor, eta: float, generator
) -> tuple[Tensor, Tensor | None]:
    """x_prev ~ N(mean, std^2) in `like`'s dtype and its log-prob ((prev, None) when eta == 0). The noise is
    drawn as `DDIMScheduler.step(eta, generator)` draws it, so pipelines are reproduced exactly; the
    log-prob is of the cast sample, which is what later re-scoring sees (PPO ratio exactly 1)."""
    if eta <= 0:
        return mean.to(like.dtype), None
    noise = randn_tensor(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    prev = (mean + std * noise).to(like.dtype)
    return prev, gaussian_log_prob(prev, mean.detach(), std)


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

    @property
    def init_noise_sigma(self) -> float:
        return float(self.scheduler.init_noise_sigma)

    def timesteps(self, num_steps: int, device=None) -> Tensor:
        """(S,) int64 timesteps from noisiest to cleanest, exactly as `DDIMScheduler.set_timesteps`."""
        self.scheduler.set_timesteps(num_steps)
        return self.scheduler.timesteps.clone().to(device)

    def scale_input(self, x_t: Tensor, t) -> Tensor:
        return x_t

    def step(
        self, model_output, t, x_t: Tensor, num_steps: int, eta: float | None = None, generator=None
    ) -> Step:
        eta = self.eta if eta is None else float(eta)
        mean, std, x0 = self._transition(model_output, t, x_t, num_steps, eta)
        prev, log_prob = gaussian_step(mean, std, x_t, eta, generator)
        return Step(prev, log_prob, x0)

    def log_prob(self, x_prev: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        return gaussian_log_prob(x_prev, mean, std)

    def kl(self, mean_p: Tensor, mean_q: Tensor, std: Tensor) -> Tensor:
        return gaussian_kl(mean_p, mean_q, std)

    def add_noise(self, x0: Tensor, noise: Tensor, t) -> Tensor:
        """sqrt(a_t) x0 + sqrt(1 - a_t) noise, a_t = alpha_bar at the timestep t (an int, or (B,) one per
        sample)."""
        a = self._alpha_bar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def training_target(self, x0: Tensor, noise: Tensor, t) -> Tensor:
        """What the denoiser is trained to output for x_t = add_noise(x0, noise, t), per the scheduler's
        prediction type: the noise (epsilon), the velocity sqrt(a_t) noise - sqrt(1 - a_t) x0 (v_prediction)
        or x0 (sample)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            a = self._alpha_bar(t, x0)
            return a.sqrt() * noise - (1 - a).sqrt() * x0
        return x0

    def _alpha_bar(self, t, like: Tensor) -> Tensor:
        index = torch.as_tensor(t, device="cpu").long().reshape(-1)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return self.alphas_cumprod[index].float().view(shape).to(like.device)

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
        mean, std, _ = self._transition(
            model_output, t, x_t, num_steps, self.eta if eta is None else float(eta)
        )
        return mean, std

    def _transition(self, model_output, t, x_t, num_steps: int, eta: float) -> tuple[Tensor, Tensor, Tensor]:
        """(mean, std, x0_hat)."""
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
        return mean, std, x0


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
