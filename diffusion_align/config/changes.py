"""What changed between the config a checkpoint was trained with and the config that resumes it.

A resume may change how a run is watched and how long it goes on: epochs, logging, evaluation, guards,
checkpoint cadence, memory knobs and the run folder (`RESUMABLE` below). Everything else (model,
sampling, LoRA, rewards and their normalisation, strategy, training prompts, optimizer, seeds) decides what
is trained, and a change there would continue one run with the math of another: `check_resume` refuses it
with a one-line diff of the keys.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from diffusion_align.config.loading import to_dict
from diffusion_align.errors import UserError

# Dotted keys (a key and everything under it) that a resumed run may change.
RESUMABLE = (
    "train.epochs",
    "train.micro_batch_size",  # memory: accumulation gives the same update
    "sample.batch_size",  # memory: images per rollout call; every sample has its own noise
    "sample.eval_num_steps",
    "sample.eval_eta",
    "model.device",
    "model.gradient_checkpointing",
    "model.vae_slicing",
    "model.vae_tiling",
    "model.attention",
    "model.shard",  # memory: every process computes with the full weights either way
    "prompts.eval",
    "prompts.eval_count",
    "prompts.eval_images_per_prompt",
    "eval_rewards",
    "checkpoint",
    "logging",
    "guard",
    "output_dir",
)

_ABSENT = "<absent>"


def plain(config) -> dict:
    """The config as the plain YAML data a run folder stores (what `changes` compares)."""
    return yaml.safe_load(yaml.safe_dump(to_dict(config), sort_keys=False))


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"lora.rank": 4, "rewards.0.name": ...}: mappings and lists down to their leaves."""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else None
    if items is None or not data:
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old value, new value)} for every leaf that differs (`<absent>` where one has none)."""
    a, b = flatten(old), flatten(new)
    keys = sorted(set(a) | set(b))
    return {k: (a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in keys if a.get(k, _ABSENT) != b.get(k, _ABSENT)}


def resumable(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUMABLE)


def describe(diff: dict[str, tuple[Any, Any]], limit: int = 8) -> str:
    """`lora.rank: 4 -> 8; train.seed: 0 -> 1` (values as JSON; the first `limit` keys)."""
    parts = [f"{k}: {_show(a)} -> {_show(b)}" for k, (a, b) in list(diff.items())[:limit]]
    more = len(diff) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def check_resume(saved: dict, config, source: str) -> dict[str, tuple[Any, Any]]:
    """The accepted changes from `saved` (the plain config of `source`) to `config`; a change that alters
    the math is a UserError naming every such key."""
    diff = changes(saved, plain(config))
    refused = {k: v for k, v in diff.items() if not resumable(k)}
    if refused:
        raise UserError(
            f"cannot resume {source}: the config changes what is trained ({describe(refused)}); undo these "
            "changes, or train a new run in another output_dir (or start over with --overwrite)"
        )
    return diff


def _show(value: Any) -> str:
    return value if value is _ABSENT else json.dumps(value, default=str)
