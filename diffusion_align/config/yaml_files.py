"""YAML files into plain data: `base:` inheritance (deep merge), paths relative to the file that names them,
and command-line overrides `key.sub=value`. What the data means is `loading`'s job."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from diffusion_align.config.ranges import brief
from diffusion_align.errors import ConfigError


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of `data` with each `key.sub=value` applied (value parsed as YAML; list indices
    like `rewards.0.weight=2` address list items, and index == length appends)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"bad override {item!r}: expected key.sub=value, e.g. train.lr=3e-4")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or e
            raise ConfigError(f"override {item!r}: value is not valid YAML ({problem}); quote it") from e
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) > len(node):
                    where = ".".join(parts[:i])
                    raise ConfigError(f"override {item!r}: '{where}' is a list; use an index 0..{len(node)}")
                part = int(part)
                if part == len(node):
                    node.append(None)
            if last:
                node[part] = value
            else:
                child = node[part] if isinstance(node, list) else node.get(part)
                if not isinstance(child, (dict, list)):
                    node[part] = child = {}
                node = child
    return data


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        inherited = out.get(key)
        mergeable = isinstance(inherited, dict) and isinstance(value, dict)
        if mergeable and value.get("name", inherited.get("name")) == inherited.get("name"):
            value = _merge(inherited, value)  # a changed `name` means another variant: replace it whole
        out[key] = value
    return out


# Where a run writes or resumes: relative to the current directory, never to the config file.
_OUTPUT_KEYS = frozenset({"output_dir", "checkpoint.resume"})


def _anchor_paths(value: Any, folder: Path, path: str = "") -> Any:
    """`value` (a YAML file's data) with relative strings that name something in `folder` made absolute."""
    if isinstance(value, dict):
        return {k: _anchor_paths(v, folder, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_anchor_paths(v, folder, path) for v in value]
    if not isinstance(value, str) or not value.strip() or path in _OUTPUT_KEYS or path == "base":
        return value
    if ":" in value or "\n" in value or Path(value).expanduser().is_absolute():  # module:attr, URLs
        return value
    try:
        candidate = folder / value
        return str(candidate.resolve()) if candidate.exists() else value
    except (OSError, ValueError):  # not a usable path at all (too long, NUL)
        return value


def resolve_base(data: dict, folder: Path, chain: tuple[Path, ...]) -> dict:
    if "base" not in data:
        return data
    data = dict(data)
    ref = data.pop("base")
    if not isinstance(ref, str):
        raise ConfigError(f"base: expected a path to a YAML file, got {brief(ref)}")
    return _merge(read_yaml(folder / Path(ref).expanduser(), chain), data)


def read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    if path.resolve() in chain:
        raise ConfigError(f"{path}: 'base' includes loop back to this file")
    via = f" (base of {chain[-1]})" if chain else ""
    try:
        text = path.read_text()
    except FileNotFoundError:
        cwd = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise ConfigError(f"config file not found: {path}{via}{cwd}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config {path}{via}: {e.strerror}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return resolve_base(_anchor_paths(data, path.parent), path.parent, (*chain, path.resolve()))
