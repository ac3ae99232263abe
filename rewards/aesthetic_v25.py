"""aesthetic-predictor-v2-5: a 5-layer MLP (no activations) on the L2-normalised SigLIP so400m pooled output.
Ratings ~1-10 ("5.5+ is great").

`forward(images (B, 3, H, W) in [0, 1], prompts) -> (B,)` float32, differentiable w.r.t. images; prompts
are ignored. Checkpoints: the encoder `google/siglip-so400m-patch14-384` (transformers; only the vision
tower is loaded) and the head file `aesthetic_predictor_v2_5.pth` from the discus0434 GitHub release (keys
`scoring_head.{0,2,4,6,8}.*`), read from a local path or the URL via the torch hub cache.
Preprocessing as `SiglipImageProcessor`: squash-resize to 384x384 (bicubic), mean = std = 0.5.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from rewards.base import Reward, check_inputs
from rewards.errors import RewardError, load_error
from rewards.hub import load_into, load_state_dict
from rewards.preprocess import SIGLIP_MEAN, SIGLIP_STD, siglip_preprocess

DEFAULT_HEAD = (
    "https://github.com/discus0434/aesthetic-predictor-v2-5/raw/main/models/aesthetic_predictor_v2_5.pth"
)
DEFAULT_ENCODER = "google/siglip-so400m-patch14-384"


class AestheticV25Head(nn.Module):
    """Linear(d,1024) Drop(.5) Linear(1024,128) Drop(.5) Linear(128,64) Drop(.5) Linear(64,16) Drop(.2)
    Linear(16,1); keys `scoring_head.{0,2,4,6,8}.*`."""

    def __init__(self, input_size: int = 1152):
        super().__init__()
        self.scoring_head = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.5),
            nn.Linear(1024, 128),
            nn.Dropout(0.5),
            nn.Linear(128, 64),
            nn.Dropout(0.5),
            nn.Linear(64, 16),
            nn.Dropout(0.2),
            nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.scoring_head(embedding)


def _head_file(pretrained: str | os.PathLike, name: str) -> Path:
    if str(pretrained).startswith(("http://", "https://")):
        try:
            dst = Path(torch.hub.get_dir()) / "checkpoints" / str(pretrained).rsplit("/", 1)[-1]
            if not dst.is_file():
                torch.hub.download_url_to_file(str(pretrained), str(dst), progress=True)
            return dst
        except Exception as e:
            raise RewardError(
                f"{name}: could not download the head from {pretrained} ({type(e).__name__}); download "
                f"it elsewhere and pass pretrained=/path/aesthetic_predictor_v2_5.pth "
                f"(torch hub cache: {torch.hub.get_dir()})"
            ) from e
    path = Path(pretrained).expanduser()
    if path.is_dir():
        path = path / "aesthetic_predictor_v2_5.pth"
    if not path.is_file():
        raise RewardError(f"{name}: head file {path} does not exist; pass pretrained=/path/to/the .pth file")
    return path


class AestheticV25Reward(Reward):
    name = "aesthetic_v25"
    differentiable = True

    def __init__(self, vision: nn.Module, head: AestheticV25Head):
        super().__init__()
        self.vision, self.head = vision, head
        self.image_size = int(vision.config.image_size)
        self.freeze()

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | os.PathLike = DEFAULT_HEAD,
        encoder: str | os.PathLike = DEFAULT_ENCODER,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> AestheticV25Reward:
        """`pretrained`: head file or URL; `encoder`: SigLIP hub id or local directory."""
        from transformers import SiglipVisionModel

        path = _head_file(pretrained, cls.name)  # first: cheap, and fails before a big download
        try:
            vision = SiglipVisionModel.from_pretrained(str(encoder))
        except (OSError, ValueError, RuntimeError) as e:
            raise load_error(cls.name, "the SigLIP vision tower", str(encoder), e, arg="encoder") from e
        head = AestheticV25Head(vision.config.hidden_size)
        load_into(head, load_state_dict(path, cls.name), cls.name, str(path))
        return cls(vision, head).to(device=device, dtype=dtype)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """`(B, 3, H, W)` in [0, 1] -> `(B, D)` L2-normalised SigLIP pooled embeddings."""
        pixels = siglip_preprocess(images, self.image_size, SIGLIP_MEAN, SIGLIP_STD).to(self.dtype)
        return nn.functional.normalize(self.vision(pixel_values=pixels).pooler_output, dim=-1)

    def forward(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        check_inputs(images, prompts, self.name)
        return self.head(self.embed(images)).squeeze(-1).float()
