"""Config sections to objects, one piece at a time (backbone, policy, reward): what `builder.build_run` and
the commands (sample, score, reno, search) assemble. Everything built here takes plain arguments."""

from __future__ import annotations

from pathlib import Path

import torch

from diffusion_align.backbones import load_backbone
from diffusion_align.errors import UserError
from diffusion_align.policy import Policy
from diffusion_align.samplers import DDIMSampler
from diffusion_align.settings import (
    LoraSettings,
    ModelSettings,
    RewardSettings,
    SampleSettings,
    check_num_steps,
)


def build_backbone(model: ModelSettings):
    backbone = load_backbone(model.pretrained, model.dtype, model.device, model.revision, model.variant)
    video = {"num_frames": model.num_frames, "grad_decode_frames": model.grad_decode_frames}
    if hasattr(backbone, "num_frames"):
        for key, value in video.items():
            if value is not None:
                setattr(backbone, key, value)
    elif any(v is not None for v in video.values()):
        raise UserError(
            f"model.num_frames and model.grad_decode_frames apply to video models; {model.pretrained} makes "
            "images: remove them"
        )
    backbone.enable_memory_options(
        gradient_checkpointing=model.gradient_checkpointing,
        vae_slicing=model.vae_slicing,
        vae_tiling=model.vae_tiling,
        attention=model.attention,
    )
    return backbone


def build_sampler(backbone, sample: SampleSettings) -> DDIMSampler:
    check_num_steps(sample.num_steps, backbone.scheduler)
    return DDIMSampler.from_scheduler(backbone.scheduler, eta=sample.eta)


def build_policy(backbone, sample: SampleSettings, lora: LoraSettings) -> Policy:
    sampler = build_sampler(backbone, sample)
    return Policy(backbone, sampler, lora.rank, lora.alpha, lora.dropout, lora.target_modules)


class RewardFunction:
    """`(images (B,3,H,W) in [0,1], prompts) -> (total (B,) float32, {name: raw (B,) scores})`.

    A weighted sum (`rewards.combine.Combined`) of the configured rewards. `differentiable` is True only if
    every component is (the total is detached otherwise). `raw_total` is the weighted sum of raw components
    without the running normalisation, so evaluation never changes normaliser state and stays comparable.
    """

    def __init__(self, combined, weights: dict[str, float]):
        self.combined, self.weights = combined, weights
        self.differentiable = combined.differentiable
        self.names = list(weights)

    def __call__(self, images, prompts):
        return self.combined.score(images, prompts)

    def components(self, images, prompts) -> dict:
        """Raw scores of every component, {name: (B,) float32}; no normaliser update."""
        return {name: r(images, prompts).float() for name, r in self.combined.rewards.items()}

    def raw_total(self, components: dict):
        return sum(self.weights[name] * components[name] for name in self.names)

    def state_dict(self) -> dict:
        """Running normaliser statistics (checkpointed so a resumed run normalises exactly the same)."""
        return self.combined.normalizers.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.combined.normalizers.load_state_dict(state)


class RecordingReward:
    """The reward as strategies see it, keeping every call's raw components so the trainer can log them."""

    def __init__(self, reward):
        self.reward = reward
        self.differentiable = reward.differentiable
        self.calls: list[dict[str, torch.Tensor]] = []

    def __call__(self, images, prompts):
        total, components = self.reward(images, prompts)
        self.calls.append({"total": total.detach(), **{k: v.detach() for k, v in components.items()}})
        return total, components

    def take(self) -> dict[str, torch.Tensor]:
        """Concatenated records since the last `take`, {"total" | component: (N,)}; empty if no call."""
        calls, self.calls = self.calls, []
        if not calls:
            return {}
        return {k: torch.cat([c[k].float().flatten() for c in calls]) for k in calls[0]}


def build_reward(rewards_settings: list[RewardSettings], device=None) -> RewardFunction:
    """The configured rewards as one weighted sum; component names are the reward names (`name_2`, ... when a
    reward appears twice, e.g. with different args)."""
    import rewards as rewards_lib
    from diffusion_align.bundled import resolve_reward_args
    from rewards.combine import Combined

    if not rewards_settings:
        raise UserError(
            "no rewards configured: add at least one entry under `rewards:` (e.g. name: jpeg_compressibility)"
        )
    models, weights, normalize = {}, {}, {}
    for settings in rewards_settings:
        name, n = settings.name.rsplit(":", 1)[-1].rsplit(".", 1)[-1], 2
        key = name
        while key in models:
            key, n = f"{name}_{n}", n + 1
        models[key] = rewards_lib.build(settings.name, **resolve_reward_args(settings.args))
        weights[key] = float(settings.weight)
        normalize[key] = "running" if settings.normalize else None
    combined = Combined(models, weights, normalize)
    if device is not None:
        combined.to(device)
    return RewardFunction(combined, weights)


def custom_components(config) -> list[dict]:
    """Every reward or strategy the config names as `package.module:attr` (code it imports and runs), with
    the file that code comes from: [{"key", "ref", "file"}]."""
    import rewards as rewards_lib
    from diffusion_align.strategies import STRATEGY_CONFIGS

    found = []
    for section in ("rewards", "eval_rewards"):
        for i, settings in enumerate(getattr(config, section)):
            if settings.name not in rewards_lib.REWARDS:
                found.append(
                    _code_origin(f"{section}.{i}.name", settings.name, rewards_lib.resolve(settings.name))
                )
    if config.strategy is not None:
        cls = type(config.strategy)
        ref = f"{cls.__module__}:{cls.__qualname__}"
        if ref not in STRATEGY_CONFIGS.values():
            found.append(_code_origin("strategy.name", ref, cls))
    return found


def _code_origin(key: str, ref: str, obj) -> dict:
    import inspect
    import sys

    try:
        file = inspect.getsourcefile(obj) or inspect.getfile(obj)
    except TypeError:  # an object without a source file (built-in, or made at run time)
        file = getattr(sys.modules.get(ref.partition(":")[0]), "__file__", None)
    return {"key": key, "ref": ref, "file": str(Path(file).resolve()) if file else None}
