"""The `Reward` interface: `(B, 3, H, W)` images in [0, 1] and B prompts -> `(B,)` float32, higher is better.

A reward is a frozen `torch.nn.Module`: its parameters never require grad and it stays in eval mode
(dropout off) even if a caller runs `.train()` on a parent module. `differentiable` says whether the
returned scores carry a gradient to the input pixels; policy-gradient methods call rewards under
`torch.no_grad()`, reward-backprop methods need `differentiable = True`. Rewards never return losses.
Video `(B, T, 3, H, W)` is handled by `rewards.video.per_frame`, not by each reward.
"""

from __future__ import annotations

import torch
from torch import nn

from rewards.errors import RewardError


class Reward(nn.Module):
    """Base class of every reward. Subclasses set `name`, `differentiable` and implement `forward`."""

    name: str = "reward"
    differentiable: bool = False

    def __init__(self):
        super().__init__()
        self.training = False  # submodules added later are frozen by `freeze()`

    @classmethod
    def from_pretrained(cls, pretrained=None, **kwargs) -> Reward:
        """Rewards without a checkpoint are built from their keyword arguments."""
        if pretrained is not None:
            raise RewardError(f"{cls.name} has no checkpoint to load; drop pretrained={pretrained!r}")
        return cls(**kwargs)

    def freeze(self) -> Reward:
        """Eval mode and no parameter gradients (call at the end of `__init__`)."""
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> Reward:
        # A reward is a fixed judge: dropout in a reward model would make scores noisy.
        return super().train(False)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the first floating-point parameter (float32 for parameter-free rewards)."""
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, differentiable={self.differentiable})"


def check_inputs(images: torch.Tensor, prompts: list[str] | None, name: str = "reward") -> None:
    """Raise RewardError unless images is `(B, 3, H, W)` and there is one prompt per image."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        is_video = getattr(images, "ndim", 0) == 5
        hint = " (for videos (B, T, 3, H, W) use rewards.per_frame)" if is_video else ""
        raise RewardError(f"{name} expects images (B, 3, H, W) in [0, 1], got {shape}{hint}")
    if prompts is not None and len(prompts) != images.shape[0]:
        n = images.shape[0]
        raise RewardError(f"{name}: got {n} images but {len(prompts)} prompts; pass one prompt per image")
