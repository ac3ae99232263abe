"""The synthetic "shapes" world: vocabulary, captions, a programmatic detector and verifiable rewards.

A scene is 1-3 shapes of one kind and one colour, one size, a coarse position and a background colour:
"two small red circles on the left on a black background". The palette is small and well separated so
that a detector built from colour snapping + connected components is reliable; the bundled shapes
model (diffusion_align/assets/shapes) is trained on images of this world, and these rewards check it.

This module is the single source of truth for the vocabulary: the data generator in diffusion_align
imports it from here (rewards never imports diffusion_align). Over 300 lines on purpose: the grammar, the
detector and the four rewards are one definition of "correct" and are read together.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch

from rewards.base import Reward, check_inputs
from rewards.errors import RewardError

# Shape colours and background colours are disjoint sets, so "which pixels are the shapes" is a colour test.
SHAPE_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
COUNTS = (1, 2, 3)
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
# position -> caption phrase; "anywhere" has no phrase.
POSITIONS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
POSITIONS_ALL = (*POSITIONS, "anywhere")
# Radii in pixels on the 32x32 canvas.
SIZE_RADIUS = {"small": 3.5, "large": 6.0}

PALETTE_NAMES = (*SHAPE_COLORS, *BACKGROUNDS)
PALETTE = torch.tensor([*SHAPE_COLORS.values(), *BACKGROUNDS.values()], dtype=torch.float32) / 255.0  # (7, 3)
N_SHAPE_COLORS = len(SHAPE_COLORS)


@dataclass(frozen=True)
class Scene:
    """The attributes a caption states."""

    count: int
    size: str
    color: str
    shape: str
    position: str
    background: str

    def caption(self) -> str:
        noun = self.shape + ("s" if self.count > 1 else "")
        where = f" {POSITIONS[self.position]}" if self.position in POSITIONS else ""
        what = f"{COUNT_WORDS[self.count]} {self.size} {self.color} {noun}"
        return f"{what}{where} on a {self.background} background"

    def as_dict(self) -> dict:
        return asdict(self)


def is_valid(scene: Scene) -> bool:
    # Three large shapes do not fit side by side in half of a 32x32 canvas.
    return not (scene.size == "large" and scene.count == 3 and scene.position != "anywhere")


def all_scenes() -> list[Scene]:
    """Every valid attribute combination, in a fixed order."""
    out = []
    for count in COUNTS:
        for size in SIZES:
            for color in SHAPE_COLORS:
                for shape in SHAPES:
                    for position in POSITIONS_ALL:
                        for background in BACKGROUNDS:
                            s = Scene(count, size, color, shape, position, background)
                            if is_valid(s):
                                out.append(s)
    return out


_WORD_COUNTS = {"one": 1, "a": 1, "an": 1, "two": 2, "three": 3, "1": 1, "2": 2, "3": 3}
_CAPTION_RE = re.compile(
    r"^\s*(?P<count>\w+)\s+(?P<size>small|large)\s+(?P<color>\w+)\s+(?P<shape>circle|square|triangle)s?"
    r"(?:\s+(?P<where>on the left|on the right|at the top|at the bottom))?"
    r"\s+on an?\s+(?P<background>\w+)\s+background\s*\.?\s*$",
    re.IGNORECASE,
)


def parse_caption(caption: str) -> Scene:
    """Read a shapes caption back into a `Scene`; raises RewardError for text outside the world."""
    m = _CAPTION_RE.match(caption)
    bad = m is None or m["count"].lower() not in _WORD_COUNTS
    bad = bad or m["color"].lower() not in SHAPE_COLORS or m["background"].lower() not in BACKGROUNDS
    if bad:
        raise RewardError(
            f"not a shapes caption: {caption!r}; expected e.g. "
            f"'two small red circles on the left on a black background' (see rewards.shapes)"
        )
    where = (m["where"] or "").lower()
    position = next((p for p, phrase in POSITIONS.items() if phrase == where), "anywhere")
    return Scene(
        _WORD_COUNTS[m["count"].lower()],
        m["size"].lower(),
        m["color"].lower(),
        m["shape"].lower(),
        position,
        m["background"].lower(),
    )


# ---------------------------------------------------------------------------------------------------
# Detector: snap pixels to the palette, background = commonest border colour, shapes = connected
# components of the commonest shape colour, shape kind by how much of its bounding box a component fills.

MIN_AREA = 6  # pixels; smaller blobs are sampling noise (a small triangle covers ~20)
MAX_SNAP_DIST = 0.35  # RGB distance in [0,1] units beyond which a pixel matches no palette colour


@dataclass
class Detection:
    color: str | None
    shape: str | None
    count: int
    size: str | None
    position: str | None
    background: str


def _components(mask: torch.Tensor) -> torch.Tensor:
    """4-connected component labels of a (B, H, W) bool mask: 0 off the mask, else an id per component."""
    b, h, w = mask.shape
    ids = torch.arange(1, h * w + 1, dtype=torch.long).view(1, h, w).expand(b, h, w)
    lab = torch.where(mask, ids, torch.zeros_like(ids))
    for _ in range(h * w):
        p = torch.nn.functional.pad(lab, (1, 1, 1, 1))
        nb = torch.stack([lab, p[:, :-2, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :-2], p[:, 1:-1, 2:]]).amax(0)
        new = torch.where(mask, nb, torch.zeros_like(nb))
        if torch.equal(new, lab):
            break
        lab = new
    return lab


def _shape_of(fill: float, centroid_depth: float) -> str:
    # Hard-edged references: square fills 1.0 of its box, circle pi/4 = 0.785, triangle 0.5; an upward
    # triangle's centroid also sits 2/3 of the way down its box (circle and square: 1/2).
    if centroid_depth > 0.58 or fill < 0.6:
        return "triangle"
    return "square" if fill > 0.88 else "circle"


@torch.no_grad()
def detect(images: torch.Tensor) -> list[Detection]:
    """Programmatic reading of shapes images.

    images: (B, 3, H, W) float in [0, 1]. Returns one `Detection` per image.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise RewardError(f"detect expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
    x = images.detach().float().clamp(0, 1)
    b, _, h, w = x.shape
    dist = torch.cdist(x.permute(0, 2, 3, 1).reshape(b, -1, 3), PALETTE.to(x.device)).view(b, h, w, -1)
    d_min, label = dist.min(-1)  # (B, H, W)
    border = torch.cat([label[:, 0], label[:, -1], label[:, :, 0], label[:, :, -1]], dim=1)  # (B, 2H+2W)
    out = []
    for i in range(b):
        bg = int(torch.bincount(border[i], minlength=len(PALETTE_NAMES)).argmax())
        fg = (label[i] < N_SHAPE_COLORS) & (label[i] != bg) & (d_min[i] < MAX_SNAP_DIST)
        if not fg.any():
            out.append(Detection(None, None, 0, None, None, PALETTE_NAMES[bg]))
            continue
        color = int(torch.bincount(label[i][fg], minlength=N_SHAPE_COLORS).argmax())
        comp = _components((fg & (label[i] == color))[None])[0]
        ids, areas = comp[comp > 0].unique(return_counts=True)
        kept = [(int(k), int(a)) for k, a in zip(ids, areas, strict=True) if a >= MIN_AREA]
        if not kept:
            out.append(Detection(PALETTE_NAMES[color], None, 0, None, None, PALETTE_NAMES[bg]))
            continue
        votes, extents, cy, cx = [], [], [], []
        for k, area in kept:
            ys, xs = torch.nonzero(comp == k, as_tuple=True)
            bh, bw = int(ys.max() - ys.min()) + 1, int(xs.max() - xs.min()) + 1
            depth = float(ys.float().mean() - ys.min()) / max(bh - 1, 1)
            votes.append(_shape_of(area / (bh * bw), depth))
            extents.append(max(bh, bw))
            cy.append(ys.float().mean())
            cx.append(xs.float().mean())
        shape = max(SHAPES, key=votes.count)
        size = "large" if sorted(extents)[len(extents) // 2] >= 10 * h / 32 else "small"
        out.append(
            Detection(
                PALETTE_NAMES[color], shape, len(kept), size, _position(cx, cy, h, w), PALETTE_NAMES[bg]
            )
        )
    return out


def _position(cx: list, cy: list, h: int, w: int) -> str:
    # Centroid of the shape centres: a quarter-image margin around the middle means "anywhere".
    mx, my = float(sum(cx) / len(cx)) / w, float(sum(cy) / len(cy)) / h
    dx, dy = mx - 0.5, my - 0.5
    if max(abs(dx), abs(dy)) < 0.12:
        return "anywhere"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def adherence(detections: list[Detection], scenes: list[Scene]) -> dict[str, float]:
    """Fraction of images whose detected colour / shape / count / size / background / position match."""
    keys = ("color", "shape", "count", "size", "background", "position")
    n = max(len(scenes), 1)
    res = {
        k: sum(getattr(d, k) == getattr(s, k) for d, s in zip(detections, scenes, strict=True)) / n
        for k in keys
    }
    res["all_color_shape_count"] = (
        sum(
            d.color == s.color and d.shape == s.shape and d.count == s.count
            for d, s in zip(detections, scenes, strict=True)
        )
        / n
    )
    return res


# ---------------------------------------------------------------------------------------------------
# Rewards


def _check(images: torch.Tensor, prompts: list[str], name: str) -> list[Scene]:
    check_inputs(images, prompts, name)
    return [parse_caption(p) for p in prompts]


class ShapesColorReward(Reward):
    """0.5 * [detected shape colour is the caption's] + 0.5 * [detected background is the caption's].

    Values in {0, 0.5, 1}. Not differentiable (argmax colour snapping).
    """

    name = "shapes_color"
    differentiable = False

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        scenes = _check(images, prompts, self.name)
        dets = detect(images)
        r = [
            0.5 * (d.color == s.color) + 0.5 * (d.background == s.background)
            for d, s in zip(dets, scenes, strict=True)
        ]
        return torch.tensor(r, dtype=torch.float32, device=images.device)


class ShapesCountReward(Reward):
    """1 - |detected count - caption count| / 3, clipped at 0: 1 when exact. Values in [0, 1].

    Counts connected components of the caption's colour (not the detected colour), so a right number of
    wrong-coloured shapes scores 0. Not differentiable.
    """

    name = "shapes_count"
    differentiable = False

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        scenes = _check(images, prompts, self.name)
        x = images.detach().float().clamp(0, 1)
        b, _, h, w = x.shape
        dist = torch.cdist(x.permute(0, 2, 3, 1).reshape(b, -1, 3), PALETTE.to(x.device)).view(b, h, w, -1)
        d_min, label = dist.min(-1)
        target = torch.tensor([PALETTE_NAMES.index(s.color) for s in scenes], device=x.device).view(b, 1, 1)
        comp = _components((label == target) & (d_min < MAX_SNAP_DIST))
        r = []
        for i, s in enumerate(scenes):
            _, areas = comp[i][comp[i] > 0].unique(return_counts=True)
            n = int((areas >= MIN_AREA).sum())
            r.append(max(0.0, 1.0 - abs(n - s.count) / 3.0))
        return torch.tensor(r, dtype=torch.float32, device=images.device)


class ShapesColorSoftReward(Reward):
    """Differentiable colour reward.

    w(pixel) = soft share of shape colours, softmax_k(-|x - c_k|^2 / tau) summed over the shape palette
    (detached: it says *where* the shapes are); k_c(pixel) = exp(-|x - c|^2 / (2 sigma^2)), a broad kernel
    whose gradient does not vanish even far from the target colour c.
    r = 0.5 * sum(w k_colour) / sum(w) + 0.5 * sum((1 - w) k_background) / sum(1 - w).
    images: (B, 3, H, W) in [0, 1]; returns (B,) in [0, 1], with gradients w.r.t. images.
    """

    name = "shapes_color_soft"
    differentiable = True

    def __init__(self, tau: float = 0.02, sigma: float = 0.3):
        super().__init__()
        self.tau, self.sigma = tau, sigma

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        scenes = _check(images, prompts, self.name)
        x = images.float()
        pal = PALETTE.to(x.device)
        d2 = ((x.unsqueeze(1) - pal.view(1, -1, 3, 1, 1)) ** 2).sum(2)  # (B, K, H, W)
        w = torch.softmax(-d2.detach() / self.tau, dim=1)[:, :N_SHAPE_COLORS].sum(1)  # (B, H, W)
        idx_c = torch.tensor([PALETTE_NAMES.index(s.color) for s in scenes], device=x.device)
        idx_b = torch.tensor([PALETTE_NAMES.index(s.background) for s in scenes], device=x.device)
        rows = torch.arange(len(scenes), device=x.device)
        k = torch.exp(-d2 / (2 * self.sigma**2))
        k_c, k_b = k[rows, idx_c], k[rows, idx_b]  # (B, H, W)
        color = (w * k_c).sum((1, 2)) / (w.sum((1, 2)) + 1e-6)
        background = ((1 - w) * k_b).sum((1, 2)) / ((1 - w).sum((1, 2)) + 1e-6)
        return (0.5 * color + 0.5 * background).float()


class ShapesMatchReward(Reward):
    """Mean of the detector's agreement with the caption on colour, shape, count and background.

    Values in {0, 0.25, 0.5, 0.75, 1}. Not differentiable.
    """

    name = "shapes_match"
    differentiable = False

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        scenes = _check(images, prompts, self.name)
        r = [
            (
                (d.color == s.color)
                + (d.shape == s.shape)
                + (d.count == s.count)
                + (d.background == s.background)
            )
            / 4
            for d, s in zip(detect(images), scenes, strict=True)
        ]
        return torch.tensor(r, dtype=torch.float32, device=images.device)
