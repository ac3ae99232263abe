"""Wan 2.1 text-to-video (`WanPipeline`, T2V 1.3B / 14B) as a flow backbone: a 3-D DiT predicting the flow
velocity on (B, C, T, h, w) video latents, UMT5 text, a causal 3-D VAE (`AutoencoderKLWan`).

Built as `SD3Backbone` is (one classifier-free guidance in `StableDiffusionBackbone.predict`, flow noise at
sigma 1) with the video conventions of `video.VideoBackbone` (latents (B, C, T, h, w), videos
(B, T, 3, H, W) in [0, 1], `is_video`, `num_frames`, `grad_decode_frames`).

The scheduler: the Wan checkpoints ship `UniPCMultistepScheduler` with `flow_shift` (3.0 for 480p). Our
sampler (`math.flow_samplers.FlowMatchSampler`) is the Euler flow ODE/SDE, so the backbone samples on a
`FlowMatchEulerDiscreteScheduler` with the same shift (`flow_shift` -> `shift`); its outputs equal
`WanPipeline` with that Euler scheduler swapped in (tested), not with UniPC (a different, multistep
solver on slightly different sigmas). The pipeline's own `scheduler` is left as loaded.

Frame subsets: Wan's VAE decodes latent frame by latent frame with a causal cache (each pixel frame depends
on every earlier latent frame), so decoding a subset of latent frames is not exact. `decode` always decodes
every frame and then picks `frames`: the reward sees only those, but memory is that of a full decode.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor

from diffusion_align.engine.backbones.sd3 import SD3Backbone
from diffusion_align.engine.backbones.stable_diffusion import PromptEmbeds, text_encoders_on_device
from diffusion_align.errors import UserError

# WanPipeline's call defaults (480p, 81 frames: the models' training length)
DEFAULT_SIZE = (480, 832)
DEFAULT_NUM_FRAMES = 81


def euler_flow_scheduler(scheduler) -> FlowMatchEulerDiscreteScheduler:
    """The Euler flow scheduler with the shift of the pipeline's scheduler: itself when it is already one,
    else (Wan's `UniPCMultistepScheduler`) `FlowMatchEulerDiscreteScheduler(shift=flow_shift)`."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return scheduler
    config = scheduler.config
    if config.get("prediction_type") != "flow_prediction" or "flow_shift" not in config:
        raise UserError(
            f"{type(scheduler).__name__} of this Wan pipeline is not a flow scheduler (no flow_shift / "
            "flow_prediction): use a Wan 2.1 Diffusers checkpoint such as Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
        )
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=config.get("num_train_timesteps", 1000), shift=config["flow_shift"]
    )


class WanBackbone(SD3Backbone):
    """The `backbones.protocol.Backbone` of Wan 2.1 T2V; `unet` is the pipeline's `WanTransformer3DModel`.

    num_frames: clip length T drawn by `initial_noise` (None = the pipeline's `default_num_frames` attribute
    if set, as on tiny-wan, else 81). grad_decode_frames: under gradient with no explicit `frames`, `decode`
    returns only this many random frames per video (selected after a full decode, see the module note).
    """

    # diffusers' Wan LoRA scripts and flow_grpo's Wan training: the attention projections (self- and
    # cross-attention of every block)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    lora_prefix = "transformer"
    max_sequence_length = 512  # UMT5 tokens: the pipeline call's default (its encode_prompt defaults to 226)
    is_video = True
    # diffusers' Wan examples load the VAE in float32 beside a bfloat16 transformer: its decoder in half
    # precision degrades the video (decode and encode cast latents and pixels to the VAE's dtype)
    float32_components = ("vae",)

    def __init__(
        self, pipe, num_frames: int | None = None, grad_decode_frames: int | None = None, seed: int = 0
    ):
        if getattr(pipe, "transformer_2", None) is not None or pipe.config.get("expand_timesteps", False):
            raise UserError(
                "this WanPipeline is a Wan 2.2 model (two experts or per-token timesteps); only Wan 2.1 "
                "text-to-video is supported (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers)"
            )
        self.pipe = pipe
        self.unet = pipe.transformer
        self.vae = pipe.vae
        self.scheduler = euler_flow_scheduler(pipe.scheduler)
        self.is_xl = False
        self.vae_scale_factor = pipe.vae_scale_factor_spatial
        self.temporal_factor = pipe.vae_scale_factor_temporal
        self.num_frames = int(num_frames or getattr(pipe, "default_num_frames", DEFAULT_NUM_FRAMES))
        self.grad_decode_frames = grad_decode_frames
        self.frame_generator = torch.Generator().manual_seed(seed)  # draws of the grad-time frame subsets
        for module in self.frozen_modules():
            module.requires_grad_(False)

    def default_size(self) -> tuple[int, int]:
        """(height, width) of the pipeline's call default (480 x 832); tiny-wan sets `default_size`."""
        return tuple(getattr(self.pipe, "default_size", DEFAULT_SIZE))

    # --- text ---------------------------------------------------------------------------------------
    @torch.no_grad()
    @text_encoders_on_device
    def encode_prompts(
        self, prompts: list[str], negative_prompt: str | None = None, guidance: bool = True, size=None
    ) -> PromptEmbeds:
        """UMT5 states (B, 512, D) through the pipeline's `encode_prompt` (zeroed after each prompt's
        tokens), and the negatives ("" when none is given, as the pipeline) when `guidance`; cast to the
        transformer's dtype as the pipeline casts them."""
        negative = None if negative_prompt is None else [negative_prompt] * len(prompts)
        cond, uncond = self.pipe.encode_prompt(
            prompt=prompts,
            negative_prompt=negative,
            do_classifier_free_guidance=guidance,
            max_sequence_length=self.max_sequence_length,
            device=self.device,
        )
        return PromptEmbeds(
            cond=cond.to(self.dtype), uncond=None if uncond is None else uncond.to(self.dtype)
        )

    # --- denoiser -----------------------------------------------------------------------------------
    def denoise(self, x: Tensor, t: Tensor, embeds: PromptEmbeds) -> Tensor:
        """The velocity at x (B, C, T, h, w), timestep t (sigma * 1000, as the pipeline's
        `t.expand(B)`: scalar or (B,)), no guidance."""
        timestep = t.expand(x.shape[0]) if t.ndim == 0 else t
        return self.unet(
            hidden_states=x.to(self.dtype),
            timestep=timestep,
            encoder_hidden_states=embeds.cond,
            return_dict=False,
        )[0]

    def schedule(self, num_steps: int, size: tuple[int, int] | None = None) -> dict:
        """No extra `set_timesteps` arguments: Wan 2.1's shift is static (`shift` in the scheduler)."""
        return {}

    # --- latents ------------------------------------------------------------------------------------
    def latent_frames(self, num_frames: int) -> int:
        """Latent frames of a T-frame clip: the first frame alone, then one per `temporal_factor` frames."""
        return (num_frames - 1) // self.temporal_factor + 1

    def latent_shape(
        self, batch_size: int, size: tuple[int, int] | None = None, num_frames: int | None = None
    ) -> tuple[int, ...]:
        """(B, C, (T - 1) // 4 + 1, H / 8, W / 8), as `WanPipeline.prepare_latents`."""
        height, width = size or self.default_size()
        f = self.vae_scale_factor
        t = self.latent_frames(num_frames or self.num_frames)
        return batch_size, self.unet.config.in_channels, t, height // f, width // f

    def initial_noise(self, batch_size: int, generator=None, size=None, *, sigma=None, **shape) -> Tensor:
        """x_T as `WanPipeline.prepare_latents` draws it (float32 whatever the model dtype, so the same
        generator gives the same video), cast to the model's dtype, times sigma (None = 1)."""
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor(
            self.latent_shape(batch_size, size, **shape),
            generator=generator,
            device=self.device,
            dtype=torch.float32,
        )
        return (noise * (1.0 if sigma is None else sigma)).to(self.dtype)

    # --- pixels <-> latents -------------------------------------------------------------------------
    def _wan_stats(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(config.latents_std).view(shape).to(latents.device, latents.dtype)
        return mean, std

    def decode(self, latents: Tensor, frames: Tensor | list[int] | None = None) -> Tensor:
        """Latents (B, C, t, h, w) -> video (B, S, 3, H, W) in [0, 1], differentiable: every frame is
        decoded (Wan's VAE is causal in time), then `frames` picks S of them (None = all, or
        `grad_decode_frames` random ones under gradient; a list / (S,) tensor shared by every video; or
        (B, S) per video). Normalised as `WanPipeline`: z = latents / (1 / latents_std) + latents_mean."""
        mean, std = self._wan_stats(latents.to(self.vae.dtype))
        z = latents.to(self.vae.dtype) / (1.0 / std) + mean
        with self._vae_precision():
            video = self.vae.decode(z, return_dict=False)[0]  # (B, 3, T, H, W) in [-1, 1]
        video = (video.float() / 2 + 0.5).clamp(0, 1).transpose(1, 2)
        b, t = video.shape[:2]
        if frames is None and self.grad_decode_frames and torch.is_grad_enabled() and latents.requires_grad:
            from rewards.video import select_frames

            frames = select_frames(b, t, "random", self.grad_decode_frames, self.frame_generator)
        if frames is None:
            return video
        idx = torch.as_tensor(frames, device=video.device, dtype=torch.long)
        if idx.ndim == 1:
            return video[:, idx]
        return video[torch.arange(b, device=video.device)[:, None], idx]

    def encode(self, videos: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Videos (B, T, 3, H, W) in [0, 1] -> normalised latents (B, C, t, h, w) from the VAE posterior:
        (z - latents_mean) / latents_std, the inverse of `decode`."""
        pixels = (videos.transpose(1, 2) * 2 - 1).to(self.vae.dtype)
        with self._vae_precision():
            z = self.vae.encode(pixels).latent_dist.sample(generator)
        mean, std = self._wan_stats(z)
        return (z - mean) / std

    def load_lora(self, directory: str) -> None:
        """Load a diffusers-format LoRA folder for sampling through diffusers' own Wan loader."""
        self.pipe.load_lora_weights(directory)

    # --- memory -------------------------------------------------------------------------------------
    def enable_memory_options(self, gradient_checkpointing=False, attention="sdpa", **options) -> None:
        if attention == "xformers":
            raise UserError("model.attention=xformers is not supported by Wan: use model.attention=sdpa")
        super().enable_memory_options(gradient_checkpointing, attention=attention, **options)
