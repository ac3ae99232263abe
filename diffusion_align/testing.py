"""Tiny real Stable Diffusion pipelines, built offline from configs and seeded.

They use the real diffusers/transformers classes and the real CLIP tokenizer (built from the BPE file
open_clip ships), so every code path a user hits with a hub checkpoint is exercised on a CPU in seconds.
Scheduler values mirror the real SD 1.5 / SDXL configs, notably `steps_offset=1`: with 0 the last DDIM
step is the identity (alpha_prev == alpha_t) and a last-step gradient window would be exactly zero.

Usable from configs: `model.pretrained: tiny-sd` or `tiny-sdxl`. The video ones (testing_video.py) build on
this module; imports run one way, testing_video -> testing, and `backbones` looks names up in both tables.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from rewards.tokenizers import CLIP_VOCAB_SIZE, clip_tokenizer

# The runwayml/stable-diffusion-v1-5 and SDXL-base scheduler settings (DDIM variant).
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def _text_config(hidden_size: int, projection_dim: int = 32) -> CLIPTextConfig:
    tok = clip_tokenizer()
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_attention_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        hidden_act="quick_gelu",
    )


def _tiny_vae(**overrides) -> AutoencoderKL:
    # Two blocks: downsample factor 2, so 32x32 images have 16x16 latents.
    return AutoencoderKL(
        **{
            "block_out_channels": (8, 16),
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2,
            "latent_channels": 4,
            "norm_num_groups": 4,
            "sample_size": 32,
            **overrides,
        }
    )


# The UNet size every tiny pipeline shares (2D and 3D): 16x16x4 latents, two levels.
TINY_UNET = dict(
    block_out_channels=(16, 32),
    layers_per_block=1,
    sample_size=16,
    in_channels=4,
    out_channels=4,
    norm_num_groups=8,
)


def tiny_sd(seed: int = 0, prediction_type: str = "epsilon") -> StableDiffusionPipeline:
    """A seeded SD-1.x-shaped pipeline: 32x32 images, 16x16x4 latents, ~2.4M parameters."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **TINY_UNET,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    vae = _tiny_vae()
    text_encoder = CLIPTextModel(_text_config(32))
    scheduler = DDIMScheduler(**{**SD_SCHEDULER_CONFIG, "prediction_type": prediction_type})
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    """A seeded SDXL-shaped pipeline: two text encoders, pooled text embeds and added time ids."""
    torch.manual_seed(seed)
    time_embed_dim, pooled_dim = 8, 32
    unet = UNet2DConditionModel(
        **TINY_UNET,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_dim,
        cross_attention_dim=64,  # 32 (text_encoder) + 32 (text_encoder_2), concatenated
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_text_config(32)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(32, projection_dim=pooled_dim)),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG),
        image_encoder=None,
        feature_extractor=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


TINY_PIPELINES = {"tiny-sd": tiny_sd, "tiny-sdxl": tiny_sdxl}
