"""CLIP image and text towers behind one small interface, for transformers `CLIPModel` or open_clip models.

CLIPScore, PickScore and HPSv2 differ only in checkpoint, preprocessing and scale; all of them need
`encode_image(pixels (B, 3, S, S) normalised) -> (B, D)` and `encode_text(prompts) -> (B, D)` (both
un-normalised). Loading helpers return one-line `RewardError`s that say where they looked.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from rewards.errors import RewardError, load_error
from rewards.preprocess import CLIP_MEAN, CLIP_STD

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


class TokenCache:
    """Tokenised prompt batches by value: training re-scores the same prompt lists every step, and on
    small models tokenising costs as much as the forward. Bounded; cleared when full."""

    def __init__(self, tokenize, max_entries: int = 256):
        self.tokenize, self.max_entries, self.entries = tokenize, max_entries, {}

    def __call__(self, prompts: list[str]):
        key = tuple(prompts)
        if key not in self.entries:
            if len(self.entries) >= self.max_entries:
                self.entries.clear()
            self.entries[key] = self.tokenize(list(key))
        return self.entries[key]


class HFClipTowers(nn.Module):
    """A transformers `CLIPModel` and its tokenizer (prompts truncated to 77 tokens, padded per batch)."""

    def __init__(self, model, tokenizer, mean=CLIP_MEAN, std=CLIP_STD):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = int(model.config.vision_config.image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.max_length = min(int(model.config.text_config.max_position_embeddings), 77)
        self.tokens = TokenCache(
            lambda p: tokenizer(
                p, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
        )

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = self.model.visual_projection.weight.dtype
        out = self.model.get_image_features(pixel_values=pixels.to(dtype))
        return getattr(out, "pooler_output", out).float()  # transformers 5 returns a model output

    def encode_text(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        tok = self.tokens(prompts)
        out = self.model.get_text_features(
            input_ids=tok["input_ids"].to(device), attention_mask=tok["attention_mask"].to(device)
        )
        return getattr(out, "pooler_output", out).float()


class OpenClipTowers(nn.Module):
    """An open_clip `CLIP` model and its tokenizer; mean/std/size from the model's preprocess config."""

    def __init__(self, model, tokenizer):
        super().__init__()
        import open_clip

        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg.get("size", 224)
        self.image_size = int(size if isinstance(size, int) else size[0])
        self.mean = tuple(cfg.get("mean", CLIP_MEAN))
        self.std = tuple(cfg.get("std", CLIP_STD))
        self.tokens = TokenCache(tokenizer)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.visual.parameters()).dtype
        return self.model.encode_image(pixels.to(dtype)).float()

    def encode_text(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        return self.model.encode_text(self.tokens(prompts).to(device)).float()


def cosine(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of `(B, D)` features -> `(B,)`."""
    i = nn.functional.normalize(image_features, dim=-1)
    t = nn.functional.normalize(text_features, dim=-1)
    return (i * t).sum(-1)


# ---------------------------------------------------------------------------------------------------
# Loading


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).exists() for f in TOKENIZER_FILES)


def load_hf_clip(pretrained: str | os.PathLike, name: str, dtype: torch.dtype | None = None):
    """`transformers.CLIPModel` from a hub id or a local `save_pretrained` directory."""
    from transformers import CLIPModel

    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        return CLIPModel.from_pretrained(str(pretrained), **kwargs).eval().requires_grad_(False)
    except (OSError, ValueError, RuntimeError) as e:
        raise load_error(name, "the CLIP model", str(pretrained), e) from e


def load_clip_tokenizer(*sources: str | os.PathLike | None):
    """The tokenizer of the first source that has one; the bundled real CLIP BPE tokenizer otherwise.

    Every OpenAI/LAION CLIP uses the same 49408-token BPE vocabulary, so the fallback gives identical ids.
    """
    from transformers import AutoTokenizer

    from rewards.tokenizers import clip_tokenizer

    for src in sources:
        if src is None:
            continue
        path = Path(src)
        if path.is_dir() and not _has_tokenizer(path):
            continue
        if path.is_file():
            continue
        try:
            return AutoTokenizer.from_pretrained(str(src))
        except (OSError, ValueError) as e:
            if path.exists():
                raise RewardError(f"could not read the tokenizer files in {src} ({e})") from e
            warnings.warn(
                f"no tokenizer found for {src} ({type(e).__name__}); using the bundled CLIP tokenizer",
                stacklevel=2,
            )
    return clip_tokenizer()


def load_open_clip(arch: str, pretrained: str | os.PathLike | None, name: str):
    """open_clip model `arch` with weights from a file/tag (None: random init) and its tokenizer."""
    import open_clip

    if arch not in open_clip.list_models():
        raise RewardError(f"{name}: open_clip has no architecture {arch!r}; see open_clip.list_models()")
    previous = logging.root.manager.disable
    try:
        if not pretrained:  # the caller loads weights itself; open_clip's "initialized randomly" is noise
            logging.disable(logging.WARNING)
        model = open_clip.create_model(arch, pretrained=str(pretrained) if pretrained else None)
    except (RuntimeError, OSError, ValueError) as e:
        raise load_error(name, f"open_clip {arch} weights", str(pretrained), e) from e
    finally:
        logging.disable(previous)
    return model.eval().requires_grad_(False), open_clip.get_tokenizer(arch)


def load_clip_vision(
    pretrained: str | os.PathLike, name: str, dtype: torch.dtype | None = None, arg: str = "pretrained"
):
    """Only the vision tower + projection (`CLIPVisionModelWithProjection`) of a CLIP checkpoint.

    Saves the text tower's memory (~120M parameters for ViT-L/14). A full `CLIPModel` checkpoint keeps
    `projection_dim` at the top level, so it is copied into the vision config before loading.
    """
    from transformers import CLIPConfig, CLIPVisionModelWithProjection
    from transformers.utils import logging

    kwargs = {"dtype": dtype} if dtype is not None else {}
    verbosity = logging.get_verbosity()
    try:
        config = CLIPConfig.from_pretrained(str(pretrained))
        if config.model_type == "clip":
            vision_config = config.vision_config
            vision_config.projection_dim = config.projection_dim
            kwargs["config"] = vision_config
        logging.set_verbosity_error()  # the text-tower keys are "unexpected" by design
        model = CLIPVisionModelWithProjection.from_pretrained(str(pretrained), **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise load_error(name, "the CLIP vision tower", str(pretrained), e, arg) from e
    finally:
        logging.set_verbosity(verbosity)
    return model.eval().requires_grad_(False)
