"""Tiny real flow-matching pipelines (SD3, FLUX.1 and Wan 2.1 T2V), built offline from configs and seeded.

Real diffusers/transformers classes with tiny widths, so the SD3/FLUX code paths a hub checkpoint takes (two
CLIP encoders + T5 for SD3, CLIP + T5 for FLUX, packed latents, shifted flow schedules) run on a CPU in
seconds. There is no hub here, so the T5 tokenizer is a character-level `tokenizers` model built in code
(real T5 uses SentencePiece; the pipelines only need pad/eos ids, max-length padding and truncation, and
characters keep different prompts different).

Schedulers mirror the real configs: SD3/SD3.5 use a static shift of 3; FLUX.1-dev shifts by resolution
(`use_dynamic_shifting`, base/max shift 0.5/1.15) and embeds the guidance scale. Widths are chosen so the
pipelines' own reshapes are exact: SD3 pads the concatenated CLIP states (16 + 16) to the T5 width (32).

Wan 2.1 (`tiny-wan`): a UMT5 encoder on the same character tokenizer, a 3-D DiT of 2 blocks and a causal
3-D VAE (factor 4 in time, 8 in space) with Wan's latents_mean/std; 5-frame 32x32 clips (2 x 4 x 4
latents). Its scheduler is the Euler flow one with Wan 2.1's 480p shift 3 (the real checkpoints ship UniPC
with flow_shift 3; `engine.backbones.wan` samples on the Euler equivalent either way).

Usable from configs: `model.pretrained: tiny-sd3`, `tiny-flux` or `tiny-wan`.
"""

from __future__ import annotations

import string
from functools import lru_cache

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

from diffusion_align.testing import _text_config, _tiny_vae
from rewards.tokenizers import clip_tokenizer

T5_CHARS = string.ascii_lowercase + string.digits + string.punctuation + " "  # one token each
# stabilityai/stable-diffusion-3(.5)-medium scheduler settings
SD3_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)
# black-forest-labs/FLUX.1-dev scheduler settings (schnell: shift 1.0, no dynamic shifting)
FLUX_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers: flow_shift 3 (480p) of its UniPC scheduler, as the Euler shift
WAN_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)


@lru_cache(maxsize=1)
def _t5_tokenizer_object():
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {c: i + 3 for i, c in enumerate(T5_CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tok


def t5_tokenizer(model_max_length: int = 512):
    """A T5-style fast tokenizer (pad 0, eos 1 appended, unk 2; one token per character), no download."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_t5_tokenizer_object(),
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def _t5(d_model: int = 32) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=len(T5_CHARS) + 3,
            d_model=d_model,
            d_kv=8,
            d_ff=2 * d_model,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            dropout_rate=0.0,  # built in train mode; dropout would make every encoding differ
        )
    ).eval()


def _flow_vae(latent_channels: int, shift_factor: float, scaling_factor: float) -> AutoencoderKL:
    # As the SD3/FLUX VAEs: no quant convs, latents normalised by a shift and a scale. Factor 2: 32 -> 16.
    return _tiny_vae(
        latent_channels=latent_channels,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
    )


def tiny_sd3(seed: int = 0) -> StableDiffusion3Pipeline:
    """A seeded SD3.5-shaped pipeline: MMDiT-X of 2 joint blocks (the first with dual attention), 32x32
    images, 16x16x4 latents, two CLIPs and T5."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,  # the T5 width
        caption_projection_dim=16,
        pooled_projection_dim=32,  # two CLIP projections of 16
        pos_embed_max_size=16,
        qk_norm="rms_norm",  # SD3.5's additions: RMS-normed q/k and a second (self-)attention in
        dual_attention_layers=(0,),  # the first blocks (MMDiT-X)
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG),
        vae=_flow_vae(4, shift_factor=0.0609, scaling_factor=1.5305),  # SD3's VAE normalisation
        text_encoder=CLIPTextModelWithProjection(_text_config(16, projection_dim=16)),
        tokenizer=clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(16, projection_dim=16)),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5(32),
        tokenizer_3=t5_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux(seed: int = 0, guidance_embeds: bool = True) -> FluxPipeline:
    """A seeded FLUX.1-shaped pipeline (dev-like: guidance embedding and resolution shift; schnell-like with
    `guidance_embeds=False`): 1 double + 1 single block, 32x32 images, 16x16x4 latents packed to 64 x 16."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x a 2x2 patch
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # the T5 width
        pooled_projection_dim=32,  # the CLIP width
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )
    scheduler_config = FLUX_SCHEDULER_CONFIG
    if not guidance_embeds:
        scheduler_config = {**FLUX_SCHEDULER_CONFIG, "shift": 1.0, "use_dynamic_shifting": False}
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**scheduler_config),
        vae=_flow_vae(4, shift_factor=0.1159, scaling_factor=0.3611),  # FLUX's VAE normalisation
        text_encoder=CLIPTextModel(_text_config(32)),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_t5(32),
        tokenizer_2=t5_tokenizer(),
    )
    pipe.default_sample_size = 16  # FluxPipeline hard-codes 128 (1024 px); ours is made for 32 px
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_wan(seed: int = 0) -> WanPipeline:
    """A seeded Wan 2.1 T2V-shaped pipeline: 2 DiT blocks (self-attention with RMS q/k norm across heads,
    cross-attention to UMT5), 5-frame 32x32 clips, 16-channel latents of 2 x 4 x 4."""
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,  # the UMT5 width
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(  # Wan's default latents_mean/std stay in the config
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(T5_CHARS) + 3,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            dropout_rate=0.0,
        )
    ).eval()
    pipe = WanPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=text_encoder,
        vae=vae.eval(),
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**WAN_SCHEDULER_CONFIG),
    )
    pipe.default_size = (32, 32)  # WanPipeline's call defaults are 480 x 832 and 81 frames
    pipe.default_num_frames = 5
    pipe.set_progress_bar_config(disable=True)
    return pipe


TINY_FLOW_PIPELINES = {"tiny-sd3": tiny_sd3, "tiny-flux": tiny_flux, "tiny-wan": tiny_wan}
