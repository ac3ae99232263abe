"""Configuration: YAML into strict dataclasses (`loading`), the toolkit's schema (`settings`), what a resume
may change (`changes`), config sections to objects (`registry`) and one run per folder (`run_folder`).

    from diffusion_align.config import load_config
    config = load_config("configs/quickstart.yaml", ["train.epochs=2"])
"""

from __future__ import annotations

from pathlib import Path

from diffusion_align.config import loading


def load_config(source: str | Path | dict, overrides: list[str] = (), cls: type | None = None):
    """`loading.load_config` into `cls`, by default the toolkit's `settings.Config`."""
    if cls is None:
        from diffusion_align.config.settings import Config as cls
    return loading.load_config(source, overrides, cls=cls)
