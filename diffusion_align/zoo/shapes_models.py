"""Architectures of the bundled shapes models, sized for the 30 MB fp16 budget and a 2-core CPU.

Sizes (parameters): VAE ~0.95M, CLIP ~3.6M text (3.2M of it the 49408 x 64 token embedding) + 0.15M
vision, UNet ~4.2M. The pipeline's text encoder is a copy of the CLIP text tower.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from diffusion_align.testing import SD_SCHEDULER_CONFIG
from rewards.tokenizers import CLIP_VOCAB_SIZE

TEXT_WIDTH = 64
# OpenAI CLIP normalisation, so generic CLIP-reward code that hard-codes it stays right.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_vae() -> AutoencoderKL:
    # Three blocks = two downsamplings: 32x32x3 images <-> 8x8x4 latents (factor 4).
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )


def build_clip() -> CLIPModel:
    # Token ids of the real CLIP tokenizer: bos 49406, eos = pad 49407 (pooling takes the first eos).
    text = dict(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    vision = dict(
        image_size=32,
        patch_size=4,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
    )
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))


def clip_image_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def build_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SD_SCHEDULER_CONFIG)


# --- shapes-flow: the same world as an SD3-style flow model -------------------------------------------
FLOW_WIDTH = 128  # transformer width = the two CLIP towers' states side by side (2 x TEXT_WIDTH)
FLOW_CLIP_TOKENS = 16  # CLIP context (the longest shapes caption is 14 tokens with bos/eos): 16, not 77
FLOW_T5_TOKENS = 1  # there is no T5: the pipeline feeds `max_sequence_length` zero rows in its place


def build_flow_transformer():
    """An MMDiT (SD3's `SD3Transformer2DModel`) of 4 joint blocks at width 128 on 8x8x4 latents: 16 image
    tokens (patch 2) beside 16 + 1 text tokens; about 2.5M parameters, RMS-normed q/k as in SD3.5."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=FLOW_WIDTH // 32,
        joint_attention_dim=FLOW_WIDTH,
        caption_projection_dim=FLOW_WIDTH,
        pooled_projection_dim=2 * TEXT_WIDTH,  # both CLIP projections (projection_dim = TEXT_WIDTH)
        pos_embed_max_size=16,  # up to 64 px images
        qk_norm="rms_norm",
    )


def build_flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # SD3/SD3.5's static shift
