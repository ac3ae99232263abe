"""Images out of tensors: PNG files and captioned grids (what people look at instead of numbers)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> RGB PIL image."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def slug(text: str, max_len: int = 60) -> str:
    """A file-name-safe short form of a prompt."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:max_len] or "image"


def save_images(images: torch.Tensor, directory: str | Path, names: list[str]) -> list[Path]:
    """Write (N, 3, H, W) in [0, 1] as `directory/<name>.png`; returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for image, name in zip(images, names, strict=True):
        paths.append(directory / f"{name}.png")
        to_pil(image).save(paths[-1])
    return paths


def make_grid(
    images: torch.Tensor, captions: list[str] | None = None, cols: int | None = None, scale: int = 1
) -> Image.Image:
    """(N, 3, H, W) in [0, 1] -> one PIL grid; tiles upscaled `scale`x (nearest), captions below."""
    n, _, h, w = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    tile_w, tile_h = w * scale, h * scale
    caption_h = 12 * (max(len(_wrap(c, tile_w)) for c in captions) if captions else 0)
    grid = Image.new("RGB", (cols * tile_w, rows * (tile_h + caption_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x, y = (i % cols) * tile_w, (i // cols) * (tile_h + caption_h)
        grid.paste(to_pil(image).resize((tile_w, tile_h), Image.NEAREST), (x, y))
        for j, line in enumerate(_wrap(captions[i], tile_w) if captions else []):
            draw.text((x + 2, y + tile_h + 12 * j), line, fill="black")
    return grid


def save_grid(
    images: torch.Tensor, path: str | Path, captions: list[str] | None = None, cols: int | None = None
) -> Path:
    """Save a captioned grid of (N, 3, H, W) in [0, 1] (videos (N, T, 3, H, W): their first frames); small
    images are upscaled so captions stay legible."""
    images = images[:, 0] if images.ndim == 5 else images
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scale = max(1, 128 // images.shape[-1]) if captions else 1
    make_grid(images, captions, cols, scale).save(path)
    return path


def _wrap(text: str, width_px: int, char_px: int = 6) -> list[str]:
    """Greedy word wrap for PIL's default bitmap font (about 6 px per character)."""
    per_line, lines, line = max(1, width_px // char_px), [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > per_line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line] if line else lines or [""]
