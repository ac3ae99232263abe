"""Per-frame video rewards buildable from a config, for training on video backbones.

    rewards:
      - name: diffusion_align.video_rewards:frame_reward
        args: {reward: shapes_color_soft, mode: random, k: 1}

lifts any registered image reward (or `module:attr`) with `rewards.per_frame` (modes all / random / fml /
segments, see rewards/video.py). `(B, 3, H, W)` images still pass straight through.
"""

from __future__ import annotations

import torch


def frame_reward(
    reward: str,
    mode: str = "all",
    k: int | None = None,
    tar_lambda: float | None = None,
    seed: int | None = None,
    **args,
):
    """Build image reward `reward` (with `args`) and average it over the selected frames of each video.

    seed: makes the random / segment frame draws reproducible (None = torch's global RNG).
    """
    import rewards

    image_reward = rewards.build(reward, **args)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return rewards.per_frame(image_reward, mode=mode, k=k, generator=generator, tar_lambda=tar_lambda)
