"""ImageReward (Xu et al. 2023): BLIP ViT image tokens cross-attended by a BERT text encoder, [CLS] -> MLP.

`forward(images (B, 3, H, W) in [0, 1], prompts) -> (B,)` float32 standardised scores
`(mlp(cls) - 0.16717362830052426) / 1.0333394966054072` (roughly N(0, 1) over their benchmark),
differentiable w.r.t. images. Built on transformers (`BlipVisionModel`, `BlipTextModel`) instead of the
`image-reward` package, whose pins conflict with current timm/transformers. Checkpoint: hub repo
`THUDM/ImageReward`, `ImageReward.pt` (keys `blip.visual_encoder.*` in timm ViT naming,
`blip.text_encoder.*` in BERT naming, `mlp.layers.*`) and `med_config.json` (the BERT config); the
tokenizer is `bert-base-uncased` plus `[DEC]` (bos) and `[ENC]`, as ImageReward's `init_tokenizer`.
Preprocessing: Resize(224, bicubic) + CenterCrop(224) + OpenAI CLIP mean/std; prompts padded to 35 tokens.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from rewards.aesthetic import AestheticMLP
from rewards.base import Reward, check_inputs
from rewards.clip_towers import TokenCache
from rewards.errors import RewardError, load_error
from rewards.hub import load_into, load_state_dict, resolve_file
from rewards.preprocess import BLIP_MEAN, BLIP_STD, clip_preprocess

DEFAULT_REPO = "THUDM/ImageReward"
CHECKPOINT_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
DEFAULT_TOKENIZER = "bert-base-uncased"
SCORE_MEAN, SCORE_STD = 0.16717362830052426, 1.0333394966054072
MAX_TEXT_LENGTH = 35

# ImageReward's MLP has the same layout as the LAION aesthetic head: layers.{0,2,4,6,7}, no activations.
RewardMLP = AestheticMLP

# timm-style BLIP ViT names -> transformers BlipVisionModel names (the rest are identical).
_VIT_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


def convert_visual_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BLIP `visual_encoder` state dict (timm ViT names) -> `BlipVisionModel` state dict."""
    out = {}
    for key, value in sd.items():
        new = key
        for pattern, repl in _VIT_RENAMES:
            new, n = re.subn(pattern, repl, key)
            if n:
                break
        out[new] = value
    return out


def blip_vision_config(sd: dict[str, torch.Tensor], num_heads: int | None = None):
    """`BlipVisionConfig` read off the converted vision state dict's shapes (heads: width // 64)."""
    from transformers import BlipVisionConfig

    width, _, patch, _ = sd["embeddings.patch_embedding.weight"].shape
    num_patches = sd["embeddings.position_embedding"].shape[1] - 1
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth,
        num_attention_heads=num_heads or max(1, width // 64),  # 16 for BLIP ViT-L, 12 for ViT-B
        image_size=patch * round(num_patches**0.5),
        patch_size=patch,
        layer_norm_eps=1e-6,  # timm ViT in BLIP uses partial(LayerNorm, eps=1e-6)
    )


def blip_text_config(med: dict, encoder_width: int | None = None):
    """ImageReward's `med_config.json` (a BERT config) -> `BlipTextConfig` (a bidirectional encoder)."""
    from transformers import BlipTextConfig

    return BlipTextConfig(
        vocab_size=med["vocab_size"],
        hidden_size=med["hidden_size"],
        encoder_hidden_size=encoder_width or med.get("encoder_width", med["hidden_size"]),
        intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med.get("hidden_act", "gelu"),
        layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        hidden_dropout_prob=med.get("hidden_dropout_prob", 0.0),
        attention_probs_dropout_prob=med.get("attention_probs_dropout_prob", 0.0),
        pad_token_id=med.get("pad_token_id", 0),
        bos_token_id=None,
        sep_token_id=None,
        # transformers builds cross-attention layers only for is_decoder configs; forward(is_decoder=False)
        # still gives the bidirectional encoder that med.py's "multimodal" mode is.
        is_decoder=True,
        use_cache=False,
    )


def load_bert_tokenizer(source: str | os.PathLike):
    """`BertTokenizer` with ImageReward's additions: bos `[DEC]` and the extra special token `[ENC]`."""
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(source))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


class ImageRewardReward(Reward):
    """`(mlp(text_encoder(prompt, cross-attending vision(image))[CLS]) - mean) / std`."""

    name = "imagereward"
    differentiable = True

    def __init__(self, vision: nn.Module, text: nn.Module, mlp: nn.Module, tokenizer):
        super().__init__()
        self.vision, self.text, self.mlp, self.tokenizer = vision, text, mlp, tokenizer
        self.image_size = int(vision.config.image_size)
        self.tokens = TokenCache(
            lambda p: tokenizer(
                p, padding="max_length", truncation=True, max_length=MAX_TEXT_LENGTH, return_tensors="pt"
            )
        )
        self.freeze()

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | os.PathLike = DEFAULT_REPO,
        tokenizer: str | os.PathLike = DEFAULT_TOKENIZER,
        vision_heads: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> ImageRewardReward:
        """`pretrained`: hub repo or directory with `ImageReward.pt` + `med_config.json`, or the `.pt` file
        (then `med_config.json` is looked for beside it). `tokenizer`: BERT vocab (hub id or directory);
        a `vocab.txt` in the checkpoint directory wins."""
        from transformers import BlipTextModel, BlipVisionModel

        ckpt = resolve_file(pretrained, CHECKPOINT_FILE, cls.name)
        med_source = ckpt.parent if Path(pretrained).is_file() else pretrained
        med = json.loads(resolve_file(med_source, MED_CONFIG_FILE, cls.name).read_text())
        sd = load_state_dict(ckpt, cls.name)
        vis_sd = convert_visual_keys(_strip(sd, "blip.visual_encoder."))
        if not vis_sd:
            raise RewardError(
                f"{cls.name}: {ckpt} has no blip.visual_encoder.* weights; is it ImageReward.pt?"
            )
        vision = BlipVisionModel(blip_vision_config(vis_sd, vision_heads))
        load_into(vision, vis_sd, cls.name, f"{ckpt} (visual encoder)")
        text_sd = {
            k: v for k, v in _strip(sd, "blip.text_encoder.").items() if not k.endswith("position_ids")
        }
        text = BlipTextModel(blip_text_config(med, vision.config.hidden_size), add_pooling_layer=False)
        load_into(text, text_sd, cls.name, f"{ckpt} (text encoder)")
        mlp = RewardMLP(text.config.hidden_size)
        load_into(mlp, _strip(sd, "mlp."), cls.name, f"{ckpt} (mlp)")
        local_vocab = ckpt.parent / "vocab.txt"
        tok_source = ckpt.parent if local_vocab.is_file() else tokenizer
        try:
            tok = load_bert_tokenizer(tok_source)
        except (OSError, ValueError) as e:
            raise load_error(cls.name, "the BERT tokenizer", str(tok_source), e, arg="tokenizer") from e
        return cls(vision, text, mlp, tok).to(device=device, dtype=dtype)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_inputs(images, prompts, self.name)
        pixels = clip_preprocess(images, self.image_size, BLIP_MEAN, BLIP_STD).to(self.dtype)
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        tok = self.tokens(prompts)
        out = self.text(
            input_ids=tok["input_ids"].to(images.device),
            attention_mask=tok["attention_mask"].to(images.device),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long, device=images.device),
            is_decoder=False,
        )
        r = self.mlp(out.last_hidden_state[:, 0, :]).squeeze(-1)
        return ((r - SCORE_MEAN) / SCORE_STD).float()


def _strip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
