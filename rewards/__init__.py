"""Reward models for diffusion fine-tuning and image/video scoring.

A leaf package of the diffusion-align distribution: it never imports `diffusion_align`, and importing it
builds no model and loads neither transformers nor open_clip (the registry holds import paths, resolved
on `build`).

    import rewards
    r = rewards.build("aesthetic")                        # hub weights (or pretrained=/local/path)
    scores = r(images, prompts)                           # images (B, 3, H, W) in [0, 1] -> (B,) float32
    video = rewards.per_frame(r, "segments", k=4)         # (B, T, 3, H, W) -> (B,)
    mix = rewards.Combined({"aesthetic": r, "jpeg": rewards.build("jpeg_compressibility")}, {"jpeg": 0.1})
"""

from __future__ import annotations

import difflib
import importlib

from rewards.errors import RewardError

# Short name -> "module:ClassOrFactory". Classes are built with `from_pretrained(**kwargs)`, factories
# are called with `**kwargs`. Add one line per reward.
REWARDS: dict[str, str] = {
    "aesthetic": "rewards.aesthetic:AestheticReward",
    "aesthetic_v25": "rewards.aesthetic_v25:AestheticV25Reward",
    "clip": "rewards.clip_score:CLIPScoreReward",
    "pickscore": "rewards.pickscore:PickScoreReward",
    "hpsv2": "rewards.hps:HPSReward",
    "imagereward": "rewards.imagereward:ImageRewardReward",
    "jpeg_compressibility": "rewards.jpeg:JpegCompressibility",
    "jpeg_incompressibility": "rewards.jpeg:JpegIncompressibility",
    "artifact_judge": "rewards.artifact:ArtifactJudge",
    "artifact_head": "rewards.artifact_head:ArtifactHead",
    "shapes_color": "rewards.shapes:ShapesColorReward",
    "shapes_count": "rewards.shapes:ShapesCountReward",
    "shapes_color_soft": "rewards.shapes:ShapesColorSoftReward",
    "shapes_match": "rewards.shapes:ShapesMatchReward",
    "per_frame": "rewards.video:VideoReward",  # a video reward: args {reward: <image reward>, mode, k, ...}
}

# Re-exports, imported on first use so `import rewards` stays light.
_LAZY = {
    "Reward": "rewards.base:Reward",
    "weighted_sum": "rewards.combine:weighted_sum",
    "Combined": "rewards.combine:Combined",
    "per_frame": "rewards.video:per_frame",
    "VideoReward": "rewards.video:VideoReward",
}

__all__ = ["REWARDS", "RewardError", "build", "resolve", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return _import(_LAZY[name], name)
    raise AttributeError(f"module 'rewards' has no attribute {name!r}")


def _import(target: str, name: str):
    module, _, attr = target.partition(":")
    if not module or not attr:
        raise RewardError(f"reward {name!r}: expected 'package.module:attr', got {target!r}")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise RewardError(f"reward {name!r}: cannot import module {module!r} ({e})") from e
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise RewardError(f"reward {name!r}: module {module!r} has no attribute {attr!r}") from None


def resolve(name: str):
    """The class or factory behind a registered name or a `module:attr` path (not yet built)."""
    if name in REWARDS:
        return _import(REWARDS[name], name)
    if ":" in name:
        return _import(name, name)
    near = difflib.get_close_matches(name, REWARDS, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(near)}? " if near else ""
    raise RewardError(
        f"unknown reward {name!r}; {hint}known: {', '.join(sorted(REWARDS))} (or 'package.module:attr')"
    )


def build(name: str, **kwargs):
    """Build a reward by registered name or `module:attr` path.

    Classes with `from_pretrained` get `from_pretrained(**kwargs)` (e.g. `pretrained=` a hub id or a
    local path); other callables (factories, plain classes) are called with `**kwargs`.
    """
    import torch

    target = resolve(name)
    make = getattr(target, "from_pretrained", None) if isinstance(target, type) else None
    try:
        reward = make(**kwargs) if make is not None else target(**kwargs)
    except TypeError as e:
        if "argument" not in str(e):
            raise
        raise RewardError(f"reward {name!r}: bad arguments {sorted(kwargs)} ({e})") from e
    if not isinstance(reward, torch.nn.Module) and not callable(reward):
        raise RewardError(f"reward {name!r} built a {type(reward).__name__}, which is not callable")
    return reward
