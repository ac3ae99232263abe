"""What `zoo build shapes` writes beside the models: `data.json` (the data splits, the recipe, timings and
measured metrics) and the prompt lists the runtime serves as `shapes_train` / `shapes_heldout`."""

from __future__ import annotations

import json
from pathlib import Path

from diffusion_align.bundled import PROMPT_LISTS, SHAPES
from diffusion_align.zoo import shapes_data as data


def splits() -> dict:
    return {
        "image_size": data.IMAGE_SIZE,
        "split_seeds": data.SPLIT_SEEDS,
        "image_i_of_split": "diffusion_align.zoo.shapes_data.sample: default_rng([split_seed, i])",
        "heldout_color_shape_pairs": [list(p) for p in data.HELDOUT_COLOR_SHAPE],
        "heldout_shape_background_pairs": [list(p) for p in data.HELDOUT_SHAPE_BACKGROUND],
        "n_combinations": {s: len(data.split_scenes(s)) for s in ("train", "heldout")},
        "heldout_prompts": data.heldout_prompts(),
    }


def write_card(path: Path, **sections) -> dict:
    """Create or update `path` (JSON): the splits are always rewritten, other sections merged in."""
    card = json.loads(path.read_text()) if path.exists() else {}
    card["splits"] = splits()
    card.update(sections)
    path.write_text(json.dumps(card, indent=1) + "\n")
    return card


def prompt_lists() -> dict[str, list[str]]:
    """Built-in list name -> its prompts: every training scene's caption and the fixed held-out list."""
    return {
        "shapes_train": [scene.caption() for scene in data.split_scenes("train")],
        "shapes_heldout": data.heldout_prompts(),
    }


def write_prompt_lists(out: Path) -> None:
    """The prompt list files under build folder `out`, where `bundled.PROMPT_LISTS` reads them from."""
    for name, prompts in prompt_lists().items():
        path = Path(out) / PROMPT_LISTS[name].relative_to(SHAPES)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
