"""FLUX.1 dev and schnell (`FluxPipeline`) as a backbone: a guidance-distilled flow transformer.

Differences from SD3, each as the pipeline does it:
- guidance: dev embeds the guidance scale (`transformer.config.guidance_embeds`) and makes one call, no
  classifier-free guidance and no negative prompt; schnell ignores the scale;
- the transformer reads 2x2-packed latent tokens with positional ids (img_ids, txt_ids) and the timestep
  divided by 1000. We keep latents unpacked, (B, C, h, w), everywhere outside the transformer call: packing
  is a fixed permutation, so x_T, every Euler/SDE step and every per-sample mean are the pipeline's (same
  generator, same image), and `decode`, `encode` and the strategies see the usual image-latent layout;
- the schedule: custom sigmas linspace(1, 1/N, N) and the resolution-dependent shift mu (dev).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FluxPipeline
from torch import Tensor

from diffusion_align.engine.backbones.sd3 import SD3Backbone
from diffusion_align.engine.backbones.stable_diffusion import PromptEmbeds, text_encoders_on_device
from diffusion_align.errors import UserError


class FluxBackbone(SD3Backbone):
    """The `backbones.protocol.Backbone` of FLUX.1; `unet` is the pipeline's `FluxTransformer2DModel`."""

    # diffusers' FLUX LoRA script defaults: attention of both streams and the double blocks' MLPs
    lora_targets = SD3Backbone.lora_targets + (
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    )
    max_sequence_length = 512  # T5 tokens, the pipeline's default
    default_max_shift = 1.15  # the FLUX pipeline's fallback when the scheduler config has no max_shift

    # --- text ---------------------------------------------------------------------------------------
    @torch.no_grad()
    @text_encoders_on_device
    def encode_prompts(
        self, prompts: list[str], negative_prompt: str | None = None, guidance: bool = True, size=None
    ) -> PromptEmbeds:
        """CLIP pooled (B, P) + T5 states (B, L, D) through the pipeline's `encode_prompt`. No negatives:
        FLUX's guidance is distilled into the model (`guidance` is not used; a negative prompt is an error
        rather than silently ignored)."""
        if negative_prompt is not None:
            raise UserError(
                "FLUX is guidance-distilled and has no negative prompt: remove sample.negative_prompt "
                "(--negative-prompt); sample.guidance_scale sets its guidance embedding"
            )
        cond, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return PromptEmbeds(cond=cond, pooled=pooled)

    # --- denoiser -----------------------------------------------------------------------------------
    def predict(self, x_t: Tensor, t: Tensor, embeds: PromptEmbeds, guidance_scale: float) -> Tensor:
        """The velocity at x_t (B, C, h, w): one transformer call, `guidance_scale` into the guidance
        embedding when the model has one (dev), ignored otherwise (schnell)."""
        return self.denoise(x_t, t, embeds, guidance_scale)

    def denoise(self, x: Tensor, t: Tensor, embeds: PromptEmbeds, guidance_scale: float = 1.0) -> Tensor:
        b, c, h, w = x.shape
        packed = FluxPipeline._pack_latents(x.to(self.dtype), b, c, h, w)
        timestep = (t.expand(b) if t.ndim == 0 else t).to(packed.dtype)
        guidance = None
        if self.unet.config.guidance_embeds:
            guidance = torch.full((b,), float(guidance_scale), device=x.device, dtype=torch.float32)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, self.dtype)
        txt_ids = torch.zeros(embeds.cond.shape[1], 3, device=x.device, dtype=self.dtype)
        out = self.unet(
            hidden_states=packed,
            timestep=timestep / 1000,
            guidance=guidance,
            pooled_projections=embeds.pooled,
            encoder_hidden_states=embeds.cond,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(
            out, h * self.vae_scale_factor, w * self.vae_scale_factor, self.vae_scale_factor
        )

    # --- latents ------------------------------------------------------------------------------------
    def latent_shape(self, batch_size: int, size: tuple[int, int] | None = None) -> tuple[int, ...]:
        """(B, C, h, w), h and w rounded down to even (2x2 packing) as `FluxPipeline.prepare_latents`."""
        height, width = size or self.default_size()
        f2 = 2 * self.vae_scale_factor
        return batch_size, self.unet.config.in_channels // 4, 2 * (height // f2), 2 * (width // f2)

    def image_seq_len(self, size: tuple[int, int] | None = None) -> int:
        _, _, h, w = self.latent_shape(1, size)
        return (h // 2) * (w // 2)

    def schedule(self, num_steps: int, size: tuple[int, int] | None = None) -> dict:
        """The pipeline's `set_timesteps` arguments: sigmas linspace(1, 1/N, N) (None when the scheduler
        makes its own flow sigmas) and mu from the image's token count (used when shifting dynamically)."""
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        if self.scheduler.config.get("use_flow_sigmas", False):
            sigmas = None
        return {"sigmas": sigmas, "mu": self._mu(size, self.default_max_shift)}
