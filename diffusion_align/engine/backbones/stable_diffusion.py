"""Stable Diffusion 1.x / 2.x and SDXL as a backbone: behaviour built from a pipeline's public parts.

We use the pipeline's components and its public `encode_prompt`; we never call or copy `__call__`, so the
one denoising loop (rollout.py) owns sampling and diffusers upgrades cannot silently change it.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor


@dataclass
class PromptEmbeds:
    """Text conditioning for B prompts.

    cond: (B, L, D) text hidden states; uncond: same shape for the negative prompt (None without guidance).
    SDXL only: pooled/uncond_pooled (B, P) pooled text embeds and time_ids (B, 6) micro-conditioning.
    """

    cond: Tensor
    uncond: Tensor | None = None
    pooled: Tensor | None = None
    uncond_pooled: Tensor | None = None
    time_ids: Tensor | None = None

    def _map(self, fn) -> PromptEmbeds:
        return PromptEmbeds(
            **{f.name: None if (v := getattr(self, f.name)) is None else fn(v) for f in fields(self)}
        )

    def __getitem__(self, index) -> PromptEmbeds:
        """Rows `index` (int tensor, slice or list) of every field."""
        return self._map(lambda v: v[index])

    def repeat_interleave(self, n: int) -> PromptEmbeds:
        return self._map(lambda v: v.repeat_interleave(n, dim=0))

    def to(self, *args, **kwargs) -> PromptEmbeds:
        return self._map(lambda v: v.to(*args, **kwargs))

    def with_negative_first(self) -> PromptEmbeds:
        """The guidance batch: [uncond, cond] stacked as the conditioning of 2B samples (uncond first, as the
        diffusers pipelines order it)."""
        time_ids = None if self.time_ids is None else torch.cat([self.time_ids, self.time_ids])
        pooled = None if self.pooled is None else torch.cat([self.uncond_pooled, self.pooled])
        return PromptEmbeds(cond=torch.cat([self.uncond, self.cond]), pooled=pooled, time_ids=time_ids)

    @staticmethod
    def cat(items: list[PromptEmbeds]) -> PromptEmbeds:
        first = items[0]
        return PromptEmbeds(
            **{
                f.name: None
                if getattr(first, f.name) is None
                else torch.cat([getattr(e, f.name) for e in items])
                for f in fields(first)
            }
        )


TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def text_encoders_on_device(encode_prompts):
    """Wraps a backbone's `encode_prompts`: with `offload_text_encoders` set, the text encoders live on the
    CPU and visit the model's device only while they encode (T5-XXL, 9 GB in fp16, is then out of training
    memory at the cost of one transfer each way per call)."""

    @functools.wraps(encode_prompts)
    def wrapper(self, *args, **kwargs):
        with self.text_encoders_ready():
            return encode_prompts(self, *args, **kwargs)

    return wrapper


class StableDiffusionBackbone:
    """The `backbones.protocol.Backbone` of SD 1.x/2.x, SDXL and LCM pipelines (and, inherited, video)."""

    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")  # attention projections (diffusers scripts, DDPO)
    lora_prefix = "unet"  # the denoiser's name in diffusers LoRA files and `save_lora_weights` keywords

    def __init__(self, pipe):
        self.pipe = pipe
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.scheduler = pipe.scheduler
        self.is_xl = getattr(pipe, "text_encoder_2", None) is not None
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        for module in self.frozen_modules():
            module.requires_grad_(False)

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Every module the pipeline holds (denoiser, VAE, text encoders, AnimateDiff's motion adapter...)."""
        return [m for m in self.pipe.components.values() if isinstance(m, torch.nn.Module)]

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def default_size(self) -> tuple[int, int]:
        side = self.unet.config.sample_size * self.vae_scale_factor
        return side, side

    # pipeline components loaded and kept in float32 whatever model.dtype (Wan's VAE)
    float32_components: tuple[str, ...] = ()

    def to(self, device=None, dtype=None) -> StableDiffusionBackbone:
        if dtype == self.dtype:  # a no-op cast still makes diffusers warn about fp32-pinned modules
            dtype = None
        if dtype is None or not self.float32_components:
            self.pipe.to(device=device, dtype=dtype)
            return self
        for name, module in self.pipe.components.items():
            if isinstance(module, torch.nn.Module):
                module.to(device=device, dtype=None if name in self.float32_components else dtype)
        return self

    # --- text ---------------------------------------------------------------------------------------
    offload_text_encoders = False  # set by enable_memory_options

    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for n in TEXT_ENCODERS if (m := getattr(self.pipe, n, None)) is not None]

    @contextmanager
    def text_encoders_ready(self):
        if not self.offload_text_encoders:
            yield
            return
        for module in self.text_encoders():
            module.to(self.device)
        try:
            yield
        finally:
            for module in self.text_encoders():
                module.to("cpu")

    @torch.no_grad()
    @text_encoders_on_device
    def encode_prompts(
        self, prompts: list[str], negative_prompt: str | None = None, guidance: bool = True, size=None
    ) -> PromptEmbeds:
        """Embed B prompts (and the negative prompt, repeated, when `guidance`). Frozen text encoders."""
        n = len(prompts)
        negative = None if negative_prompt is None else [negative_prompt] * n
        if not self.is_xl:
            cond, uncond = self.pipe.encode_prompt(
                prompts, self.device, 1, guidance, negative_prompt=negative
            )
            return PromptEmbeds(cond=cond, uncond=uncond)
        cond, uncond, pooled, uncond_pooled = self.pipe.encode_prompt(
            prompts, device=self.device, do_classifier_free_guidance=guidance, negative_prompt=negative
        )
        height, width = size or self.default_size()
        # SDXL micro-conditioning: original size, crop top-left, target size (no crop, no resize).
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=cond.dtype, device=self.device)
        return PromptEmbeds(cond, uncond, pooled, uncond_pooled, time_ids.repeat(n, 1))

    # --- denoiser -----------------------------------------------------------------------------------
    def predict(self, x_t: Tensor, t: Tensor, embeds: PromptEmbeds, guidance_scale: float) -> Tensor:
        """Model output (epsilon, v or x0, per the scheduler config) for x_t at timestep t (scalar, or (B,)
        per sample: the policy doubles it for guidance), with classifier-free guidance when
        guidance_scale > 1 and negative embeddings exist: one denoiser call on [uncond, cond], then
        uncond + scale * (cond - uncond). The one place guidance happens, for every backbone."""
        if not (guidance_scale > 1.0 and embeds.uncond is not None):
            return self.denoise(x_t, t, embeds)
        uncond, cond = self.denoise(torch.cat([x_t, x_t]), t, embeds.with_negative_first()).chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def denoise(self, x: Tensor, t: Tensor, embeds: PromptEmbeds) -> Tensor:
        """One UNet call on the conditioning in `embeds.cond` (and SDXL's pooled/time_ids), no guidance."""
        added = {"text_embeds": embeds.pooled, "time_ids": embeds.time_ids} if self.is_xl else None
        out = self.unet(
            x.to(self.dtype), t, encoder_hidden_states=embeds.cond, added_cond_kwargs=added, return_dict=False
        )
        return out[0]

    # --- pixels <-> latents -------------------------------------------------------------------------
    def _latent_stats(self, latents: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """(mean, std) the VAE's latents are normalised by before scaling: per-channel stats where the config
        has them, SD3/FLUX's scalar `shift_factor` (std 1), else none (SD: (0, 1))."""
        config = self.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is None or std is None:
            return getattr(config, "shift_factor", None) or 0.0, 1.0
        shape = (1, -1, 1, 1)
        return torch.tensor(mean).view(shape).to(latents), torch.tensor(std).view(shape).to(latents)

    def _vae_precision(self):
        """Autocast off while a VAE runs in float32 on purpose (Wan's; SDXL's fp16 upcast): under
        mixed-precision training autocast would run its convolutions in half precision again."""
        return torch.autocast(self.vae.device.type, enabled=False)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1]; differentiable (clamped as in diffusers)."""
        upcast = self.vae.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False)
        vae_dtype = torch.float32 if upcast else self.vae.dtype
        mean, std = self._latent_stats(latents)
        z = latents * std / self.vae.config.scaling_factor + mean
        if upcast:  # SDXL's VAE overflows in fp16: decode a float32 copy instead of converting in place
            with self._vae_precision():
                image = self.vae.float().decode(z.to(vae_dtype), return_dict=False)[0]
            self.vae.to(torch.float16)
        else:
            image = self.vae.decode(z.to(vae_dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> scaled latents (B, C, h, w), sampled from the VAE posterior."""
        upcast = self.vae.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False)
        if upcast:  # as in decode: SDXL's VAE overflows in fp16, so a float32 copy encodes
            self.vae.float()
        try:
            with self._vae_precision() if upcast else nullcontext():
                dist = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist
            mean, std = self._latent_stats(dist.mean)
            return (dist.sample(generator) - mean) * self.vae.config.scaling_factor / std
        finally:
            if upcast:
                self.vae.to(torch.float16)

    def latent_shape(self, batch_size: int, size: tuple[int, int] | None = None) -> tuple[int, ...]:
        """(B, C, H/f, W/f) for images of `size` (height, width; None = the model's default)."""
        height, width = size or self.default_size()
        f = self.vae_scale_factor
        return batch_size, self.unet.config.in_channels, height // f, width // f

    def initial_noise(
        self,
        batch_size: int,
        generator=None,
        size: tuple[int, int] | None = None,
        *,
        sigma: float | None = None,
        **shape_options,
    ) -> Tensor:
        """x_T ~ N(0, sigma^2 I) of `latent_shape(batch_size, size, **shape_options)`, drawn exactly as the
        diffusers pipelines draw it, so the same generator gives the same image as `pipe(...)`. `generator`
        may be a list (one per sample); sigma: None = the scheduler's `init_noise_sigma` (1.0 gives ReNO's
        standard-normal z)."""
        shape = self.latent_shape(batch_size, size, **shape_options)
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        return noise * (self.scheduler.init_noise_sigma if sigma is None else sigma)

    # --- memory -------------------------------------------------------------------------------------
    def enable_memory_options(
        self,
        gradient_checkpointing=False,
        vae_slicing=False,
        vae_tiling=False,
        attention="sdpa",
        offload_text_encoders=False,
    ) -> None:
        if offload_text_encoders:
            self.offload_text_encoders = True
            for module in self.text_encoders():
                module.to("cpu")
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if vae_slicing:
            self.vae.enable_slicing()
        if vae_tiling:
            self.vae.enable_tiling()
        if attention == "xformers":
            from diffusion_align.errors import UserError

            try:
                import xformers  # noqa: F401
            except ImportError as e:
                raise UserError(
                    "model.attention=xformers but xformers is not installed: "
                    "pip install 'diffusion-align[xformers]' or use model.attention=sdpa"
                ) from e
            self.unet.enable_xformers_memory_efficient_attention()
