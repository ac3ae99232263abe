"""Config sections to objects, one piece at a time (backbone, policy, reward): what `builder.build_run` and
the commands (sample, score, reno, search) assemble. Everything built here takes plain arguments."""

from __future__ import annotations

from pathlib import Path

from diffusion_align.config.settings import (
    LoraSettings,
    ModelSettings,
    RewardSettings,
    SampleSettings,
    check_num_steps,
)
from diffusion_align.engine.backbones import load_backbone
from diffusion_align.engine.policy import Policy
from diffusion_align.errors import UserError
from diffusion_align.math.flow_samplers import FlowMatchSampler
from diffusion_align.math.samplers import DDIMSampler
from rewards.combine import Combined


def build_backbone(model: ModelSettings):
    backbone = load_backbone(model.pretrained, model.dtype, model.device, model.revision, model.variant)
    _set_family_options(
        backbone, model.pretrained, "video models",
        num_frames=model.num_frames, grad_decode_frames=model.grad_decode_frames,
    )  # fmt: skip
    _set_family_options(
        backbone, model.pretrained, "models with a T5 encoder (SD3, FLUX, Wan)",
        max_sequence_length=model.max_sequence_length,
    )  # fmt: skip
    backbone.enable_memory_options(
        gradient_checkpointing=model.gradient_checkpointing,
        vae_slicing=model.vae_slicing,
        vae_tiling=model.vae_tiling,
        attention=model.attention,
        offload_text_encoders=model.offload_text_encoders,
    )
    return backbone


def _set_family_options(backbone, name: str, family: str, **options) -> None:
    """Set the options that are not None on the backbone; a UserError when its family has none of them."""
    given = {k: v for k, v in options.items() if v is not None}
    if given and not all(hasattr(backbone, k) for k in given):
        raise UserError(
            f"model.{' and model.'.join(given)} apply to {family}; {name} is not one: remove them"
        )
    for key, value in given.items():
        setattr(backbone, key, value)


def build_sampler(backbone, sample: SampleSettings) -> DDIMSampler | FlowMatchSampler:
    """DDIM-eta for SD/SDXL/video; for flow backbones (those with a `schedule`: SD3, FLUX) the flow sampler
    with `sample.eta` as its noise level (0 = the pipelines' Euler ODE) on the pipeline's schedule at the
    sampled size."""
    check_num_steps(sample.num_steps, backbone.scheduler)
    if sample.eval_num_steps is not None:
        check_num_steps(sample.eval_num_steps, backbone.scheduler, "sample.eval_num_steps")
    if hasattr(backbone, "schedule"):
        size = (sample.height, sample.width) if sample.height and sample.width else None
        return FlowMatchSampler.for_backbone(backbone, sample.eta, sample.sde, size)
    return DDIMSampler.from_scheduler(backbone.scheduler, eta=sample.eta)


def build_policy(backbone, sample: SampleSettings, lora: LoraSettings) -> Policy:
    sampler = build_sampler(backbone, sample)
    return Policy(backbone, sampler, lora.rank, lora.alpha, lora.dropout, lora.target_modules)


def build_reward(rewards_settings: list[RewardSettings], device=None, record: bool = False) -> Combined:
    """The configured rewards as one `rewards.Combined` (weighted, optionally running-normalised; `record`:
    keep every `score` call for `take()`); component names are the reward names (`name_2`, ... when a
    reward appears twice, e.g. with different args)."""
    import rewards as rewards_lib
    from diffusion_align.bundled import resolve_reward_args

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
    combined = Combined(models, weights, normalize, record=record)
    if device is not None:
        combined.to(device)
    return combined


def custom_components(config) -> list[dict]:
    """Every reward or strategy the config names as `package.module:attr` (code it imports and runs), with
    the file that code comes from: [{"key", "ref", "file"}]."""
    import rewards as rewards_lib
    from diffusion_align.methods.strategies import STRATEGY_CONFIGS

    found = []
    for section in ("rewards", "eval_rewards"):
        for i, settings in enumerate(getattr(config, section)):
            refs = {f"{section}.{i}.name": settings.name}
            if settings.name == "per_frame":  # the video reward builds its image reward by name too
                refs[f"{section}.{i}.args.reward"] = settings.args.get("reward")
            for key, ref in refs.items():
                if isinstance(ref, str) and ref not in rewards_lib.REWARDS:
                    found.append(_code_origin(key, ref, rewards_lib.resolve(ref)))
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
