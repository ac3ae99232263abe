"""LAION improved aesthetic predictor (`sac+logos+ava1-l14-linearMSE`): a 5-layer MLP, without activations,
on the L2-normalised CLIP ViT-L/14 image embedding. Ratings ~1-10 (LAION calls ~6.5+ aesthetic).

`forward(images (B, 3, H, W) in [0, 1], prompts) -> (B,)` float32, differentiable w.r.t. images; prompts
are ignored. Checkpoints: the CLIP `openai/clip-vit-large-patch14` (transformers layout, only the vision
tower is loaded) and the head `aesthetic-model.pth` of hub repo `trl-lib/ddpo-aesthetic-predictor`
(a plain state dict with keys `layers.{0,2,4,6,7}.{weight,bias}`; the GitHub file
`sac+logos+ava1-l14-linearMSE.pth` is the same). The head's input size follows the CLIP projection.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from rewards.base import Reward, check_inputs
from rewards.clip_towers import load_clip_vision
from rewards.hub import load_into, load_state_dict, resolve_file
from rewards.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess

DEFAULT_HEAD = "trl-lib/ddpo-aesthetic-predictor"
HEAD_FILE = "aesthetic-model.pth"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"


class AestheticMLP(nn.Module):
    """Linear(d,1024) Drop Linear(1024,128) Drop Linear(128,64) Drop Linear(64,16) Linear(16,1).

    No activations in "linearMSE" (the ReLUs of the original script are commented out).
    Keys `layers.{0,2,4,6,7}.*`.
    """

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """`(B, d)` L2-normalised embeddings -> `(B, 1)` ratings."""
        return self.layers(embedding)


def vision_embeddings(vision, pixels: torch.Tensor) -> torch.Tensor:
    """Projected CLIP image embeddings `(B, D)` from a `CLIPVisionModelWithProjection` or a `CLIPModel`."""
    if hasattr(vision, "get_image_features"):
        out = vision.get_image_features(pixel_values=pixels)
        return getattr(out, "pooler_output", out)
    return vision(pixel_values=pixels).image_embeds


class AestheticReward(Reward):
    """`head(normalize(CLIP image embedding))`.

    `vision`: a `CLIPVisionModelWithProjection` or a `CLIPModel`; `head`: an `AestheticMLP`.
    """

    name = "aesthetic"
    differentiable = True

    def __init__(self, vision: nn.Module, head: AestheticMLP):
        super().__init__()
        self.vision, self.head = vision, head
        self.image_size = int(getattr(vision.config, "vision_config", vision.config).image_size)
        self.freeze()

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | os.PathLike = DEFAULT_HEAD,
        clip: str | os.PathLike = DEFAULT_CLIP,
        filename: str = HEAD_FILE,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> AestheticReward:
        """`pretrained`: head file, a directory holding `filename`, or a hub repo; `clip`: CLIP hub id/dir."""
        path = resolve_file(pretrained, filename, cls.name)  # first: the small file fails fast
        vision = load_clip_vision(clip, cls.name, dtype, arg="clip")
        head = AestheticMLP(vision.config.projection_dim)
        load_into(head, load_state_dict(path, cls.name), cls.name, str(path))
        return cls(vision, head).to(device=device, dtype=dtype)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """`(B, 3, H, W)` in [0, 1] -> `(B, D)` L2-normalised CLIP image embeddings."""
        pixels = clip_preprocess(images, self.image_size, CLIP_MEAN, CLIP_STD).to(self.dtype)
        return nn.functional.normalize(vision_embeddings(self.vision, pixels), dim=-1)

    def forward(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        check_inputs(images, prompts, self.name)
        return self.head(self.embed(images)).squeeze(-1).float()
