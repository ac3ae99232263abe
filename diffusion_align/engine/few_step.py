"""Noise -> image maps with gradient to the initial noise, for ReNO and inference-time search.

`NoiseToImage` runs the one loop (`rollout(..., grad_to_noise=True)`) with one of two samplers:
- `DDIMSampler` with **trailing** timestep spacing (`generation_scheduler`), so any backbone works even
  without a few-step scheduler: with the "leading" spacing that SD 1.x/2.x and the bundled model ship, one
  step is timestep 1 and two are [501, 1], so a sample from pure noise stays noise; trailing starts at
  T - 1 (one step 999, two [999, 499]), as SD-Turbo ships. Training rollouts and `sample` keep the model's
  own spacing (diffusers parity); only ReNO and the search baselines generate this way.
- `SchedulerSampler`, a diffusers scheduler's own `step` (Euler ancestral with trailing spacing as in
  SD-Turbo / SDXL-Turbo, LCM as in Hyper-SD / LCM models, ...), keeping the autograd graph.

It takes z of shape (B, C, h, w) ~ N(0, I) (the ReNO regulariser assumes this scale) and multiply it by the
scheduler's `init_noise_sigma` themselves, exactly as the diffusers pipelines do with user-given latents. So
`generator(z)` for z drawn like `pipe(generator=...)` draws it reproduces the pipeline's image. Step noise
comes from a fresh generator per call and per sample, seeded by `seeds`: ReNO keeps it fixed across
iterations, and a sample does not depend on the rest of its batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_align.engine.rollout import rollout
from diffusion_align.errors import UserError
from diffusion_align.math.flow_samplers import FlowMatchSampler
from diffusion_align.math.samplers import DDIMSampler
from diffusion_align.math.scheduler_sampler import SchedulerSampler

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


def seed_generators(seeds: list[int]) -> list[torch.Generator]:
    # CPU generators: the same seed gives the same noise on every device
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def draw_noise(backbone, seeds: list[int], size: tuple[int, int] | None = None) -> Tensor:
    """z float32 ~ N(0, I) in the backbone's latent shape, one seed per sample, drawn as the diffusers
    pipelines draw latents (in the backbone's dtype, from a CPU generator), so seed s gives the image
    `pipe(generator=s)` gives."""
    return backbone.initial_noise(len(seeds), seed_generators(seeds), size, sigma=1.0).float()


class NoiseToImage:
    """z -> images (B, 3, H, W) in [0, 1] through `rollout`, differentiable w.r.t. z when grad is enabled.

    sampler: `DDIMSampler`, `SchedulerSampler` or `FlowMatchSampler`; checkpoint: recompute each denoiser
    call in backward.
    """

    def __init__(self, backbone, sampler, num_steps: int, guidance_scale: float, checkpoint: bool = False):
        self.backbone, self.sampler = backbone, sampler
        self.num_steps, self.guidance_scale, self.checkpoint = (
            int(num_steps),
            float(guidance_scale),
            checkpoint,
        )

    def run(self, z: Tensor, embeds, seeds: list[int], **rollout_options):
        """The rollout of x_T = z * init_noise_sigma (as the pipelines scale user-given latents)."""
        x_T = (z * self.sampler.init_noise_sigma).to(self.backbone.dtype)
        return rollout(
            self.backbone,
            self.sampler,
            embeds,
            x_T,
            self.num_steps,
            self.guidance_scale,
            grad_to_noise=torch.is_grad_enabled(),
            checkpoint=self.checkpoint,
            generator=seed_generators(seeds),
            **rollout_options,
        )

    def __call__(self, z: Tensor, embeds, seeds: list[int]) -> Tensor:
        return self.run(z, embeds, seeds).images


def make_sampler(backbone, scheduler: str = "auto", eta: float = 0.0, size: tuple[int, int] | None = None):
    """The generation sampler for `backbone`: "auto" (the backbone's own scheduler: DDIM-like ones as
    DDIM-eta with trailing spacing, others such as SD-Turbo's Euler ancestral stepped directly), "ddim"
    (always DDIM-eta, trailing), "native" (the backbone's scheduler, its own spacing), or a few-step
    scheduler built on the backbone's schedule: "euler_ancestral" (trailing), "euler" (trailing) or "lcm".
    Flow models (SD3, FLUX: a backbone with a `schedule`) step their own flow schedule at `size`: the Euler
    ODE (eta > 0: the flow SDE), as their pipelines and FLUX-schnell's few steps do."""
    own = backbone.scheduler
    if hasattr(backbone, "schedule"):
        if scheduler not in ("auto", "native"):
            raise UserError(
                f"scheduler {scheduler!r} is for DDPM-type models; flow models use their own (auto)"
            )
        return FlowMatchSampler.for_backbone(backbone, eta, size=size)
    if scheduler == "auto":
        scheduler = "ddim" if type(own).__name__ in DDIM_COMPATIBLE else "native"
    if scheduler == "ddim":
        return DDIMSampler(generation_scheduler(own), eta)
    if scheduler == "native":
        return SchedulerSampler(own, eta)
    if scheduler in FEW_STEP_SCHEDULERS:
        import diffusers

        class_name, overrides = FEW_STEP_SCHEDULERS[scheduler]
        return SchedulerSampler(getattr(diffusers, class_name).from_config(own.config, **overrides), eta)
    choices = ", ".join(["auto", "ddim", "native", *FEW_STEP_SCHEDULERS])
    raise UserError(f"scheduler {scheduler!r}: choose one of {choices}")


def make_generator(
    backbone,
    num_steps: int,
    guidance_scale: float,
    scheduler: str = "auto",
    checkpoint: bool = False,
    eta: float = 0.0,
    size: tuple[int, int] | None = None,
) -> NoiseToImage:
    """The noise -> image map for `backbone` through `make_sampler(backbone, scheduler, eta, size)`."""
    return NoiseToImage(
        backbone, make_sampler(backbone, scheduler, eta, size), num_steps, guidance_scale, checkpoint
    )
