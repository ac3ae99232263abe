"""Bundled models, addressable by a short name from configs (`model.pretrained: shapes`).

`shapes` is a StableDiffusionPipeline folder and `shapes-clip` a CLIPModel folder, both trained on the
synthetic shapes world (`diffusion-align zoo build shapes` re-creates them; see shapes_recipe.py).
"""

from __future__ import annotations

from pathlib import Path

from diffusion_align.errors import UserError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED: dict[str, Path] = {
    "shapes": ASSETS / "shapes" / "pipeline",
    "shapes-clip": ASSETS / "shapes" / "clip",
}


def bundled_path(name: str) -> Path:
    """The folder of bundled model `name`; UserError naming the bundled models when unknown or missing."""
    if name not in BUNDLED:
        raise UserError(f"unknown bundled model {name!r}; bundled models are: {', '.join(sorted(BUNDLED))}")
    path = BUNDLED[name]
    if not path.is_dir():
        raise UserError(
            f"bundled model {name!r} is missing at {path}; reinstall diffusion-align or rebuild it with "
            f"`diffusion-align zoo build shapes --out {path.parent}`"
        )
    return path


def resolve_reward_args(args: dict) -> dict:
    """A reward's loader arguments with a bundled name (`pretrained: shapes-clip`) replaced by its folder
    (the rewards package cannot resolve it: it never imports diffusion_align)."""
    if args.get("pretrained") in BUNDLED:
        return {**args, "pretrained": str(bundled_path(args["pretrained"]))}
    return dict(args)
