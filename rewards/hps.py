"""HPSv2 / HPSv2.1 (Wu et al. 2023): cosine similarity of an OpenCLIP ViT-H-14 tuned on human preferences.

`forward(images (B, 3, H, W) in [0, 1], prompts) -> (B,)` float32 cosine (no logit scale; typical
0.25-0.35), differentiable w.r.t. images. Checkpoints: hub repo `xswu/HPSv2`, files
`HPS_v2_compressed.pt` (v2.0) and `HPS_v2.1_compressed.pt` (v2.1), each `{"state_dict": <open_clip
ViT-H-14 weights>}`; a local file or a directory holding them works too. Built on plain `open_clip`
(the `hpsv2` wheel cannot be imported); the architecture is created without weights, so the 3.9 GB
LAION base checkpoint is never fetched. Preprocessing as HPS's `preprocess_val`: longest side to 224
(bicubic), zero-pad to square, OpenAI mean/std (the same as resize + centre crop for square images).
"""

from __future__ import annotations

import os

import torch

from rewards.base import Reward, check_inputs
from rewards.clip_towers import OpenClipTowers, cosine, load_open_clip
from rewards.errors import RewardError
from rewards.hub import load_into, load_state_dict, resolve_file
from rewards.preprocess import hps_preprocess

DEFAULT_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


class HPSReward(Reward):
    """HPS score `cos(E_image, E_text)` on `OpenClipTowers`."""

    name = "hpsv2"
    differentiable = True

    def __init__(self, towers: OpenClipTowers):
        super().__init__()
        self.towers = towers
        self.freeze()

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | os.PathLike = DEFAULT_REPO,
        version: str = "v2.1",
        arch: str = "ViT-H-14",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> HPSReward:
        """`pretrained`: the hub repo, a directory holding the version's file, or the checkpoint file."""
        if version not in HPS_FILES:
            raise RewardError(f"hpsv2: unknown version {version!r}; use one of {', '.join(HPS_FILES)}")
        path = resolve_file(pretrained, HPS_FILES[version], cls.name)
        model, tokenizer = load_open_clip(arch, None, cls.name)
        load_into(model, load_state_dict(path, cls.name), cls.name, str(path))
        return cls(OpenClipTowers(model, tokenizer)).to(device=device, dtype=dtype)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_inputs(images, prompts, self.name)
        t = self.towers
        pixels = hps_preprocess(images, t.image_size, t.mean, t.std)
        return cosine(t.encode_image(pixels), t.encode_text(prompts, images.device)).float()
