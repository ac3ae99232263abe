"""Bundled models and their prompt lists, as the runtime sees them: a short name -> a folder or a file.

`shapes` is a StableDiffusionPipeline folder and `shapes-clip` a CLIPModel folder, both trained on the
synthetic shapes world; `shapes_train` / `shapes_heldout` are the captions it was trained on and the fixed
held-out list (combinations never seen in training). All of it is data under `assets/shapes/`, written by
`diffusion-align zoo build shapes` (build-only code in `diffusion_align.zoo`; the runtime never imports it).
`shapes-flow` (`assets/shapes_flow/`, `zoo build shapes-flow`) is a StableDiffusion3Pipeline folder of the
same world and prompt lists: an SD3-style flow transformer around the shapes VAE and CLIP text tower.
The prompt lists ship as text files rather than being regenerated here: they belong to the trained model
(a rebuilt split would no longer match the shipped weights) and a file does not depend on numpy's RNG.
"""

from __future__ import annotations

from pathlib import Path

from diffusion_align.errors import UserError

ASSETS = Path(__file__).resolve().parent / "assets"
SHAPES = ASSETS / "shapes"  # the folder `zoo build shapes --out` writes
SHAPES_FLOW = ASSETS / "shapes_flow"  # the folder `zoo build shapes-flow --out` writes
BUNDLED: dict[str, Path] = {
    "shapes": SHAPES / "pipeline",
    "shapes-clip": SHAPES / "clip",
    "shapes-flow": SHAPES_FLOW / "pipeline",
}
# Loading defaults a bundled model was trained with. shapes-flow has no T5: the SD3 pipeline feeds that many
# zero rows in its place, and the model saw one (`pipe(prompt, max_sequence_length=1)` outside this toolkit).
BUNDLED_MODEL_DEFAULTS: dict[str, dict] = {"shapes-flow": {"max_sequence_length": 1}}
# Built-in prompt list name -> its file (one prompt per line), beside the model it belongs to.
PROMPT_LISTS: dict[str, Path] = {
    "shapes_train": SHAPES / "prompts" / "train.txt",
    "shapes_heldout": SHAPES / "prompts" / "heldout.txt",
}


def _missing(what: str, path: Path) -> UserError:
    world, folder = ("shapes-flow", SHAPES_FLOW) if path.is_relative_to(SHAPES_FLOW) else ("shapes", SHAPES)
    return UserError(
        f"bundled {what} is missing at {path}; reinstall diffusion-align or rebuild it with "
        f"`diffusion-align zoo build {world} --out {folder}`"
    )


def bundled_path(name: str) -> Path:
    """The folder of bundled model `name`; UserError naming the bundled models when unknown or missing."""
    if name not in BUNDLED:
        raise UserError(f"unknown bundled model {name!r}; bundled models are: {', '.join(sorted(BUNDLED))}")
    path = BUNDLED[name]
    if not path.is_dir():
        raise _missing(f"model {name!r}", path)
    return path


def prompt_list_path(name: str) -> Path:
    """The file of built-in prompt list `name` (a key of PROMPT_LISTS); UserError when it is missing."""
    path = PROMPT_LISTS[name]
    if not path.is_file():
        raise _missing(f"prompt list {name!r}", path)
    return path


def resolve_reward_args(args: dict) -> dict:
    """A reward's loader arguments with a bundled name (`pretrained: shapes-clip`) replaced by its folder
    (the rewards package cannot resolve it: it never imports diffusion_align)."""
    if args.get("pretrained") in BUNDLED:
        return {**args, "pretrained": str(bundled_path(args["pretrained"]))}
    return dict(args)
