"""Text-to-video backbones: AnimateDiff (SD 1.5 UNet + MotionAdapter as a `UNetMotionModel`) and
TextToVideoSD (ModelScope's `UNet3DConditionModel`), built from a diffusers pipeline's public parts.

Same behaviour API as `StableDiffusionBackbone`, with a frame axis:
- latents are (B, C, T, h, w), the layout both diffusers pipelines use, so `initial_noise` with the same
  generator gives the same x_T as `pipe(...)` and the one loop in rollout.py reproduces the pipelines;
- videos are (B, T, 3, H, W) in [0, 1] (the pipelines' `output_type="pt"` layout);
- `decode(latents, frames=...)` decodes only some frames: the SD VAE decodes frames independently, so a
  subset costs a fraction of a full decode and gives exactly the same pixels (VADER's `decode_frame`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_align.engine.backbones.stable_diffusion import PromptEmbeds, StableDiffusionBackbone
from diffusion_align.errors import UserError

# Both families were trained on 16-frame clips; the diffusers pipelines default to 16 too.
DEFAULT_NUM_FRAMES = 16


class VideoBackbone(StableDiffusionBackbone):
    """encode_prompts / predict / decode / encode / initial_noise over AnimateDiff or TextToVideoSD.

    num_frames: clip length T drawn by `initial_noise` (None = the pipeline's `default_num_frames` attribute
    if set, as on the tiny test pipelines, else 16). Any T works afterwards: `predict` reads it from x_t.
    grad_decode_frames: when `decode` runs with gradient (reward backprop) and no explicit `frames`, decode
    only this many random frames per video (VADER's `decode_frame=-1` is 1); None = all frames. Sampling,
    collection and evaluation (no gradient) always decode every frame.
    """

    is_video = True

    def __init__(
        self, pipe, num_frames: int | None = None, grad_decode_frames: int | None = None, seed: int = 0
    ):
        super().__init__(pipe)
        self.is_xl = False
        # UNetMotionModel runs its 2-D layers on (B*T) frames and expects one text embedding per frame;
        # UNet3DConditionModel repeats the (B, L, D) embeddings over frames itself.
        self.text_per_frame = type(self.unet).__name__ == "UNetMotionModel"
        self.num_frames = int(num_frames or getattr(pipe, "default_num_frames", DEFAULT_NUM_FRAMES))
        self.grad_decode_frames = grad_decode_frames
        self.frame_generator = torch.Generator().manual_seed(seed)  # draws of the grad-time frame subsets

    # --- denoiser -----------------------------------------------------------------------------------
    def denoise(self, x: Tensor, t: Tensor, embeds: PromptEmbeds) -> Tensor:
        """One UNet call on x (B, C, T, h, w), no guidance (`predict`, inherited, adds it)."""
        hidden = embeds.cond
        if self.text_per_frame:  # as AnimateDiffPipeline does: frame-major repeat of each video's embedding
            hidden = hidden.repeat_interleave(x.shape[2], dim=0)
        return self.unet(x.to(self.dtype), t, encoder_hidden_states=hidden, return_dict=False)[0]

    # --- pixels <-> latents -------------------------------------------------------------------------
    def decode(
        self, latents: Tensor, frames: Tensor | list[int] | None = None, chunk_size: int = 16
    ) -> Tensor:
        """Latents (B, C, T, h, w) -> video (B, S, 3, H, W) in [0, 1]. Differentiable.

        frames: None = all T frames (S = T), or `grad_decode_frames` random ones under gradient; a list /
        (S,) tensor of frame indices shared by every video; or (B, S) indices per video (e.g.
        `rewards.video.select_frames`). Only those frames go through the VAE.
        chunk_size: frames per VAE call (bounds peak memory as the pipelines' `decode_chunk_size` does).
        """
        b = latents.shape[0]
        per_frame = latents.transpose(1, 2)  # (B, T, C, h, w)
        if frames is None and self.grad_decode_frames and torch.is_grad_enabled() and latents.requires_grad:
            from rewards.video import select_frames

            k = self.grad_decode_frames
            frames = select_frames(b, latents.shape[2], "random", k, self.frame_generator)
        if frames is not None:
            idx = torch.as_tensor(frames, device=latents.device, dtype=torch.long)
            if idx.ndim == 1:
                per_frame = per_frame[:, idx]
            else:
                per_frame = per_frame[torch.arange(b, device=latents.device)[:, None], idx]
        s = per_frame.shape[1]
        flat = per_frame.flatten(0, 1)
        images = torch.cat([super(VideoBackbone, self).decode(c) for c in flat.split(chunk_size)])
        return images.view(b, s, *images.shape[1:])

    def encode(self, videos: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Videos (B, T, 3, H, W) in [0, 1] -> scaled latents (B, C, T, h, w) from the VAE posterior."""
        b, t = videos.shape[:2]
        latents = super().encode(videos.flatten(0, 1), generator)
        return latents.view(b, t, *latents.shape[1:]).transpose(1, 2)

    def latent_shape(
        self, batch_size: int, size: tuple[int, int] | None = None, num_frames: int | None = None
    ) -> tuple[int, ...]:
        """(B, C, T, H/f, W/f), the layout AnimateDiffPipeline / TextToVideoSDPipeline draw x_T in, so
        `initial_noise(..., num_frames=T)` with the same generator gives the same video as `pipe(...)`."""
        b, c, h, w = super().latent_shape(batch_size, size)
        return b, c, num_frames or self.num_frames, h, w

    # --- LoRA for sampling ---------------------------------------------------------------------------
    def load_lora(self, directory: str) -> None:
        """Load a diffusers-format LoRA folder (`pytorch_lora_weights.safetensors`, as `train` saves it).

        AnimateDiff goes through diffusers' own `load_lora_weights`. TextToVideoSD's UNet3DConditionModel has
        no diffusers LoRA loader, so the same peft layers are attached as in training (rank, alpha and target
        modules from the file's adapter metadata, else inferred from its weights) and the weights loaded.
        """
        if hasattr(self.unet, "load_lora_adapter"):
            self.pipe.load_lora_weights(directory)
            return
        from diffusion_align.engine.policy import Policy

        state, _, metadata = type(self.pipe).lora_state_dict(directory, return_lora_metadata=True)
        metadata = {k.removeprefix("unet."): v for k, v in (metadata or {}).items()}
        downs = {k: v for k, v in state.items() if k.endswith(("lora.down.weight", "lora_A.weight"))}
        if not downs:
            raise UserError(f"LoRA at {directory} has no UNet LoRA weights")
        rank = int(metadata.get("r") or next(iter(downs.values())).shape[0])
        targets = metadata.get("target_modules") or sorted({_module_name(k) for k in downs})
        Policy(
            self, None, rank=rank, alpha=metadata.get("lora_alpha") or rank, target_modules=targets
        ).load_lora(directory)

    # --- memory -------------------------------------------------------------------------------------
    def enable_memory_options(self, gradient_checkpointing=False, **options) -> None:
        if gradient_checkpointing and not self.unet._supports_gradient_checkpointing:
            raise UserError(
                f"model.gradient_checkpointing=true is not supported by {type(self.unet).__name__}; set it "
                "to false and use the strategy's per-step checkpointing of the gradient window instead"
            )
        super().enable_memory_options(gradient_checkpointing, **options)


def _module_name(lora_key: str) -> str:
    """'unet.<path>.attn1.to_out.0.lora.down.weight' -> 'to_out.0' (a peft target_modules entry)."""
    parts = lora_key.split(".lora")[0].split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]
