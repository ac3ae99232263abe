"""Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`) as a backbone: an MMDiT predicting the flow velocity.

Built from the pipeline's public parts as `StableDiffusionBackbone` is, and a subclass of it so that the one
classifier-free guidance (`StableDiffusionBackbone.predict`: one call on [uncond, cond]) and the VAE, noise
and memory code are shared; only the denoiser call, the text encoders and the schedule differ. Timesteps
are the flow scheduler's (sigma * 1000), passed as the pipeline passes them; the sampler
(`math.flow_samplers.FlowMatchSampler`) owns the step.
"""

from __future__ import annotations

import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from torch import Tensor

from diffusion_align.engine.backbones.stable_diffusion import (
    PromptEmbeds,
    StableDiffusionBackbone,
    text_encoders_on_device,
)


class SD3Backbone(StableDiffusionBackbone):
    """The `backbones.protocol.Backbone` of SD3/SD3.5; `unet` is the pipeline's `SD3Transformer2DModel`."""

    # flow_grpo's SD3 LoRA: the image-stream and the text-stream (add_*) attention projections
    lora_targets = (
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
    )
    lora_prefix = "transformer"
    max_sequence_length = 256  # T5 tokens, the pipeline's default
    default_max_shift = 1.16  # the SD3 pipeline's fallback when the scheduler config has no max_shift

    def __init__(self, pipe):
        self.pipe = pipe
        self.unet = pipe.transformer
        self.vae = pipe.vae
        self.scheduler = pipe.scheduler
        self.is_xl = False
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        for module in self.frozen_modules():
            module.requires_grad_(False)

    def default_size(self) -> tuple[int, int]:
        """The pipeline's own default (its `default_sample_size` latents: 1024 px for SD3 and FLUX)."""
        side = self.pipe.default_sample_size * self.vae_scale_factor
        return side, side

    # --- text ---------------------------------------------------------------------------------------
    @torch.no_grad()
    @text_encoders_on_device
    def encode_prompts(
        self, prompts: list[str], negative_prompt: str | None = None, guidance: bool = True, size=None
    ) -> PromptEmbeds:
        """Two CLIPs + T5 through the pipeline's `encode_prompt`: (B, L, D) states and (B, P) pooled, and the
        negatives ("" when none is given, as the pipeline) when `guidance`."""
        negative = None if negative_prompt is None else [negative_prompt] * len(prompts)
        cond, uncond, pooled, uncond_pooled = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=guidance,
            negative_prompt=negative,
            max_sequence_length=self.max_sequence_length,
        )
        return PromptEmbeds(cond=cond, uncond=uncond, pooled=pooled, uncond_pooled=uncond_pooled)

    # --- denoiser -----------------------------------------------------------------------------------
    def denoise(self, x: Tensor, t: Tensor, embeds: PromptEmbeds) -> Tensor:
        """The velocity at x (B, C, h, w), timestep t (sigma * 1000: scalar or (B,)), no guidance."""
        timestep = t.expand(x.shape[0]) if t.ndim == 0 else t
        return self.unet(
            hidden_states=x.to(self.dtype),
            timestep=timestep,
            encoder_hidden_states=embeds.cond,
            pooled_projections=embeds.pooled,
            return_dict=False,
        )[0]

    def initial_noise(self, batch_size: int, generator=None, size=None, *, sigma=None, **shape) -> Tensor:
        """x_T ~ N(0, sigma^2 I) drawn as the pipeline's `prepare_latents` draws it; flow models start from
        unit noise (sigma None = 1: flow schedulers have no `init_noise_sigma`)."""
        return super().initial_noise(
            batch_size, generator, size, sigma=1.0 if sigma is None else sigma, **shape
        )

    # --- schedule -----------------------------------------------------------------------------------
    def image_seq_len(self, size: tuple[int, int] | None = None) -> int:
        """Transformer tokens of one image at `size`: what the resolution-dependent shift depends on."""
        _, _, h, w = self.latent_shape(1, size)
        p = self.unet.config.patch_size
        return (h // p) * (w // p)

    def schedule(self, num_steps: int, size: tuple[int, int] | None = None) -> dict:
        """The extra `set_timesteps` arguments the pipeline passes: `mu` (the resolution shift) only when the
        scheduler shifts dynamically (SD3.5 configs do not; the static `shift` is in the scheduler)."""
        config = self.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return {}
        return {"mu": self._mu(size, self.default_max_shift)}

    def _mu(self, size, default_max_shift: float) -> float:
        config = self.scheduler.config
        return calculate_shift(
            self.image_seq_len(size),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", default_max_shift),
        )
