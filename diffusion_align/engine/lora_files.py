"""Which base model a saved LoRA belongs to, and a one-line error when it is loaded onto another.

`record_base(directory, model)` writes `base_model.json` ({"pretrained": model id}) next to
`pytorch_lora_weights.safetensors`; `check_lora_fits(directory, unet, model)` runs before loading: a LoRA
recorded for another model, or whose tensors do not fit this UNet (missing module, other width), is a
`UserError` naming both models. A LoRA without the record (older runs, other tools) is judged by shapes only.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusion_align.errors import UserError

WEIGHTS = "pytorch_lora_weights.safetensors"
BASE_FILE = "base_model.json"
# (key suffix, the module side it meets): down/A reads the module's input, up/B writes its output
_SUFFIXES = (
    (".lora.down.weight", "in"),
    (".lora.up.weight", "out"),
    (".lora_A.weight", "in"),
    (".lora_B.weight", "out"),
)


def record_base(directory: str | Path, model: str) -> Path:
    """Write which base model the LoRA in `directory` was trained on (call right after saving it)."""
    path = Path(directory) / BASE_FILE
    path.write_text(json.dumps({"pretrained": str(model)}) + "\n")
    return path


def recorded_base(directory: str | Path) -> str | None:
    path = Path(directory) / BASE_FILE
    try:
        return str(json.loads(path.read_text())["pretrained"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()  # one local folder named two ways
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _module_size(module, side: str) -> int | None:
    base = getattr(module, "base_layer", module)  # a module that already carries a peft adapter
    for name in ("in_features", "in_channels") if side == "in" else ("out_features", "out_channels"):
        if isinstance(getattr(base, name, None), int):
            return getattr(base, name)
    return None


def _mismatch(directory: Path, unet, prefix: str = "unet.") -> str | None:
    """The first LoRA tensor that does not fit `unet`, as a short reason; None when all fit."""
    from safetensors import safe_open

    modules = dict(unet.named_modules())
    with safe_open(str(directory / WEIGHTS), framework="pt") as f:
        for key in f.keys():
            if not key.startswith(prefix):
                continue  # text-encoder LoRAs are not ours to judge
            match = next(((suffix, side) for suffix, side in _SUFFIXES if key.endswith(suffix)), None)
            if match is None:
                continue
            suffix, side = match
            path = key[len(prefix) : -len(suffix)]
            if path not in modules:
                return f"it adapts {path}, which this UNet does not have"
            shape = f.get_slice(key).get_shape()
            want = _module_size(modules[path], side)
            got = shape[1] if side == "in" else shape[0]
            if want is not None and got != want:
                return f"{path} has {side}put width {want} here, {got} in the LoRA"
    return None


def check_lora_fits(
    directory: str | Path, unet, model: str | None, flag: str = "--lora", prefix: str = "unet."
) -> None:
    """One-line UserError unless the LoRA in `directory` was made for `model` (None: not checked by name)
    and fits `unet` (the denoiser, whose keys in the file start with `prefix`: "transformer." for DiTs)."""
    directory = Path(directory)
    if not (directory / WEIGHTS).is_file():
        raise UserError(f"{flag} {directory}: no {WEIGHTS} there (pass a run's lora/ folder)")
    base = recorded_base(directory)
    if base is not None and model is not None and not _same_model(base, model):
        raise UserError(
            f"{flag} {directory} was trained on {base}, not on {model}: use --model {base} (or "
            f"model.pretrained), or a LoRA trained on {model}; if both name one model, edit {BASE_FILE}"
        )
    reason = _mismatch(directory, unet, prefix)
    if reason:
        trained_on = base or "another model (no base_model.json recorded)"
        raise UserError(
            f"{flag} {directory} does not fit {model or 'this model'} ({reason}): it was trained on "
            f"{trained_on}; use the base model it was trained on"
        )
