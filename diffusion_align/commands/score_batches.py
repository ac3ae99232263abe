"""Scoring decoded files for `diffusion-align score`: a failed batch is retried file by file so one bad file
does not sink its neighbours, and files are decoded no larger than the rewards look at."""

from __future__ import annotations

import math

# A reward exposing `image_size` (on itself or its `towers`) resizes its input to that side first (CLIP-type
# preprocessing); files far larger than that can be decoded reduced without changing what it sees in practice.
DECODE_MARGIN = 4  # decode keeping the shorter side >= 4x the reward's input side
MAX_CHUNK_VALUES = 64 * 2**20  # pixel values (float32: 256 MB) loaded at once, past the first file


def input_side(reward) -> int | None:
    for owner in (reward, getattr(reward, "towers", None)):
        size = getattr(owner, "image_size", None)
        if isinstance(size, int) and size > 0:
            return size
    return None


def decode_side(rewards: list) -> int | None:
    """The shorter side files may be reduced to for all `rewards`; None when one needs the stored pixels."""
    sides = [input_side(r) for r in rewards]
    return DECODE_MARGIN * max(sides) if sides and all(sides) else None


def _score_all(reward, pixels, prompts: list[str]) -> list[dict]:
    import torch

    with torch.no_grad():
        total, parts = reward.score(pixels, prompts)
    # 8 significant digits: what a float32 score holds, without float32->float64 noise in the output
    rounded = {n: [float(f"{v:.8g}") for v in p.cpu().tolist()] for n, p in {**parts, "total": total}.items()}
    return [{n: values[b] for n, values in rounded.items()} for b in range(len(prompts))]


def score_batch(reward, pixels, prompts: list[str]) -> list[dict | str]:
    """Per file: {reward: score, ..., "total": weighted sum}, or a one-line reason it could not be scored.
    `reward` is a `rewards.Combined`; its components are the columns.

    When a batch fails, its files are retried one by one so one bad file does not sink its neighbours.
    """
    try:
        rows = _score_all(reward, pixels, prompts)
    except Exception:
        if len(prompts) == 1:
            return [_reason(reward, pixels, prompts)]
        return [score_batch(reward, pixels[i : i + 1], prompts[i : i + 1])[0] for i in range(len(prompts))]
    return [row if all(math.isfinite(v) for v in row.values()) else _nonfinite(row) for row in rows]


def _reason(reward, pixels, prompts: list[str]) -> str:
    from rewards import Combined

    for name, component in reward.rewards.items():
        try:
            _score_all(Combined({name: component}), pixels, prompts)
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0]
            return f"reward {name} failed ({type(e).__name__}: {first})"
    return "scoring failed"


def _nonfinite(row: dict) -> str:
    bad = [n for n, v in row.items() if n != "total" and not math.isfinite(v)]
    return f"non-finite score from {', '.join(bad) or 'total'}"
