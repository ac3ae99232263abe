"""Deterministic generator of captioned 32x32 shapes images with fixed train / validation / held-out splits.

Image `i` of a split is drawn from `numpy.random.default_rng([split_seed, i])`, so any image can be
regenerated alone and the data never depends on batch order or on how many images were asked for.
Held-out scenes contain a (colour, shape) or (shape, background) pair that never occurs in training.
The vocabulary comes from `rewards.shapes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from rewards.shapes import BACKGROUNDS, SHAPE_COLORS, SIZE_RADIUS, Scene, all_scenes

IMAGE_SIZE = 32
# Pairs never seen in training (they only appear in the held-out split).
HELDOUT_COLOR_SHAPE = (("red", "triangle"), ("blue", "circle"))
HELDOUT_SHAPE_BACKGROUND = (("square", "gray"),)
SPLIT_SEEDS = {"train": 0, "val": 1, "heldout": 2}
COLOR_JITTER = 12  # +- per channel, in 0..255 units: enough variety that models do not memorise exact RGB


def is_heldout(scene: Scene) -> bool:
    return (scene.color, scene.shape) in HELDOUT_COLOR_SHAPE or (
        scene.shape,
        scene.background,
    ) in HELDOUT_SHAPE_BACKGROUND


def split_scenes(split: str) -> list[Scene]:
    """The attribute combinations a split draws from (train and val share them)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLIT_SEEDS)}")
    return [s for s in all_scenes() if is_heldout(s) == (split == "heldout")]


def _region(position: str, r: float) -> tuple[float, float, float, float]:
    # (x0, x1, y0, y1) range of shape centres, in pixels; "left" keeps every centre in the left half.
    # The other axis stays within a central band so that "left" is not also "top".
    lo, hi, mid = r + 0.5, IMAGE_SIZE - r - 0.5, IMAGE_SIZE / 2
    b0, b1 = max(lo, mid - 8), min(hi, mid + 8)
    return {
        "left": (lo, mid - 1, b0, b1),
        "right": (mid + 1, hi, b0, b1),
        "top": (b0, b1, lo, mid - 1),
        "bottom": (b0, b1, mid + 1, hi),
        "anywhere": (lo, hi, lo, hi),
    }[position]


def _layout(scene: Scene, rng: np.random.Generator) -> list[tuple[float, float]]:
    r = SIZE_RADIUS[scene.size]
    x0, x1, y0, y1 = _region(scene.position, r)
    for _ in range(1000):
        centres: list[tuple[float, float]] = []
        for _ in range(200):
            c = (rng.uniform(x0, x1), rng.uniform(y0, y1))
            # A gap of >= 2 px keeps shapes separate connected components.
            if all(math.dist(c, o) >= 2 * r + 2.5 for o in centres):
                centres.append(c)
                if len(centres) == scene.count:
                    return centres
    raise RuntimeError(f"could not place {scene}")


def _mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5  # pixel centres
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        half = 0.85 * r  # about the area of the circle of the same size
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # Upward isosceles triangle: apex at (0, -r), base from (-r, 0.75 r) to (r, 0.75 r).
    t = (dy + r) / (1.75 * r)  # 0 at the apex, 1 at the base
    return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """One (32, 32, 3) uint8 image of `scene`, with colours jittered by `rng`."""

    def jitter(rgb):
        return np.clip(np.array(rgb) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3), 0, 255)

    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    img[:] = jitter(BACKGROUNDS[scene.background])
    fill = jitter(SHAPE_COLORS[scene.color])
    for cx, cy in _layout(scene, rng):
        img[_mask(scene.shape, cx, cy, SIZE_RADIUS[scene.size])] = fill
    return img


def sample(split: str, index: int) -> tuple[np.ndarray, Scene]:
    """Image `index` of `split`: (uint8 (32, 32, 3), Scene). Deterministic."""
    rng = np.random.default_rng([SPLIT_SEEDS[split], index])
    scenes = split_scenes(split)
    scene = scenes[int(rng.integers(len(scenes)))]
    return render(scene, rng), scene


@dataclass
class ShapesBatch:
    images: torch.Tensor  # (N, 3, 32, 32) float32 in [0, 1]
    scenes: list[Scene]

    @property
    def captions(self) -> list[str]:
        return [s.caption() for s in self.scenes]


def make_split(split: str, n: int, start: int = 0) -> ShapesBatch:
    """Images `start .. start+n-1` of `split` as a tensor batch."""
    imgs, scenes = zip(*(sample(split, i) for i in range(start, start + n)), strict=True)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0
    return ShapesBatch(x, list(scenes))


def heldout_prompts(n: int = 48, seed: int = 3) -> list[str]:
    """A fixed list of `n` held-out captions (unseen combinations), spread over all held-out pairs."""
    scenes = split_scenes("heldout")
    order = np.random.default_rng(seed).permutation(len(scenes))[:n]
    return [scenes[i].caption() for i in sorted(order)]
