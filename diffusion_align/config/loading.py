"""Strict YAML -> dataclass configs. Every problem is a one-line `ConfigError` naming the dotted key.

* Unknown keys are errors that suggest the closest valid names.
* Values are coerced to the annotated type: int, float, bool, str, Path, ``X | None``, ``list[X]``,
  ``tuple[X, ...]``, ``dict[str, X]``, plain ``list``/``dict``, ``Literal[...]``, ``Any`` and nested
  dataclasses. PyYAML (YAML 1.1) reads ``3e-4`` as a string, so numeric fields parse strings; bools
  accept true/false/yes/no/on/off/1/0. A field without a default is required.
* Tagged variants: when an annotated dataclass defines (in its own body) a
  ``VARIANTS: ClassVar[dict[str, type]]`` of name -> dataclass (or a lazy ``"module:attr"`` string),
  the mapping's ``name`` key picks the concrete class: ``strategy: {name: ddpo, clip_range: 1e-4}``,
  or just ``strategy: ddpo``. ``name: my_pkg.module:MyConfig`` plugs in a dataclass that is not
  registered. ``name`` reaches the concrete class only if it declares a ``name`` field; `to_dict`
  writes it back.
* ``base: other.yaml`` at the top of a file (relative to that file; chains allowed) loads that file
  first and deep-merges this one over it: mappings merge key by key, anything else (lists too)
  replaces, and a mapping whose ``name`` differs from the inherited one replaces it whole.
* Command-line overrides ``train.lr=3e-4`` / ``rewards.0.weight=2`` are parsed as YAML values. To
  switch a variant on the command line, replace the whole node: ``'strategy={name: draft}'``.
* A dataclass ``__post_init__`` may raise ValueError for cross-field checks; it becomes a ConfigError.
* Relative paths in a YAML file are relative to that file's folder (`yaml_files`): a string value (not an
  output path) that names an existing file or folder next to the file becomes that absolute path.
  Anything else is kept as written: a built-in name, a hub id, or a path relative to the current directory.
  Command-line overrides and dict sources are relative to the current directory.
* Numbers: a float must be finite; a field with a `Range` (``add_ranges(Class, field=Range(...))``, keyed by
  the class's import path so it also covers classes defined elsewhere, e.g. strategy configs) must be in
  it. The error names the key, the value and the allowed range.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import importlib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from diffusion_align.config.ranges import brief, check_range, ranges_of
from diffusion_align.config.yaml_files import apply_overrides, read_yaml, resolve_base
from diffusion_align.errors import ConfigError

_BOOLS = {
    **dict.fromkeys(("true", "yes", "on", "1"), True),
    **dict.fromkeys(("false", "no", "off", "0"), False),
}


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _did_you_mean(word: Any, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=3)
    return f"did you mean {' or '.join(map(repr, close))}?" if close else ""


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if tp is type(None) or tp is Any:
        return "None" if tp is type(None) else "Any"
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join('...' if a is ... else _type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except NameError as e:  # a programming error, not the user's
        raise TypeError(f"cannot resolve annotations of {cls.__qualname__}; define it at module level") from e


def _import(ref: str, where: str) -> Any:
    module, _, attr = ref.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split(".") if attr else ():
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{where}: cannot import {ref!r} ({e}); expected 'package.module:ClassName'") from e
    return obj


def _number(value: Any) -> int | float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    for parse in (int, float) if isinstance(value, str) else ():
        try:
            return parse(value)
        except ValueError:
            pass
    return None


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:  # Optional[X]: let X report its own (possibly nested) error
            return _coerce(value, arms[0], path)
        exact = [a for a in arms if a in (bool, int, float, str) and type(value) is a]
        for arm in exact + arms:
            try:
                return _coerce(value, arm, path)
            except ConfigError:
                pass
    elif origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        hint = _did_you_mean(value, args) if isinstance(value, str) else ""
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {brief(value)}" + (hint and f"; {hint}"))
    elif dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    elif tp is bool:
        if isinstance(value, bool) or (type(value) is int and value in (0, 1)):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _BOOLS:
            return _BOOLS[value.strip().lower()]
    elif tp is int:
        number = _number(value)
        if isinstance(number, int) or (isinstance(number, float) and number.is_integer()):
            return int(number)
    elif tp is float:
        if (number := _number(value)) is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{path}={number} must be a finite number")
            return float(number)
    elif tp is str:
        if isinstance(value, str) or type(value) is int:  # `run_name=2024` on the command line
            return str(value)
    elif tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
    elif (origin or tp) in (list, tuple):
        if isinstance(value, (list, tuple)):
            fixed = (origin or tp) is tuple and args and args[-1] is not ...
            if fixed and len(value) != len(args):
                raise ConfigError(f"{path}: expected {_type_name(tp)}, got {brief(value)}")
            items = [
                _coerce(v, args[i] if fixed else (args[0] if args else Any), _join(path, i))
                for i, v in enumerate(value)
            ]
            return tuple(items) if (origin or tp) is tuple else items
    elif (origin or tp) is dict:
        if isinstance(value, dict):
            key_tp, value_tp = args or (Any, Any)
            return {
                _coerce(k, key_tp, _join(path, k)): _coerce(v, value_tp, _join(path, k))
                for k, v in value.items()
            }
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value
    else:
        raise TypeError(f"{path}: unsupported config annotation {tp!r}")
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {brief(value)}")


def _pick_variant(base: type, variants: dict, data: dict, path: str) -> tuple[type, dict]:
    where = _join(path, "name")
    names = ", ".join(variants)
    if "name" not in data:
        raise ConfigError(f"missing required config key '{where}' (one of: {names})")
    name = data["name"]
    if name in variants:
        ref = variants[name]
        cls = _import(ref, where) if isinstance(ref, str) else ref
    elif isinstance(name, str) and ":" in name:
        cls = _import(name, where)
    else:
        hint = _did_you_mean(name, variants)
        raise ConfigError(
            f"{where}: unknown {base.__name__} {brief(name)}{hint and f' ({hint})'}; registered: {names}; "
            "or give 'package.module:ClassName' for your own"
        )
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ConfigError(f"{where}: {name!r} is not a dataclass")
    rest = dict(data)
    if "name" not in {f.name for f in dataclasses.fields(cls)}:
        del rest["name"]
    return cls, rest


def _build(cls: type, data: Any, path: str, pick: bool = True) -> Any:
    if isinstance(data, cls):
        return data
    variants = vars(cls).get("VARIANTS") if pick else None
    if variants is not None and isinstance(data, (str, dict)):
        concrete, data = _pick_variant(cls, variants, {"name": data} if isinstance(data, str) else data, path)
        return _build(concrete, data, path, pick=False)
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping for {cls.__name__}, got {brief(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints, kwargs = _hints(cls), {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=3)
            hint = (
                f"did you mean {' or '.join(repr(_join(path, c)) for c in close)}?"
                if close
                else f"valid keys: {', '.join(fields)}"
            )
            raise ConfigError(f"unknown config key '{_join(path, key)}'; {hint}")
        kwargs[key] = _coerce(value, hints[key], _join(path, key))
    for key, allowed in ranges_of(cls).items():
        if key in kwargs:
            check_range(_join(path, key), kwargs[key], allowed)
    for name, f in fields.items():
        if name not in kwargs and f.default is f.default_factory is dataclasses.MISSING:  # no default
            raise ConfigError(f"missing required config key '{_join(path, name)}'")
    try:
        return cls(**kwargs)
    except ValueError as e:  # cross-field checks in __post_init__
        raise ConfigError(f"{path or cls.__name__}: {e}") from e


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass `cls` (nested dataclasses and variants included) from plain `data`, strictly."""
    return _build(cls, data, path)


def load_config(source: str | Path | dict, overrides: list[str] = (), *, cls: type) -> Any:
    """Read a YAML file (or a dict; its `base` is relative to the cwd), apply command-line overrides and
    build `cls` (`diffusion_align.config.load_config` defaults it to the toolkit's settings)."""
    if isinstance(source, dict):
        data = resolve_base(copy.deepcopy(source), Path("."), ())
    else:
        data = read_yaml(Path(source))
    return from_dict(cls, apply_overrides(data, list(overrides)))


def _classes_in(tp: Any):
    if isinstance(tp, type):
        yield tp
    for arg in get_args(tp):
        yield from _classes_in(arg)


def _variant_name(obj: Any, tp: Any) -> str | None:
    """`obj`'s registered name in a VARIANTS of its annotation `tp` (None when `tp` has no variants)."""
    registries = [v for c in _classes_in(tp) if (v := vars(c).get("VARIANTS"))]
    for variants in registries:
        for name, ref in variants.items():
            if (_import(ref, name) if isinstance(ref, str) else ref) is type(obj):
                return name
    return f"{type(obj).__module__}:{type(obj).__qualname__}" if registries else None


def _dump(value: Any, tp: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = _variant_name(value, tp)
        out = {"name": name} if name is not None else {}
        hints = _hints(type(value))
        for f in dataclasses.fields(value):
            if f.init:
                out[f.name] = _dump(getattr(value, f.name), hints[f.name])
        return out
    if isinstance(value, (list, tuple)):  # element annotations stay inside `tp`; _variant_name searches it
        return [_dump(v, tp) for v in value]
    if isinstance(value, dict):
        return {k: _dump(v, tp) for k, v in value.items()}
    return str(value) if isinstance(value, Path) else value


def to_dict(obj: Any) -> dict:
    """Plain YAML-able dict of dataclass `obj` (tuples -> lists, Paths -> str, variants get `name`)."""
    return _dump(obj, type(obj))


def config_yaml(obj: Any) -> str:
    """`obj` as YAML text that `load_config(..., cls=type(obj))` reads back to an equal object."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False, allow_unicode=True)


def save_config(obj: Any, path: str | Path) -> Path:
    """Write `config_yaml(obj)` to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_yaml(obj))
    return path
