"""Flow-matching transitions (SD3/SD3.5, FLUX, Wan): x_t = (1 - sigma) x0 + sigma noise, the model predicts
the velocity v = noise - x0, and a step goes from sigma to the next, smaller sigma' (dt = sigma' - sigma < 0).

noise_level a = 0 is the ODE, Euler as diffusers' `FlowMatchEulerDiscreteScheduler.step` (so rollouts
reproduce the pipelines). a > 0 makes the step a Gaussian with a log-prob, in one of three published forms
(flow_grpo `sd3_sde_with_logprob.py`, DanceGRPO `flux_step`; anchors §2.5), all computed in float32:
- "sde" (Flow-GRPO): s = a sqrt(sigma / (1 - sigma)) (sigma = 1 uses the first shifted sigma below 1 in the
  denominator), mean = x (1 + s^2 dt / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt,
  std = s sqrt(-dt). Typical a = 0.7.
- "dance" (DanceGRPO): score = -(x - (1 - sigma) x0_hat) / sigma^2 with x0_hat = x - sigma v,
  mean = x + v dt - 0.5 a^2 score dt, std = a sqrt(-dt). Typical a = 0.3.
- "cps" (coefficient-preserving): std = sigma' sin(a pi / 2), mean = x0_hat (1 - sigma')
  + x1_hat sqrt(sigma'^2 - std^2) with x1_hat = x + (1 - sigma) v. Typical a = 0.8. Its official log-prob
  drops the constants and the variance: -mean((x' - mean)^2) (`log_prob` below follows it, so clip ranges
  mean what they mean there).
Log-probs otherwise follow the DDPO convention of `samplers.gaussian_log_prob` (mean over latent dims).

Timesteps are the scheduler's (sigma * 1000, float); `schedule(num_steps)` gives the extra `set_timesteps`
arguments a pipeline passes (FLUX's custom sigmas and resolution-dependent `mu`), supplied by the backbone.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from diffusion_align.math.samplers import Step, gaussian_kl, gaussian_log_prob, gaussian_step

KINDS = ("sde", "dance", "cps")


class FlowMatchSampler:
    """The `samplers.Sampler` of flow-matching backbones. scheduler: a `FlowMatchEulerDiscreteScheduler`
    (copied: the backbone's own is never mutated); noise_level: the default a (0 = ODE)."""

    init_noise_sigma = 1.0

    def __init__(
        self,
        scheduler,
        noise_level: float = 0.0,
        kind: str = "sde",
        schedule: Callable[[int], dict] | None = None,
    ):
        if kind not in KINDS:
            raise ValueError(f"flow sampler kind {kind!r}: choose one of {', '.join(KINDS)}")
        self.scheduler = type(scheduler).from_config(scheduler.config)
        self.eta, self.kind = float(noise_level), kind
        self.schedule = schedule or (lambda num_steps: {})
        self._num_steps: int | None = None

    @classmethod
    def for_backbone(
        cls, backbone, noise_level: float = 0.0, kind: str = "sde", size=None
    ) -> FlowMatchSampler:
        """On a flow backbone's scheduler with the set_timesteps arguments its pipeline passes at `size`."""
        return cls(backbone.scheduler, noise_level, kind, schedule=lambda n: backbone.schedule(n, size))

    def timesteps(self, num_steps: int, device=None) -> Tensor:
        """(S,) float timesteps, noisiest first, exactly as the pipeline's `set_timesteps` call."""
        self._set(num_steps)
        return self.scheduler.timesteps.clone().to(device)

    def _set(self, num_steps: int) -> None:
        if self._num_steps != num_steps:
            self.scheduler.set_timesteps(num_steps, **self.schedule(num_steps))
            self._num_steps = num_steps

    def sigmas(self, t: Tensor | float, num_steps: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(sigma, sigma_next, sigma_max) at timestep(s) t ((), or (B,) one per sample), float32, shaped to
        broadcast on `like`. sigma_max is the first sigma below 1 (flow_grpo's stand-in at sigma = 1)."""
        self._set(num_steps)
        schedule = self.scheduler.timesteps.to(torch.float32)
        t = torch.as_tensor(t, dtype=torch.float32, device="cpu").reshape(-1)
        index = (schedule[None, :] - t[:, None]).abs().argmin(dim=1)
        sigmas = self.scheduler.sigmas.to(torch.float32)
        shape = (-1,) + (1,) * (like.ndim - 1)
        on = dict(device=like.device, dtype=torch.float32)
        return (
            sigmas[index].view(shape).to(**on),
            sigmas[index + 1].view(shape).to(**on),
            sigmas[1].to(**on),
        )

    def scale_input(self, x_t: Tensor, t) -> Tensor:
        return x_t

    def transition(
        self, model_output: Tensor, t, x_t: Tensor, num_steps: int, eta: float | None = None
    ) -> tuple[Tensor, Tensor]:
        """Mean (B, ...) and std (broadcastable) of p(x_prev | x_t), float32; std = 0 at noise level 0."""
        mean, std, _ = self._transition(model_output, t, x_t, num_steps, self.eta if eta is None else eta)
        return mean, std

    def _transition(self, v: Tensor, t, x: Tensor, num_steps: int, a: float) -> tuple[Tensor, Tensor, Tensor]:
        sigma, sigma_next, sigma_max = self.sigmas(t, num_steps, x)
        dt = sigma_next - sigma
        if a <= 0:  # the ODE, as FlowMatchEulerDiscreteScheduler.step rounds it: dt * v in the model's dtype
            return x.float() + dt.to(v.dtype) * v, torch.zeros_like(sigma), x.float() - sigma * v.float()
        x, v = x.float(), v.float()
        x0 = x - sigma * v
        if self.kind == "sde":
            s = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * a
            mean = x * (1 + s**2 / (2 * sigma) * dt) + v * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
            return mean, s * torch.sqrt(-dt), x0
        if self.kind == "dance":
            score = -(x - x0 * (1 - sigma)) / sigma**2
            return x + dt * v - 0.5 * a**2 * score * dt, a * torch.sqrt(-dt), x0
        std = sigma_next * math.sin(a * math.pi / 2)
        x1 = x + v * (1 - sigma)
        return x0 * (1 - sigma_next) + x1 * torch.sqrt(sigma_next**2 - std**2), std, x0

    def step(
        self, model_output: Tensor, t, x_t: Tensor, num_steps: int, eta: float | None = None, generator=None
    ) -> Step:
        a = self.eta if eta is None else float(eta)
        mean, std, x0 = self._transition(model_output, t, x_t, num_steps, a)
        prev, log_prob = gaussian_step(mean, std, x_t, a, generator)
        if log_prob is not None and self.kind == "cps":
            log_prob = self.log_prob(prev, mean, std)
        return Step(prev, log_prob, x0)

    def log_prob(self, x_prev: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        """(B,) float32 log p(x_prev | x_t) of a stored step (CPS: the official constant-free form)."""
        if self.kind == "cps":
            diff = x_prev.detach().float() - mean.float()
            return -(diff**2).mean(dim=tuple(range(1, diff.ndim)))
        return gaussian_log_prob(x_prev, mean, std)

    def kl(self, mean_p: Tensor, mean_q: Tensor, std: Tensor) -> Tensor:
        """(B,) KL between two transitions of the same std (Flow-GRPO's KL to the reference)."""
        return gaussian_kl(mean_p, mean_q, std)

    def sigma_at(self, t, like: Tensor) -> Tensor:
        """sigma = t / T at any timestep(s) t in [0, T] (not only the schedule's), float32, broadcastable on
        `like`: the forward process's noise share."""
        shape = (-1,) + (1,) * (like.ndim - 1)
        sigma = torch.as_tensor(t, dtype=torch.float32).reshape(shape).to(like.device)
        return sigma / self.scheduler.config.num_train_timesteps

    def add_noise(self, x0: Tensor, noise: Tensor, t) -> Tensor:
        """The forward process at timestep t: (1 - sigma) x0 + sigma noise, sigma = `sigma_at(t)`."""
        sigma = self.sigma_at(t, x0)
        return (1 - sigma) * x0 + sigma * noise

    def training_target(self, x0: Tensor, noise: Tensor, t) -> Tensor:
        """The velocity the denoiser is trained to output at any t: d x_t / d sigma = noise - x0."""
        return noise - x0
