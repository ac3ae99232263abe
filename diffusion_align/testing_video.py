"""Tiny real text-to-video pipelines, built offline from configs and seeded.

- `tiny_animatediff`: an SD-1.x-shaped UNet2DConditionModel plus a MotionAdapter, which AnimateDiffPipeline
  turns into a `UNetMotionModel` (the same path as loading SD 1.5 + `guoyww/animatediff-motion-adapter`).
- `tiny_t2v`: a `UNet3DConditionModel` in a `TextToVideoSDPipeline` (ModelScope / VADER-ModelScope family).

Both use the real CLIP tokenizer and the tiny VAE of `diffusion_align.testing` (32x32 frames, 16x16 latents)
and a DDIM scheduler with `steps_offset=1` (see the note in testing.py). `default_num_frames = 4` keeps CPU
tests fast; real checkpoints default to 16 frames (what both families were trained on).

Usable from configs: `model.pretrained: tiny-animatediff` or `tiny-t2v`.
"""

from __future__ import annotations

import torch
from diffusers import (
    AnimateDiffPipeline,
    DDIMScheduler,
    MotionAdapter,
    TextToVideoSDPipeline,
    UNet2DConditionModel,
    UNet3DConditionModel,
)
from transformers import CLIPTextModel

from diffusion_align.testing import SD_SCHEDULER_CONFIG, TINY_UNET, _text_config, _tiny_vae
from rewards.tokenizers import clip_tokenizer

TINY_NUM_FRAMES = 4
# guoyww/animatediff inference config: linear betas over the SD range (SD itself uses scaled_linear).
ANIMATEDIFF_SCHEDULER_CONFIG = {**SD_SCHEDULER_CONFIG, "beta_schedule": "linear"}


def tiny_animatediff(seed: int = 0) -> AnimateDiffPipeline:
    """A seeded AnimateDiff pipeline: SD-shaped UNet + motion modules, (B, 4, T, 16, 16) latents."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **TINY_UNET,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    adapter = MotionAdapter(
        block_out_channels=(16, 32),
        motion_layers_per_block=1,
        motion_norm_num_groups=8,
        motion_num_attention_heads=2,
        motion_max_seq_length=32,
    )
    pipe = AnimateDiffPipeline(
        unet=unet,
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_text_config(32)),
        tokenizer=clip_tokenizer(),
        motion_adapter=adapter,
        scheduler=DDIMScheduler(**ANIMATEDIFF_SCHEDULER_CONFIG),
        feature_extractor=None,
        image_encoder=None,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.default_num_frames = TINY_NUM_FRAMES
    return pipe


def tiny_t2v(seed: int = 0) -> TextToVideoSDPipeline:
    """A seeded ModelScope-shaped TextToVideoSD pipeline: UNet3DConditionModel, (B, 4, T, 16, 16) latents."""
    torch.manual_seed(seed)
    unet = UNet3DConditionModel(
        **TINY_UNET,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    pipe = TextToVideoSDPipeline(
        unet=unet,
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_text_config(32)),
        tokenizer=clip_tokenizer(),
        scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG),
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.default_num_frames = TINY_NUM_FRAMES
    return pipe


TINY_VIDEO_PIPELINES = {"tiny-animatediff": tiny_animatediff, "tiny-t2v": tiny_t2v}
