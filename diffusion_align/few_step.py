"""Noise -> image maps with gradient to the initial noise, for ReNO and inference-time search.

Two ways to turn a standard-normal z into an image:
- `SchedulerGenerator` drives a diffusers scheduler's own `step` (Euler ancestral with trailing spacing as in
  SD-Turbo / SDXL-Turbo, LCM as in Hyper-SD / LCM models, or any scheduler with `scale_model_input` + `step`),
  keeping the autograd graph: diffusers' step functions are plain tensor arithmetic.
- `RolloutGenerator` goes through the project's one DDIM loop (`rollout(..., grad_to_noise=True)`), so any
  backbone works even without a few-step scheduler. It steps DDIM with **trailing** timestep spacing
  (`generation_scheduler`): with the "leading" spacing that SD 1.x/2.x and the bundled model ship, one step
  is timestep 1 and two are [501, 1], so a sample from pure noise stays noise; trailing starts at T - 1
  (one step 999, two [999, 499]), as SD-Turbo ships. Training rollouts and `sample` keep the model's own
  spacing (diffusers parity); only ReNO and the search baselines generate this way.

Both take z of shape (B, C, h, w) ~ N(0, I) (the ReNO regulariser assumes this scale) and multiply it by the
scheduler's `init_noise_sigma` themselves, exactly as the diffusers pipelines do with user-given latents. So
`generator(z)` for z drawn like `pipe(generator=...)` draws it reproduces the pipeline's image. Step noise
comes from a fresh generator per call and per sample, seeded by `seeds`: ReNO keeps it fixed across
iterations, and a sample does not depend on the rest of its batch.
"""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from diffusion_align.errors import UserError

# --scheduler name -> diffusers scheduler class name and config overrides
FEW_STEP_SCHEDULERS = {
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "lcm": ("LCMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
}
# Schedulers whose math `DDIMSampler` reproduces: "auto" sends these through `rollout`.
DDIM_COMPATIBLE = {"DDIMScheduler", "DDPMScheduler", "PNDMScheduler"}


def generation_scheduler(scheduler):
    """A `DDIMScheduler` on `scheduler`'s noise schedule with trailing spacing, for generation from noise."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(scheduler.config, timestep_spacing="trailing")


def _generators(seeds: list[int]) -> list[torch.Generator]:
    # CPU generators: the same seed gives the same noise on every device
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def draw_noise(backbone, seeds: list[int], size: tuple[int, int] | None = None) -> Tensor:
    """z (B, C, h, w) float32 ~ N(0, I), one seed per sample, drawn as the diffusers pipelines draw latents
    (in the backbone's dtype, from a CPU generator), so seed s gives the image `pipe(generator=s)` gives."""
    height, width = size or backbone.default_size()
    f = backbone.vae_scale_factor
    shape = (len(seeds), backbone.unet.config.in_channels, height // f, width // f)
    gens = _generators(seeds)
    return randn_tensor(shape, generator=gens, device=backbone.device, dtype=backbone.dtype).float()


class SchedulerGenerator:
    """z -> images (B, 3, H, W) in [0, 1] through `scheduler.step`, differentiable w.r.t. z.

    scheduler: a diffusers scheduler instance (copied, so the backbone's own one is never mutated);
    checkpoint: recompute each denoiser call in backward (activation checkpointing).
    """

    def __init__(self, backbone, scheduler, num_steps: int, guidance_scale: float, checkpoint: bool = False):
        self.backbone = backbone
        self.scheduler = type(scheduler).from_config(scheduler.config)
        self.num_steps, self.guidance_scale, self.checkpoint = (
            int(num_steps),
            float(guidance_scale),
            checkpoint,
        )

    def latents(self, z: Tensor, embeds, seeds: list[int]) -> Tensor:
        """Final latents (B, C, h, w) in the backbone dtype."""
        sched, bb = self.scheduler, self.backbone
        sched.set_timesteps(self.num_steps, device=z.device)  # also resets the scheduler's step index
        gens = _generators(seeds)
        x = (z * sched.init_noise_sigma).to(bb.dtype)
        for t in sched.timesteps:
            x_in = sched.scale_model_input(x, t)
            if self.checkpoint and torch.is_grad_enabled():
                out = grad_checkpoint(bb.predict, x_in, t, embeds, self.guidance_scale, use_reentrant=False)
            else:
                out = bb.predict(x_in, t, embeds, self.guidance_scale)
            x = sched.step(out, t, x, generator=gens, return_dict=False)[0]
        return x

    def __call__(self, z: Tensor, embeds, seeds: list[int]) -> Tensor:
        return self.backbone.decode(self.latents(z, embeds, seeds))


class RolloutGenerator:
    """z -> images (B, 3, H, W) in [0, 1] through `rollout` (DDIM-eta, gradient to the noise)."""

    def __init__(
        self, backbone, sampler, num_steps: int, guidance_scale: float, eta: float = 0.0, checkpoint=False
    ):
        self.backbone, self.sampler = backbone, sampler
        self.num_steps, self.guidance_scale = int(num_steps), float(guidance_scale)
        self.eta, self.checkpoint = float(eta), checkpoint

    def __call__(self, z: Tensor, embeds, seeds: list[int]) -> Tensor:
        from diffusion_align.rollout import rollout

        x_T = (z * self.sampler.scheduler.init_noise_sigma).to(self.backbone.dtype)
        traj = rollout(
            self.backbone,
            self.sampler,
            embeds,
            x_T,
            self.num_steps,
            self.guidance_scale,
            self.eta,
            grad_to_noise=torch.is_grad_enabled(),
            checkpoint=self.checkpoint,
            generator=_generators(seeds) if self.eta > 0 else None,
        )
        return traj.images


def make_generator(
    backbone,
    num_steps: int,
    guidance_scale: float,
    scheduler: str = "auto",
    checkpoint: bool = False,
    eta: float = 0.0,
):
    """The noise -> image map for `backbone`.

    scheduler: "auto" (the backbone's own scheduler: DDIM-like ones go through `rollout` with trailing
    spacing, others such as SD-Turbo's Euler ancestral are stepped directly), "ddim" (always `rollout`,
    trailing), "native" (always the backbone's scheduler, its own spacing), or a few-step scheduler built on
    the backbone's schedule: "euler_ancestral" (trailing spacing), "euler" (trailing) or "lcm".
    """
    own = backbone.scheduler
    if scheduler == "auto":
        scheduler = "ddim" if type(own).__name__ in DDIM_COMPATIBLE else "native"
    if scheduler == "ddim":
        from diffusion_align.samplers import DDIMSampler

        sampler = DDIMSampler(generation_scheduler(own), eta)
        return RolloutGenerator(backbone, sampler, num_steps, guidance_scale, eta, checkpoint)
    if scheduler == "native":
        return SchedulerGenerator(backbone, own, num_steps, guidance_scale, checkpoint)
    if scheduler in FEW_STEP_SCHEDULERS:
        import diffusers

        class_name, overrides = FEW_STEP_SCHEDULERS[scheduler]
        built = getattr(diffusers, class_name).from_config(own.config, **overrides)
        return SchedulerGenerator(backbone, built, num_steps, guidance_scale, checkpoint)
    choices = ", ".join(["auto", "ddim", "native", *FEW_STEP_SCHEDULERS])
    raise UserError(f"scheduler {scheduler!r}: choose one of {choices}")
