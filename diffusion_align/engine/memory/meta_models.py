"""A pipeline's models built on the meta device from their config files only: shapes and dtypes, no weights.

`model_index.json` names each component's library and class; diffusers models are built with
`Class.from_config(Class.load_config(path, subfolder=name))` and transformers ones with `AutoConfig` +
`Class._from_config`, both under `accelerate.init_empty_weights()`. From a hub id only those JSON files are
fetched (or read from the cache). Built-in tiny models (tiny-sd, ...) are small: they are built for real.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffusion_align.engine.backbones import SUPPORTED_PIPELINES, tiny_pipeline
from diffusion_align.errors import UserError

DENOISERS = ("unet", "transformer")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass
class MetaPipeline:
    """The models of one pipeline (on the meta device unless built-in), with its class and family backbone."""

    class_name: str
    denoiser: torch.nn.Module
    text_encoders: dict[str, torch.nn.Module] = field(default_factory=dict)
    vae: torch.nn.Module | None = None

    @property
    def backbone_class(self):
        return SUPPORTED_PIPELINES[self.class_name]


def build_meta_pipeline(pretrained: str, revision: str | None = None) -> MetaPipeline:
    """`pretrained` as the training config names it: a built-in name, a local pipeline folder or a hub id."""
    from diffusion_align.bundled import BUNDLED, bundled_path

    builtin = tiny_pipeline(pretrained)
    if builtin is not None:
        return _from_pipeline(builtin)
    path = str(bundled_path(pretrained)) if pretrained in BUNDLED else pretrained
    index = _read_index(path, revision)
    class_name = index.get("_class_name", "?")
    if class_name not in SUPPORTED_PIPELINES:
        raise UserError(
            f"model '{pretrained}' is a {class_name}; supported pipelines: {', '.join(SUPPORTED_PIPELINES)}"
        )
    models = {
        name: _meta_model(path, name, spec[0], spec[1], revision)
        for name, spec in index.items()
        if name in DENOISERS + TEXT_ENCODERS + ("vae",) and isinstance(spec, list) and spec[0] is not None
    }
    denoiser = next((models[n] for n in DENOISERS if n in models), None)
    if denoiser is None:
        raise UserError(f"model '{pretrained}' has no unet or transformer in {path}/model_index.json")
    encoders = {n: models[n] for n in TEXT_ENCODERS if n in models}
    return MetaPipeline(class_name, denoiser, encoders, models.get("vae"))


def _from_pipeline(pipe) -> MetaPipeline:
    denoiser = next(getattr(pipe, n) for n in DENOISERS if getattr(pipe, n, None) is not None)
    encoders = {n: getattr(pipe, n) for n in TEXT_ENCODERS if getattr(pipe, n, None) is not None}
    return MetaPipeline(type(pipe).__name__, denoiser, encoders, getattr(pipe, "vae", None))


def _where(path: str) -> str:
    local = Path(path).expanduser()
    if local.exists():
        return f"the folder {local.resolve()}"
    return f"no folder {local.resolve()}, and the Hugging Face hub (or its cache) for id '{path}'"


def _read_index(path: str, revision: str | None) -> dict:
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(path, revision=revision)
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot read model_index.json of '{path}': looked in {_where(path)}; pass a diffusers pipeline "
            "folder or a hub id (only its config files are read)"
        ) from e


def _meta_model(path: str, name: str, library: str, class_name: str, revision: str | None):
    from accelerate import init_empty_weights

    try:
        if library == "diffusers":
            import diffusers

            cls = getattr(diffusers, class_name)
            config = cls.load_config(path, subfolder=name, revision=revision)
            with init_empty_weights():
                return cls.from_config(config)
        import transformers

        config = transformers.AutoConfig.from_pretrained(path, subfolder=name, revision=revision)
        with init_empty_weights():
            model = getattr(transformers, class_name)._from_config(config)
        model.tie_weights()  # T5's shared embedding: under init_empty_weights it is left as two tensors
        return model
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(
            f"cannot read the config of '{name}' ({library} {class_name}) of '{path}': looked in "
            f"{_where(path)}, subfolder {name}/ [{str(e).strip().splitlines()[0] if str(e).strip() else e}]"
        ) from e
