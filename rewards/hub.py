"""Find checkpoint files: a local file, a local directory holding the official file name, or a hub repo."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from rewards.errors import RewardError, load_error

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def resolve_file(pretrained: str | os.PathLike, filename: str, name: str) -> Path:
    """`pretrained` as a file, or `pretrained/filename`, or `filename` from the hub repo `pretrained`."""
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / filename).is_file():
            return path / filename
        raise RewardError(f"{name}: {path} has no {filename}; pass the file itself or a directory holding it")
    text = str(pretrained)
    looks_local = (
        text.startswith((".", "/", "~")) or text.count("/") > 1 or path.suffix in CHECKPOINT_SUFFIXES
    )
    if looks_local:
        raise RewardError(f"{name}: {pretrained} does not exist; pass an existing file or directory")
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(str(pretrained), filename))
    except Exception as e:  # offline, missing repo/file, auth: all end the same way for the user
        raise load_error(name, filename, f"hub repo {pretrained}", e) from e


def load_state_dict(path: str | os.PathLike, name: str) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors` or a torch pickle (weights_only); unwraps `{"state_dict": ...}`."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RewardError(f"{name}: {path} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise RewardError(f"{name}: {path} holds a {type(sd).__name__}, not a state dict")
    # DDP-trained checkpoints prefix every key with "module."
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_into(module: torch.nn.Module, sd: dict[str, torch.Tensor], name: str, source: str) -> None:
    """`module.load_state_dict(sd)` (strict) with a one-line error naming missing/unexpected keys."""
    try:
        module.load_state_dict(sd)
    except RuntimeError as e:
        missing = set(module.state_dict()) - set(sd)
        unexpected = set(sd) - set(module.state_dict())
        detail = f"missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}"
        if not missing and not unexpected:
            detail = str(e).strip().splitlines()[-1].strip()
        raise RewardError(f"{name}: {source} does not match the expected architecture ({detail})") from e
