"""What `diffusion-align score` (and `reno`) read from the command line: --reward NAME[=WEIGHT] and
--reward-arg NAME.KEY=VALUE flags, prompt files and the prompt of each scored file, and --frames."""

from __future__ import annotations

import json
import math
from pathlib import Path

from diffusion_align.errors import UserError


def parse_reward_specs(specs: list[str]) -> list[tuple[str, float]]:
    """["clip=2", "aesthetic"] -> [("clip", 2.0), ("aesthetic", 1.0)]."""
    out: list[tuple[str, float]] = []
    for spec in specs:
        name, sep, weight = spec.partition("=")
        name = name.strip()
        if not name:
            raise UserError(f"--reward {spec!r}: expected NAME or NAME=WEIGHT")
        try:
            w = float(weight) if sep else 1.0
        except ValueError:
            raise UserError(f"--reward {spec!r}: weight {weight!r} is not a number") from None
        if not math.isfinite(w):
            raise UserError(f"--reward {spec!r}: weight {weight!r} must be a finite number")
        if any(n == name for n, _ in out):
            raise UserError(f"--reward {name!r} given twice; give each reward once")
        out.append((name, w))
    return out


def _parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_reward_args(items: list[str], names: list[str]) -> dict[str, dict]:
    """["clip.pretrained=/x", "clip.scale=100"] -> {"clip": {"pretrained": "/x", "scale": 100}}."""
    out: dict[str, dict] = {n: {} for n in names}
    for item in items:
        key, sep, value = item.partition("=")
        name, dot, arg = key.rpartition(".")
        if not sep or not dot or not name or not arg:
            raise UserError(f"--reward-arg {item!r}: expected NAME.KEY=VALUE, e.g. clip.pretrained=/path")
        if name not in out:
            raise UserError(
                f"--reward-arg {item!r}: no --reward {name!r} was given (rewards: {', '.join(names)})"
            )
        out[name][arg] = _parse_value(value)
    return out


def read_prompt_file(path: str) -> dict[str, str]:
    """NAME -> prompt from a "NAME<TAB>prompt" text file or a JSONL file of {"file", "prompt"} rows."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--prompts {path}: no such file")
    table: dict[str, str] = {}
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix.lower() == ".jsonl":
            try:
                row = json.loads(line)
                table[str(row["file"])] = str(row["prompt"])
                table[str((p.parent / str(row["file"])).resolve())] = str(row["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(
                    f'--prompts {path}:{n}: expected a JSON object with "file" and "prompt"'
                ) from None
        else:
            name, tab, prompt = line.partition("\t")
            if not tab:
                raise UserError(f"--prompts {path}:{n}: expected NAME<TAB>prompt")
            table[name.strip()] = prompt.strip()
    return table


def resolve_prompt(
    path: Path, table: dict[str, str], default: str | None, indexed: dict[Path, str] | None = None
) -> str | None:
    """The prompt for `path` in the documented order; None when there is none."""
    for key in (str(path), path.name, path.stem, str(path.resolve())):
        if key in table:
            return table[key]
    if indexed and path.resolve() in indexed:
        return indexed[path.resolve()]
    sidecar = path.with_suffix(".txt")
    if sidecar.is_file() and sidecar != path:
        return sidecar.read_text(encoding="utf-8").strip()
    return default


def parse_frames(spec: str) -> tuple[str, int | None]:
    """ "all" | "fml" | "random:K" | "segments:K" -> (selection, K or None)."""
    mode, _, k = spec.partition(":")
    if mode in ("all", "fml") and not k:
        return mode, None
    if mode in ("random", "segments") and k.isdigit() and int(k) > 0:
        return mode, int(k)
    raise UserError(f"--frames {spec!r}: expected all, fml, random:K or segments:K (K a positive integer)")
