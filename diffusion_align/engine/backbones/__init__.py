"""Backbone loading: a built-in name (`tiny-sd`, `tiny-sdxl`, bundled models), a local pipeline folder or a
Hugging Face hub id. One module per model family, each implementing the `protocol.Backbone` members the
engine uses; this file only maps pipeline classes to families, resolves names and reports failures."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from diffusion_align.engine.backbones.flux import FluxBackbone
from diffusion_align.engine.backbones.sd3 import SD3Backbone
from diffusion_align.engine.backbones.stable_diffusion import PromptEmbeds, StableDiffusionBackbone
from diffusion_align.engine.backbones.video import VideoBackbone
from diffusion_align.engine.backbones.wan import WanBackbone
from diffusion_align.errors import UserError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SUPPORTED_PIPELINES = {
    "StableDiffusionPipeline": StableDiffusionBackbone,
    "StableDiffusionXLPipeline": StableDiffusionBackbone,
    "LatentConsistencyModelPipeline": StableDiffusionBackbone,
    "AnimateDiffPipeline": VideoBackbone,
    "TextToVideoSDPipeline": VideoBackbone,
    "StableDiffusion3Pipeline": SD3Backbone,
    "FluxPipeline": FluxBackbone,
    "WanPipeline": WanBackbone,
}

__all__ = [
    "PromptEmbeds",
    "StableDiffusionBackbone",
    "VideoBackbone",
    "SD3Backbone",
    "FluxBackbone",
    "WanBackbone",
    "load_backbone",
    "resolve_device",
    "DTYPES",
]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def tiny_pipeline(name: str):
    """The built-in tiny random pipeline `name` (tiny-sd, tiny-flux, ...), built; None for any other name."""
    from diffusion_align.testing import TINY_PIPELINES
    from diffusion_align.testing_flow import TINY_FLOW_PIPELINES
    from diffusion_align.testing_video import TINY_VIDEO_PIPELINES

    tiny = {**TINY_PIPELINES, **TINY_VIDEO_PIPELINES, **TINY_FLOW_PIPELINES}
    return tiny[name]() if name in tiny else None


def _builtin_pipeline(name: str, dtype):
    from diffusion_align.bundled import BUNDLED

    pipe = tiny_pipeline(name)
    if pipe is not None:
        return pipe
    if name in BUNDLED:
        return _load_pipeline(str(BUNDLED[name]), dtype, None, None)
    return None


def _missing_model_message(pretrained: str, error: Exception) -> str:
    local = Path(pretrained).expanduser().resolve()
    hub_home = os.environ.get("HF_HOME", str(Path("~/.cache/huggingface").expanduser()))
    offline = (
        " (HF_HUB_OFFLINE=1 is set, so only the cache was searched)"
        if os.environ.get("HF_HUB_OFFLINE")
        else " (set HF_HUB_OFFLINE=1 to skip the network on machines without it)"
    )
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"could not load model '{pretrained}': no pipeline folder at {local} and not loadable from the "
        f"Hugging Face hub or its cache under HF_HOME={hub_home}{offline} [{reason}]. Pass a local diffusers "
        "folder (model.pretrained=/path/to/pipeline with model_index.json), download it first with "
        "`huggingface-cli download ID`, or use a built-in model: tiny-sd, tiny-sdxl, tiny-animatediff, "
        "tiny-t2v, tiny-sd3, tiny-flux, tiny-wan, shapes, shapes-flow"
    )


def _load_pipeline(pretrained: str, dtype, revision, variant):
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(pretrained, revision=revision)
    except (OSError, ValueError) as e:
        raise UserError(_missing_model_message(pretrained, e)) from e
    class_name = index.get("_class_name", "?")
    if class_name not in SUPPORTED_PIPELINES:
        raise UserError(
            f"model '{pretrained}' is a {class_name}; supported pipelines: {', '.join(SUPPORTED_PIPELINES)}"
        )
    extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
    # Components saved as absent (e.g. SD3 without T5) load only when passed as None explicitly.
    extra.update({name: None for name, value in index.items() if value == [None, None]})
    keep = SUPPORTED_PIPELINES[class_name].float32_components
    if keep and dtype != torch.float32:
        dtype = {"default": dtype, **dict.fromkeys(keep, torch.float32)}
    try:
        pipe = DiffusionPipeline.from_pretrained(
            pretrained, dtype=dtype, revision=revision, variant=variant, **extra
        )
    except (OSError, ValueError) as e:
        raise UserError(_missing_model_message(pretrained, e)) from e
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_backbone(
    pretrained: str,
    dtype: str = "float32",
    device: str = "auto",
    revision: str | None = None,
    variant: str | None = None,
) -> StableDiffusionBackbone:
    """Load a backbone by built-in name, local folder or hub id, cast to `dtype`, on `device`."""
    if dtype not in DTYPES:
        raise UserError(f"model.dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    pipe = _builtin_pipeline(pretrained, DTYPES[dtype]) or _load_pipeline(
        pretrained, DTYPES[dtype], revision, variant
    )
    backbone = SUPPORTED_PIPELINES.get(type(pipe).__name__, StableDiffusionBackbone)(pipe)
    for key, value in _bundled_defaults(pretrained).items():
        setattr(backbone, key, value)
    return backbone.to(device=resolve_device(device), dtype=DTYPES[dtype])


def _bundled_defaults(name: str) -> dict:
    from diffusion_align.bundled import BUNDLED_MODEL_DEFAULTS

    return BUNDLED_MODEL_DEFAULTS.get(name, {})
