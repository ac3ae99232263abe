"""What the engine needs from a model family: the `Backbone` protocol.

`rollout`, the policy, the strategies, ReNO and the search baselines use only these members, so a new family
(SD3, FLUX, Wan) is one new module implementing them, registered in `backbones/__init__.py`. Images and
videos are float tensors in [0, 1]; latents are whatever the family's VAE and denoiser use ((B, C, h, w) for
SD/SDXL, (B, C, T, h, w) for video). The sampler (`samplers.Sampler`) turns the denoiser's output into the
next latent; the backbone never steps the chain itself.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class Backbone(Protocol):
    pipe: object  # the diffusers pipeline the parts come from (LoRA saving/loading goes through its class)
    unet: torch.nn.Module  # the denoiser LoRA is attached to (a transformer for DiT families)
    scheduler: object  # the pipeline's diffusers scheduler: the noise schedule samplers are built on
    lora_targets: tuple[str, ...]  # default LoRA target modules of the denoiser (config may override)
    lora_prefix: str  # the denoiser's name in diffusers LoRA files: "unet", or "transformer" for DiTs
    device: torch.device
    dtype: torch.dtype

    def encode_prompts(self, prompts: list[str], negative_prompt=None, guidance: bool = True, size=None):
        """Frozen text encoders -> the family's `PromptEmbeds` for B prompts (negatives when `guidance`)."""

    def latent_shape(self, batch_size: int, size=None, **options) -> tuple[int, ...]:
        """The latent shape of `batch_size` samples at `size` (height, width); video adds num_frames."""

    def initial_noise(self, batch_size: int, generator=None, size=None, *, sigma=None, **shape) -> Tensor:
        """x_T of `latent_shape(batch_size, size, **shape)` drawn as the family's pipeline draws it (same
        generator, same image as `pipe(...)`), times sigma (None = the scheduler's init_noise_sigma)."""

    def predict(self, x_t: Tensor, t: Tensor, embeds, guidance_scale: float) -> Tensor:
        """The denoiser's output at t, with the family's guidance (classifier-free for SD/SDXL/video, in
        `StableDiffusionBackbone.predict` only; distilled guidance for FLUX)."""

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> pixels in [0, 1], differentiable (reward backprop)."""

    def encode(self, images: Tensor, generator=None) -> Tensor:
        """Pixels in [0, 1] -> latents (offline data, the bundled model's recipe)."""

    def default_size(self) -> tuple[int, int]:
        """(height, width) the model was trained at."""

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Every module of the base model (kept frozen; LoRA adds the trainable weights)."""

    def enable_memory_options(self, gradient_checkpointing=False, vae_slicing=False, vae_tiling=False,
                              attention="sdpa", offload_text_encoders=False) -> None:  # fmt: skip
        """Trade compute for memory (activation checkpointing, sliced/tiled VAE, attention kernel, text
        encoders kept on the CPU between prompt encodings)."""
