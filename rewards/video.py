"""Lift an image reward to videos: score selected frames, then average.

`videos (B, T, 3, H, W)` in [0, 1] -> `(B,)` float32. Frame selections:
- `"all"`: every frame;
- `"random"`: `k` distinct random frames per video (VADER's default decodes one random frame, k=1);
- `"fml"`: first, middle (`T // 2`) and last frames (VADER's `fml`);
- `"segments"`: InstructVideo's segmental video reward (SegVR): split into `k` segments of `T // k`
  frames and draw one random frame in each (TSN sampling). With `tar_lambda` set, each segment's score is
  weighted by `exp(-tar_lambda * |index - T // 2|)` before the mean (temporally attenuated reward, TAR;
  InstructVideo uses lambda = 1 and the plain mean of the weighted scores, which we keep).
Only the selected frames reach the image reward, so gradients flow to those frames only.

From a config, the registered name `per_frame` (`VideoReward.from_pretrained`) builds the image reward and
lifts it:

    rewards:
      - name: per_frame
        args: {reward: shapes_color_soft, mode: random, k: 1, seed: 0}   # other args go to the image reward
"""

from __future__ import annotations

import torch
from torch import nn

from rewards.base import Reward
from rewards.errors import RewardError

MODES = ("all", "random", "fml", "segments")


def select_frames(
    num_videos: int,
    num_frames: int,
    mode: str,
    k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`(B, S)` long frame indices for B videos of T frames."""
    b, t = num_videos, num_frames
    if mode == "all":
        return torch.arange(t).expand(b, t)
    if mode == "fml":
        return torch.tensor([0, t // 2, t - 1]).expand(b, 3)
    if mode == "random":
        k = min(k or 1, t)
        return torch.stack([torch.randperm(t, generator=generator)[:k] for _ in range(b)])
    if mode == "segments":
        k = min(k or 4, t)
        span = t // k
        return torch.randint(span, (b, k), generator=generator) + torch.arange(k) * span
    raise RewardError(f"unknown frame selection {mode!r}; use one of {', '.join(MODES)}")


class VideoReward(Reward):
    """An image reward applied per frame of `(B, T, 3, H, W)` videos and averaged to `(B,)`.

    `(B, 3, H, W)` images are passed straight to the image reward. Set `generator` for reproducible
    random/segment draws.
    """

    name = "per_frame"  # registered name; an instance takes its image reward's name

    def __init__(
        self,
        image_reward: nn.Module,
        mode: str = "all",
        k: int | None = None,
        generator: torch.Generator | None = None,
        tar_lambda: float | None = None,
    ):
        super().__init__()
        if mode not in MODES:
            raise RewardError(f"unknown frame selection {mode!r}; use one of {', '.join(MODES)}")
        if k is not None and k < 1:
            raise RewardError(f"frame count k must be at least 1, got {k}")
        if tar_lambda is not None and mode != "segments":
            raise RewardError("tar_lambda (temporal attenuation) applies to mode='segments' only")
        self.image_reward = image_reward
        self.mode, self.k, self.generator, self.tar_lambda = mode, k, generator, tar_lambda
        self.name = getattr(image_reward, "name", "reward")
        self.differentiable = bool(getattr(image_reward, "differentiable", False))
        self.freeze()

    @classmethod
    def from_pretrained(
        cls,
        reward: str,
        mode: str = "all",
        k: int | None = None,
        tar_lambda: float | None = None,
        seed: int | None = None,
        **args,
    ) -> VideoReward:
        """Build image reward `reward` (a registered name or `module:attr`, with `args`, e.g. `pretrained`)
        and lift it. seed: makes the random / segment frame draws reproducible (None = torch's global RNG)."""
        import rewards

        generator = None if seed is None else torch.Generator().manual_seed(seed)
        return cls(rewards.build(reward, **args), mode, k, generator, tar_lambda)

    def forward(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if videos.ndim == 4:
            return self.image_reward(videos, prompts).float()
        if videos.ndim != 5 or videos.shape[2] != 3:
            raise RewardError(f"video rewards expect (B, T, 3, H, W) in [0, 1], got {tuple(videos.shape)}")
        b, t = videos.shape[:2]
        if len(prompts) != b:
            raise RewardError(f"got {b} videos but {len(prompts)} prompts; pass one per video")
        idx = select_frames(b, t, self.mode, self.k, self.generator).to(videos.device)  # (B, S)
        s = idx.shape[1]
        frames = videos[torch.arange(b, device=videos.device)[:, None], idx]  # (B, S, 3, H, W)
        scores = self.image_reward(frames.flatten(0, 1), [p for p in prompts for _ in range(s)])
        scores = scores.float().view(b, s)
        if self.tar_lambda is not None:
            scores = scores * torch.exp(-self.tar_lambda * (idx - t // 2).abs().float())
        return scores.mean(1)


def per_frame(
    reward: nn.Module,
    mode: str = "all",
    k: int | None = None,
    generator: torch.Generator | None = None,
    tar_lambda: float | None = None,
) -> VideoReward:
    """Lift an image reward to videos; see the module docstring for the modes."""
    return VideoReward(reward, mode, k, generator, tar_lambda)
