"""Any diffusers scheduler as a `samplers.Sampler`, for generation without log-probs.

Euler ancestral (SD-Turbo), LCM (Hyper-SD / LCM models), diffusers' own DDIM: `step` calls the scheduler's
`step`, which is plain tensor arithmetic, so gradient flows through it (ReNO) and a rollout with it
reproduces the pipeline that ships the scheduler. Its transitions are not exposed as Gaussians, so the
likelihood methods (DDPO, D3PO, PRDP) keep `DDIMSampler`.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from diffusion_align.math.samplers import Step


class SchedulerSampler:
    """A copy of `scheduler` (the backbone's own one is never mutated) stepped as diffusers' pipelines do."""

    def __init__(self, scheduler, eta: float = 0.0):
        self.scheduler = type(scheduler).from_config(scheduler.config)
        self.eta = float(eta)
        # only DDIM-type steps take eta; the others draw their own noise level
        self._takes_eta = "eta" in inspect.signature(self.scheduler.step).parameters

    @property
    def init_noise_sigma(self) -> float:
        return self.scheduler.init_noise_sigma

    def timesteps(self, num_steps: int, device=None) -> Tensor:
        self.scheduler.set_timesteps(num_steps, device=device)  # also resets the scheduler's step index
        return self.scheduler.timesteps

    def scale_input(self, x_t: Tensor, t) -> Tensor:
        return self.scheduler.scale_model_input(x_t, t)

    def step(
        self, model_output, t, x_t: Tensor, num_steps: int, eta: float | None = None, generator=None
    ) -> Step:
        kwargs = {"eta": self.eta if eta is None else float(eta)} if self._takes_eta else {}
        out = self.scheduler.step(model_output, t, x_t, generator=generator, return_dict=False, **kwargs)
        return Step(prev=out[0], x0=out[1] if len(out) > 1 else None)

    def add_noise(self, x0: Tensor, noise: Tensor, t) -> Tensor:
        return self.scheduler.add_noise(x0, noise, torch.as_tensor(t).reshape(1))

    def transition(self, *args, **kwargs):
        raise NotImplementedError(
            f"{type(self.scheduler).__name__} steps are not exposed as Gaussian transitions; log-probs and "
            "KLs need DDIMSampler"
        )
