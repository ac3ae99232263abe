"""Tiny, seeded, randomly initialised reward backbones saved in the layout of the official checkpoints.

For tests and benchmarks here and in other packages (the score CLI, the trainer): every builder uses the
real transformers / open_clip / timm classes at toy sizes, and every `save_*` writes files that the real
`from_pretrained` loading code reads. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from functools import partial
from pathlib import Path

import torch
from torch import nn

from rewards.tokenizers import CLIP_VOCAB_SIZE, clip_tokenizer, write_clip_tokenizer_files


def tiny_clip(
    seed: int = 0,
    image_size: int = 64,
    patch_size: int = 16,
    hidden_size: int = 32,
    projection_dim: int = 32,
    logit_scale: float | None = None,
):
    """A seeded `transformers.CLIPModel` with the real 49408-token CLIP vocabulary (~1.7M parameters)."""
    from transformers import CLIPConfig, CLIPModel

    tok = clip_tokenizer()
    torch.manual_seed(seed)
    common = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=CLIP_VOCAB_SIZE,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **common,
        ),
        vision_config=dict(image_size=image_size, patch_size=patch_size, num_attention_heads=4, **common),
        projection_dim=projection_dim,
    )
    model = CLIPModel(config)
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(float(torch.tensor(logit_scale).log()))
    return model.eval()


def save_tiny_clip(directory: str | os.PathLike, with_tokenizer: bool = True, **kwargs) -> Path:
    """`CLIPModel.save_pretrained(directory)` (+ `vocab.json`/`merges.txt` unless `with_tokenizer=False`)."""
    directory = Path(directory)
    tiny_clip(**kwargs).save_pretrained(directory)
    if with_tokenizer:
        write_clip_tokenizer_files(directory)
    return directory


# ---------------------------------------------------------------------------------------------------
# Aesthetic predictors


def save_tiny_aesthetic(directory: str | os.PathLike, seed: int = 0) -> tuple[Path, Path]:
    """A tiny CLIP dir and a dir with `aesthetic-model.pth` (keys `layers.{0,2,4,6,7}.*`) -> (clip, head)."""
    from rewards.aesthetic import AestheticMLP

    directory = Path(directory)
    clip_dir = save_tiny_clip(directory / "clip", seed=seed)
    head_dir = directory / "head"
    head_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed + 1)
    head = AestheticMLP(32)
    torch.save(OrderedDict(head.state_dict()), head_dir / "aesthetic-model.pth")
    return clip_dir, head_dir


def tiny_siglip_vision(seed: int = 0, image_size: int = 32):
    """A seeded `SiglipVisionModel` (hidden 32, pooled output `(B, 32)`)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    cfg = SiglipVisionConfig(
        image_size=image_size,
        patch_size=8,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    return SiglipVisionModel(cfg).eval()


def save_tiny_aesthetic_v25(directory: str | os.PathLike, seed: int = 0) -> tuple[Path, Path]:
    """A tiny SigLIP vision directory and `aesthetic_predictor_v2_5.pth` -> (encoder dir, head file)."""
    from rewards.aesthetic_v25 import AestheticV25Head

    directory = Path(directory)
    enc_dir = directory / "siglip"
    tiny_siglip_vision(seed).save_pretrained(enc_dir)
    torch.manual_seed(seed + 1)
    head_file = directory / "aesthetic_predictor_v2_5.pth"
    torch.save(OrderedDict(AestheticV25Head(32).state_dict()), head_file)
    return enc_dir, head_file


# ---------------------------------------------------------------------------------------------------
# open_clip (HPSv2)

# ViT-H-14's structure (GELU, CLIP vocabulary, 77 tokens, head_width attention) at toy width and depth.
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": CLIP_VOCAB_SIZE, "width": 32, "heads": 4, "layers": 2},
}
TINY_OPEN_CLIP_NAME = "tiny-ViT-H-14-test"


def register_tiny_open_clip(directory: str | os.PathLike, name: str = TINY_OPEN_CLIP_NAME) -> str:
    """Register the tiny ViT-H-like architecture with open_clip under `name` and return the name."""
    import open_clip

    path = Path(directory) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    open_clip.add_model_config(path)
    return name


def save_tiny_hps(
    directory: str | os.PathLike, version: str = "v2.1", seed: int = 0, module_prefix: bool = True
) -> tuple[str, Path]:
    """A tiny open_clip model saved as HPS does (`{"state_dict": ...}`) under the official file name.

    Returns (registered arch name, directory holding `HPS_v2.1_compressed.pt` / `HPS_v2_compressed.pt`).
    """
    import open_clip

    from rewards.hps import HPS_FILES

    directory = Path(directory)
    arch = register_tiny_open_clip(directory / "configs")
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None)
    prefix = "module." if module_prefix else ""  # DDP-trained checkpoints carry it
    sd = {prefix + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd, "epoch": 1}, directory / HPS_FILES[version])
    return arch, directory


# ---------------------------------------------------------------------------------------------------
# BLIP (ImageReward)

TINY_BERT_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_tiny_bert_vocab(directory: str | os.PathLike) -> Path:
    """A character-level BERT `vocab.txt` (specials, a-z, 0-9, punctuation, `##` continuations)."""
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    vocab = TINY_BERT_TOKENS + chars + ["##" + c for c in chars]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return directory


def tiny_blip_vit(seed: int = 0, image_size: int = 32, patch_size: int = 8, width: int = 64, depth: int = 2):
    """BLIP's visual encoder is a timm-style ViT: a timm `VisionTransformer` has its exact key names.

    Heads = width // 64, as in BLIP's ViT-B/L (the loader infers them that way)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(
        img_size=image_size,
        patch_size=patch_size,
        embed_dim=width,
        depth=depth,
        num_heads=max(1, width // 64),
        mlp_ratio=4.0,
        qkv_bias=True,
        num_classes=0,
        global_pool="",
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    ).eval()


def tiny_med_config(vocab_size: int, encoder_width: int = 64) -> dict:
    """ImageReward's `med_config.json` (BERT with cross-attention) at toy size."""
    return {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 32,
        "initializer_range": 0.02,
        "intermediate_size": 37,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 64,
        "model_type": "bert",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": vocab_size,
        "encoder_width": encoder_width,
        "add_cross_attention": True,
    }


def save_tiny_imagereward(directory: str | os.PathLike, seed: int = 0) -> Path:
    """`ImageReward.pt` (keys `blip.visual_encoder.*`, `blip.text_encoder.*`, `mlp.layers.*`, plus unused
    `blip.*` heads), `med_config.json` and a tiny BERT `vocab.txt`, as in the THUDM/ImageReward repo."""
    from transformers import BlipTextModel

    from rewards.imagereward import RewardMLP, blip_text_config, load_bert_tokenizer

    directory = write_tiny_bert_vocab(directory)
    vocab_size = len(load_bert_tokenizer(directory))
    med = tiny_med_config(vocab_size)
    (directory / "med_config.json").write_text(json.dumps(med, indent=2))
    vit = tiny_blip_vit(seed)
    torch.manual_seed(seed + 1)
    text = BlipTextModel(blip_text_config(med), add_pooling_layer=False)
    torch.manual_seed(seed + 2)
    mlp = RewardMLP(med["hidden_size"])
    sd = {f"blip.visual_encoder.{k}": v for k, v in vit.state_dict().items()}
    sd.update({f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()})
    sd.update({f"mlp.{k}": v for k, v in mlp.state_dict().items()})
    # med.py's BertEmbeddings kept position_ids as a persistent buffer; the real file has it.
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(med["max_position_embeddings"])[None]
    sd["blip.vision_proj.weight"] = torch.randn(16, 32)  # unused by the score, present in the real file
    sd["blip.text_proj.weight"] = torch.randn(16, 32)
    torch.save(sd, directory / "ImageReward.pt")
    return directory
