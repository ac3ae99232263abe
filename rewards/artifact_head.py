"""`ArtifactHead`: an artifact reward of this project's own (not from a paper), light and differentiable: a
logistic (or one-hidden-layer) head on frozen CLIP image embeddings, trained with
`diffusion-align train-artifact-head` on a folder of clean and a folder of artifact images.
reward = P(clean): 1 means artifact-free, 0 means artifacts (the scale of `ArtifactJudge`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from rewards.base import Reward, check_inputs
from rewards.errors import RewardError

DEFAULT_CLIP = "openai/clip-vit-large-patch14"

HEAD_FORMAT = "diffusion_align.artifact_head/1"


class LogisticHead(nn.Module):
    """`(N, D)` L2-normalised CLIP image embeddings -> `(N,)` artifact logits (> 0 means artifact).

    Features are standardised with the training set's mean/std (stored as buffers, saved with the head)
    so the optimiser sees unit-scale inputs whatever the backbone.
    """

    def __init__(self, feature_dim: int, hidden: int = 0):
        super().__init__()
        self.feature_dim, self.hidden = feature_dim, hidden
        self.register_buffer("mean", torch.zeros(feature_dim))
        self.register_buffer("std", torch.ones(feature_dim))
        if hidden > 0:
            self.net = nn.Sequential(nn.Linear(feature_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
        else:
            self.net = nn.Sequential(nn.Linear(feature_dim, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.mean) / self.std).squeeze(-1)


def fit_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    hidden: int = 0,
    steps: int = 500,
    lr: float = 5e-2,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> LogisticHead:
    """Fit a head on `(N, D)` features and `(N,)` labels in {0 clean, 1 artifact}, full batch.

    The loss is class-balanced (pos_weight = n_clean / n_artifact) so an unbalanced folder pair does not
    just teach the majority label.
    """
    features, labels = features.detach().float(), labels.detach().float()
    gen = torch.Generator().manual_seed(seed)
    head = LogisticHead(features.shape[1], hidden)
    with torch.no_grad():
        for p in head.net.parameters():  # seeded init, independent of the global RNG
            bound = 1.0 / math.sqrt(p.shape[-1])
            p.copy_(torch.empty_like(p).uniform_(-bound, bound, generator=gen))
        head.mean.copy_(features.mean(0))
        head.std.copy_(features.std(0, unbiased=False).clamp_min(1e-6))
    n_pos = labels.sum().clamp_min(1)
    pos_weight = (len(labels) - n_pos).clamp_min(1) / n_pos
    opt = torch.optim.AdamW(head.net.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = nn.functional.binary_cross_entropy_with_logits(head(features), labels, pos_weight=pos_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return head.eval().requires_grad_(False)


def load_clip(pretrained: str | os.PathLike, name: str = "artifact_head"):
    """A frozen `transformers.CLIPModel` from a hub id or local directory; one-line error on failure."""
    from transformers import CLIPModel

    try:
        return CLIPModel.from_pretrained(str(pretrained)).eval().requires_grad_(False)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise RewardError(
            f"{name}: could not load the CLIP backbone from {str(pretrained)!r} "
            f"({type(e).__name__}: {first}); "
            "pass a local save_pretrained directory (clip=/path, --reward-arg artifact_head.clip=/path, or "
            "--clip /path for train-artifact-head), or point HF_HOME at a cache that has it "
            "(HF_HUB_OFFLINE=1 reads only the cache)"
        ) from e


def clip_image_embeddings(clip, images: torch.Tensor) -> torch.Tensor:
    """`(B, 3, H, W)` in [0, 1] -> `(B, D)` L2-normalised CLIP image embeddings, differentiable."""
    from rewards.preprocess import clip_preprocess

    size = clip.config.vision_config.image_size
    pixels = clip_preprocess(images, size)
    out = clip.get_image_features(pixel_values=pixels)
    out = getattr(out, "pooler_output", out)  # transformers 5 returns a model output, 4 a tensor
    return nn.functional.normalize(out.float(), dim=-1)


class ArtifactHead(Reward):
    """reward = P(clean) = sigmoid(-logit) from a trained head on frozen CLIP image embeddings.

    `forward(images (B, 3, H, W) in [0, 1], prompts) -> (B,)` float32 in [0, 1]; differentiable w.r.t.
    the images (prompts are unused). Train the head with `diffusion-align train-artifact-head`.
    """

    name = "artifact_head"
    differentiable = True

    def __init__(self, clip, head: LogisticHead, clip_source: str = ""):
        super().__init__()
        dim = clip.config.projection_dim
        if head.feature_dim != dim:
            raise RewardError(
                f"artifact head expects {head.feature_dim}-d CLIP embeddings but the backbone gives {dim}-d; "
                "use the CLIP model the head was trained with (`clip=` / --reward-arg artifact_head.clip=...)"
            )
        self.clip = clip.eval().requires_grad_(False)
        self.head = head.eval().requires_grad_(False)
        self.clip_source = clip_source
        self.freeze()

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | os.PathLike | None = None,
        clip: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
    ) -> ArtifactHead:
        """Load a head file written by `save` (or the train-artifact-head command).

        `clip` overrides the backbone recorded in the file (a hub id or a local directory).
        """
        if pretrained is None:
            raise RewardError(
                "artifact_head needs its trained head file: pass pretrained=FILE.safetensors "
                "(--reward-arg artifact_head.pretrained=FILE); "
                "make one with `diffusion-align train-artifact-head`"
            )
        head, meta = load_head(pretrained)
        clip_source = str(clip) if clip is not None else meta.get("clip", "")
        if not clip_source:
            raise RewardError(
                f"{pretrained} does not record its CLIP backbone; pass clip=<hub id or directory>"
            )
        model = cls(load_clip(clip_source), head, clip_source)
        return model.to(device) if device is not None else model

    def save(self, path: str | os.PathLike, **extra_metadata: str) -> Path:
        return save_head(self.head, path, clip=self.clip_source, **extra_metadata)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """`(B, 3, H, W)` in [0, 1] -> `(B,)` artifact logits (> 0 means artifact)."""
        return self.head(clip_image_embeddings(self.clip, images))

    def forward(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        check_inputs(images, prompts, self.name)
        return torch.sigmoid(-self.logits(images)).float()


def save_head(head: LogisticHead, path: str | os.PathLike, **metadata: str) -> Path:
    """Write the head as safetensors; `metadata` (strings) goes into the file header, e.g. clip=<source>."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": HEAD_FORMAT, "feature_dim": str(head.feature_dim), "hidden": str(head.hidden)}
    meta.update({k: str(v) for k, v in metadata.items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(tensors, str(path), metadata=meta)
    return path


def load_head(path: str | os.PathLike) -> tuple[LogisticHead, dict[str, str]]:
    """Read a head written by `save_head`; returns the head and the file's metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise RewardError(
            f"no artifact head file at {path}; train one with "
            "`diffusion-align train-artifact-head --clean DIR --artifact DIR --out FILE.safetensors`"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types on a bad header
        raise RewardError(f"{path} is not a readable safetensors file ({e})") from e
    if meta.get("format") != HEAD_FORMAT:
        raise RewardError(
            f"{path} is not an artifact head (format {meta.get('format')!r}, want {HEAD_FORMAT!r})"
        )
    head = LogisticHead(int(meta["feature_dim"]), int(meta["hidden"]))
    head.load_state_dict(tensors)
    return head.eval().requires_grad_(False), meta
