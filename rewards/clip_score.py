"""CLIPScore: `100 * cos(E_image, E_text)`, clamped at 0 (torchmetrics' convention, Hessel et al. with w=100).

`forward(images (B, 3, H, W) in [0, 1], prompts) -> (B,)` float32 in [0, 100]. The clamp is applied as
a straight-through estimator: the value is `max(s, 0)` but the gradient is that of the unclamped `s`,
so reward backprop still pushes images with negative similarity upwards. `clamp=False` returns `s`.
Works with a transformers `CLIPModel` (default `openai/clip-vit-large-patch14`, or any local
`save_pretrained` directory; without tokenizer files there the bundled CLIP tokenizer is used) or an
open_clip model (`open_clip_arch="ViT-B-32", pretrained="laion2b_s34b_b79k"` or a local weights file).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from rewards.base import Reward, check_inputs
from rewards.clip_towers import (
    HFClipTowers,
    OpenClipTowers,
    cosine,
    load_clip_tokenizer,
    load_hf_clip,
    load_open_clip,
)
from rewards.preprocess import clip_preprocess

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


class CLIPScoreReward(Reward):
    """CLIPScore on `HFClipTowers` or `OpenClipTowers` (see `rewards.clip_towers`)."""

    name = "clip"
    differentiable = True

    def __init__(self, towers: nn.Module, scale: float = 100.0, clamp: bool = True):
        super().__init__()
        self.towers = towers
        self.scale, self.clamp = float(scale), clamp
        self.freeze()

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | os.PathLike = DEFAULT_CLIP,
        open_clip_arch: str | None = None,
        tokenizer: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **kwargs,
    ) -> CLIPScoreReward:
        """Hub id or local directory of a transformers CLIPModel; or open_clip `arch` + tag/file."""
        if open_clip_arch is not None:
            towers = OpenClipTowers(*load_open_clip(open_clip_arch, pretrained, cls.name))
        else:
            model = load_hf_clip(pretrained, cls.name, dtype)
            towers = HFClipTowers(model, load_clip_tokenizer(tokenizer, pretrained))
        return cls(towers, **kwargs).to(device=device, dtype=dtype)

    def similarity(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """`(B,)` cosine similarity of the image and prompt embeddings, differentiable w.r.t. images."""
        check_inputs(images, prompts, self.name)
        t = self.towers
        pixels = clip_preprocess(images, t.image_size, t.mean, t.std)
        return cosine(t.encode_image(pixels), t.encode_text(prompts, images.device))

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        s = self.scale * self.similarity(images, prompts)
        if self.clamp:
            s = s + (s.clamp(min=0) - s).detach()
        return s.float()
