"""Prompt sources for training and evaluation: built-in lists, a `.txt` file or a `.jsonl` file.

    load_prompts("shapes_train")          # built-in name
    load_prompts("my_prompts.txt")        # one prompt per line (blank lines and `#` comments skipped)
    load_prompt_records("data.jsonl")     # [{"prompt": ..., <any metadata>}, ...]

Built-in lists:
- `shapes_train` / `shapes_heldout`: captions of the synthetic shapes world the bundled `shapes` model was
  trained on: every training scene's caption, and the fixed held-out list (combinations never seen in
  training). They ship as files beside the model (`diffusion_align.bundled.PROMPT_LISTS`).
- `simple_animals`: common animal names, in the spirit of the DDPO paper's prompt set (Black et al. 2023
  train on a list of 45 common animals); this list is our own, written for this project.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusion_align.bundled import PROMPT_LISTS, prompt_list_path
from diffusion_align.errors import UserError

# Our own list of everyday animals (origin: the idea of DDPO's `simple_animals` prompt set; not a copy).
SIMPLE_ANIMALS = (
    "cat", "dog", "horse", "cow", "pig", "sheep", "goat", "rabbit", "hamster", "mouse",
    "chicken", "duck", "goose", "turkey", "donkey", "llama", "camel", "deer", "fox", "wolf",
    "bear", "lion", "tiger", "leopard", "cheetah", "elephant", "giraffe", "zebra", "hippo", "rhino",
    "monkey", "gorilla", "kangaroo", "koala", "panda", "raccoon", "squirrel", "hedgehog", "owl", "eagle",
    "parrot", "penguin", "swan", "frog", "turtle",
)  # fmt: skip


def _bundled_list(name: str):
    return lambda: [record["prompt"] for record in _read_txt(prompt_list_path(name))]


# name -> zero-argument function returning the list
BUILTIN = {
    **{name: _bundled_list(name) for name in PROMPT_LISTS},
    "simple_animals": lambda: list(SIMPLE_ANIMALS),
}


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: not valid JSON ({e.msg}); expected one object per line") from e
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise UserError(f'{path}:{number}: expected an object with a "prompt" string, got {line[:80]!r}')
        records.append(record)
    return records


def _read_txt(path: Path) -> list[dict]:
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [{"prompt": line} for line in lines if line and not line.startswith("#")]


def load_prompt_records(source: str | Path) -> list[dict]:
    """Prompts with their metadata: a list of dicts, each with at least a "prompt" string."""
    name = str(source)
    if name in BUILTIN:
        records = [{"prompt": p} for p in BUILTIN[name]()]
    else:
        path = Path(name).expanduser()
        if not path.is_file():
            raise UserError(
                f"prompt source {name!r} is neither a built-in list ({', '.join(BUILTIN)}) nor a file "
                f"(looked for {path.resolve()}; a config file's relative paths are looked up next to it "
                "first, then in the current directory); give a .txt (one prompt per line) or a .jsonl with a "
                '"prompt" key'
            )
        if path.suffix == ".jsonl":
            records = _read_jsonl(path)
        elif path.suffix in (".txt", ""):
            records = _read_txt(path)
        else:
            raise UserError(f"prompt file {path}: unknown extension {path.suffix!r}; use .txt or .jsonl")
    records = [r for r in records if r["prompt"].strip()]
    if not records:
        raise UserError(f"prompt source {name!r} has no prompts; add at least one non-empty prompt")
    return records


def load_prompts(source: str | Path) -> list[str]:
    """The prompt strings of a source (built-in name, .txt or .jsonl), in file order."""
    return [r["prompt"] for r in load_prompt_records(source)]
