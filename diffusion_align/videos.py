"""Videos out of tensors: MP4 (H.264 through imageio-ffmpeg's bundled ffmpeg) and looping GIF files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

FORMATS = ("mp4", "gif")


def to_frames(video: torch.Tensor, scale: int = 1) -> np.ndarray:
    """(T, 3, H, W) in [0, 1] -> (T, H*scale, W*scale, 3) uint8, upscaled by pixel repetition (nearest)."""
    if video.ndim != 4 or video.shape[1] != 3:
        raise ValueError(f"expected a (T, 3, H, W) video in [0, 1], got shape {tuple(video.shape)}")
    frames = (video.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    if scale > 1:
        frames = frames.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    return np.ascontiguousarray(frames.permute(0, 2, 3, 1).cpu().numpy())


def write_mp4(video: torch.Tensor, path: str | Path, fps: float = 8, scale: int = 1) -> Path:
    """Write (T, 3, H, W) in [0, 1] as H.264 / yuv420p MP4 (plays in browsers). Odd sides are edge-padded
    by one pixel, which yuv420p needs; nothing is resized."""
    import imageio.v2 as imageio

    frames = to_frames(video, scale)
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # macro_block_size=1: keep the exact size instead of imageio's resize to a multiple of 16
    with imageio.get_writer(
        path, format="FFMPEG", fps=fps, codec="libx264", pixelformat="yuv420p", macro_block_size=1, quality=8
    ) as writer:
        for frame in frames:
            writer.append_data(frame)
    return path


def write_gif(video: torch.Tensor, path: str | Path, fps: float = 8, scale: int = 1) -> Path:
    """Write (T, 3, H, W) in [0, 1] as a GIF that loops forever."""
    import imageio.v3 as iio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, to_frames(video, scale), extension=".gif", duration=1000 / fps, loop=0)
    return path


def save_videos(
    videos: torch.Tensor,
    directory: str | Path,
    names: list[str],
    fps: float = 8,
    scale: int = 1,
    formats: tuple[str, ...] = FORMATS,
) -> list[Path]:
    """Write (N, T, 3, H, W) in [0, 1] as `directory/<name>.<fmt>` for every format; returns the paths."""
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown video format(s) {sorted(unknown)}; use {', '.join(FORMATS)}")
    writers = {"mp4": write_mp4, "gif": write_gif}
    directory = Path(directory)
    paths = []
    for video, name in zip(videos, names, strict=True):
        paths += [writers[fmt](video, directory / f"{name}.{fmt}", fps, scale) for fmt in formats]
    return paths
