"""Allowed values of numeric settings: a `Range` per field, declared by the module that owns the settings
(`add_ranges(Class, field=Range(...))`, keyed by the class's import path so it also covers classes defined
elsewhere, e.g. strategy configs) and checked when a config is read. The error names the key, the value
and the allowed range."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from diffusion_align.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric setting: `low`/`high` bounds (None = unbounded), open or closed."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: low itself is not allowed
    high_open: bool = False
    integer: bool = False  # only for the message ("an integer >= 1")

    def allows(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def describe(self) -> str:
        """'at least 1', 'greater than 0', 'in [0, 1)', ... (what follows 'KEY=VALUE must be')."""
        low = None if self.low is None else f"{self.low:g}"
        high = None if self.high is None else f"{self.high:g}"
        kind = "an integer " if self.integer and (low is None or high is not None) else ""
        if low is not None and high is not None:
            return f"{kind}in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if low is not None:
            return f"{'greater than' if self.low_open else 'at least'} {low}"
        if high is not None:
            return f"{'less than' if self.high_open else 'at most'} {high}"
        return "a finite number"


def at_least(low: float, integer: bool = True) -> Range:
    return Range(low, integer=integer)


POSITIVE = Range(0, low_open=True)  # finite and > 0 (learning rates, scales)
FRACTION = Range(0, 1, low_open=True)  # (0, 1]: shares of steps
PROBABILITY = Range(0, 1, high_open=True)  # [0, 1): dropout, Adam betas

# "module:QualName" -> {field: Range}; filled by the modules that own the settings (config.settings)
_RANGES: dict[str, dict[str, Range]] = {}


def add_ranges(owner: type | str, **ranges: Range) -> None:
    """Declare the allowed values of `owner`'s numeric fields; `owner` may be a "module:QualName" string, so
    a class can be covered without importing it (its module is imported only when a config uses it)."""
    key = owner if isinstance(owner, str) else f"{owner.__module__}:{owner.__qualname__}"
    _RANGES.setdefault(key, {}).update(ranges)


def ranges_of(cls: type) -> dict[str, Range]:
    return _RANGES.get(f"{cls.__module__}:{cls.__qualname__}", {})


def check_range(key: str, value: Any, allowed: Range) -> None:
    """Raise a one-line ConfigError unless `value` (a number, or a list/tuple of numbers) is allowed."""
    for v in value if isinstance(value, (list, tuple)) else (value,):
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if not math.isfinite(v) or not allowed.allows(v):
            raise ConfigError(f"{key}={brief(value)} must be {allowed.describe()}")


def brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
