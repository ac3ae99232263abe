"""Load image and video files as float tensors for scoring.

Every loader returns pixels in [0, 1], float32, RGB, channels first:
an image is `(3, H, W)`, a video `(T, 3, H, W)`.

Conversions: grayscale (L, I;16) is repeated to 3 channels (16-bit is scaled by 1/65535); images with
alpha (RGBA, LA, P with transparency) are composited over white, which is how viewers show them; EXIF
orientation is applied. GIFs with one frame are images, with more frames videos. Videos (mp4, mov, webm,
mkv, avi) are decoded with imageio-ffmpeg; with `max_frames` set, longer videos keep `max_frames` frames
evenly spaced over the whole clip.

`load_many` never raises on a bad file: it returns the good ones and one `LoadFailure` per bad path, so a
scoring run can finish the rest.

Memory: `min_side` (for rewards that resize to a known side first) decodes a huge file at a fraction of its
size: by the largest integer factor that keeps the shorter side >= `min_side` (JPEG: DCT-scaled decoding via
`Image.draft`, then an area average; other formats: `Image.reduce`, an area average). Files whose shorter
side is below 2 * `min_side` are never reduced, so their pixels are exactly as stored. `iter_loaded` loads a
few files at a time within a budget of pixel values, so a folder is scored in bounded memory.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".webm", ".mkv", ".avi", ".gif"})
MEDIA_EXTENSIONS = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS
_FFMPEG_EXTENSIONS = VIDEO_EXTENSIONS - {".gif"}


class UnreadableMedia(Exception):
    """A file that is missing, empty, corrupt or in an unsupported format. The message is one line."""


@dataclass
class Media:
    """A loaded file: `pixels` is `(3, H, W)` for an image or `(T, 3, H, W)` for a video, in [0, 1]."""

    path: Path
    pixels: torch.Tensor

    @property
    def is_video(self) -> bool:
        return self.pixels.dim() == 4


@dataclass
class LoadFailure:
    path: Path
    reason: str


def find_media(inputs: Iterable[str | os.PathLike]) -> tuple[list[Path], list[LoadFailure]]:
    """Expand files and folders into a list of files, in the order given.

    Folders are searched recursively for files with a known image/video extension (sorted, hidden files
    and folders skipped). A file named explicitly is kept whatever its extension, so that a bad one is
    reported rather than silently dropped. Paths that do not exist come back as failures.
    """
    files: list[Path] = []
    failures: list[LoadFailure] = []
    seen: set[Path] = set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in MEDIA_EXTENSIONS
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        elif path.exists():
            found = [path]
        else:
            failures.append(LoadFailure(path, "no such file or directory"))
            continue
        for p in found:
            if p.resolve() not in seen:
                seen.add(p.resolve())
                files.append(p)
    return files, failures


def reduction_factor(width: int, height: int, min_side: int | None) -> int:
    """The integer factor a `width x height` image is shrunk by so its shorter side stays >= `min_side`."""
    return max(1, min(width, height) // min_side) if min_side else 1


def reduced_size(width: int, height: int, min_side: int | None) -> tuple[int, int]:
    """`(width, height)` divided (rounding up, as `Image.reduce`) by `reduction_factor`."""
    factor = reduction_factor(width, height, min_side)
    return -(-width // factor), -(-height // factor)


def _shrink(img, size: tuple[int, int] | None):
    """An RGB or F image area-averaged to `size` (unchanged when it has that size already or size is None)."""
    from PIL import Image

    return img if size is None or img.size == size else img.resize(size, Image.Resampling.BOX)


def _to_rgb_array(img, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A PIL image in any common mode -> `(3, H, W)` float32 in [0, 1], area-averaged to `size` (W, H)."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: PIL's convert("RGB") would clip at 255, so scale ourselves.
        gray = np.asarray(_shrink(img.convert("F"), size), dtype=np.float32)
        gray = np.clip(gray / 65535.0, 0.0, 1.0)
        return _hwc_to_chw(np.repeat(gray[:, :, None], 3, axis=2))
    if img.mode == "F":
        raise UnreadableMedia("floating-point images are not supported (their value range is unknown)")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return _uint8_to_chw(np.asarray(_shrink(img if img.mode == "RGB" else img.convert("RGB"), size)))


def _uint8_to_chw(array: np.ndarray) -> torch.Tensor:
    """`(H, W, 3)` uint8 -> `(3, H, W)` float32 / 255, with one float allocation (no float HWC copy)."""
    h, w, _ = array.shape
    out = torch.empty((3, h, w), dtype=torch.float32)
    with warnings.catch_warnings():  # PIL's arrays are read-only; this one is only read
        warnings.simplefilter("ignore", UserWarning)
        source = torch.from_numpy(np.ascontiguousarray(array))
    out.copy_(source.permute(2, 0, 1))
    return out.div_(255.0)


def _hwc_to_chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()


def _even_indices(n: int, max_frames: int | None) -> list[int]:
    if max_frames is None or n <= max_frames:
        return list(range(n))
    return np.linspace(0, n - 1, max_frames).round().astype(int).tolist()


def _load_pil(path: Path, max_frames: int | None, min_side: int | None = None) -> torch.Tensor:
    from PIL import Image, ImageOps, ImageSequence

    with Image.open(path) as img:
        n_frames = getattr(img, "n_frames", 1)
        if n_frames > 1 and path.suffix.lower() == ".gif":
            # The iterator re-seeks one image object: convert each kept frame before moving on.
            keep = set(_even_indices(n_frames, max_frames))
            size = reduced_size(*img.size, min_side)
            frames = [_to_rgb_array(f, size) for i, f in enumerate(ImageSequence.Iterator(img)) if i in keep]
            return torch.stack(frames)
        size = reduced_size(*img.size, min_side)
        if img.format == "JPEG" and size != img.size:
            img.draft(None, size)  # decode at 1/2, 1/4 or 1/8 scale (never below `size`): no full decode
        img.load()  # decode now: truncated files fail here, inside the caller's error handling
        if img.getexif().get(0x0112, 1) != 1:  # EXIF orientation; exif_transpose copies even when upright
            img = ImageOps.exif_transpose(img)
        if (img.width > img.height) != (size[0] > size[1]):  # EXIF rotated it by 90 degrees
            size = size[::-1]
        return _to_rgb_array(img, size)


def _load_ffmpeg(path: Path, max_frames: int | None, min_side: int | None = None) -> torch.Tensor:
    import imageio.v2 as imageio

    reader = imageio.get_reader(path, format="ffmpeg")
    try:
        n = reader.count_frames()
        if n == 0:
            raise UnreadableMedia("video has no frames")
        wanted = set(_even_indices(n, max_frames))
        frames = [_frame(frame, min_side) for i, frame in enumerate(reader) if i in wanted]
    finally:
        reader.close()
    if not frames:
        raise UnreadableMedia("video has no decodable frames")
    return torch.stack([_uint8_to_chw(f) for f in frames])


def _frame(frame: np.ndarray, min_side: int | None) -> np.ndarray:
    from PIL import Image

    size = reduced_size(frame.shape[1], frame.shape[0], min_side)
    return frame if size == frame.shape[1::-1] else np.asarray(_shrink(Image.fromarray(frame), size))


def load_media(
    path: str | os.PathLike, max_frames: int | None = None, min_side: int | None = None
) -> torch.Tensor:
    """Load one file: `(3, H, W)` for an image, `(T, 3, H, W)` for a video, float32 in [0, 1]; a file
    whose shorter side is at least 2 * `min_side` is reduced (see the module docstring).

    Raises `UnreadableMedia` with a one-line reason for a missing, empty, corrupt or unsupported file.
    """
    path = Path(path)
    if not path.is_file():
        raise UnreadableMedia("no such file")
    if path.stat().st_size == 0:
        raise UnreadableMedia("empty file")
    try:
        if path.suffix.lower() in _FFMPEG_EXTENSIONS:
            return _load_ffmpeg(path, max_frames, min_side)
        return _load_pil(path, max_frames, min_side)
    except UnreadableMedia:
        raise
    except Exception as e:  # PIL and ffmpeg raise many types for bad data; report them all the same way
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UnreadableMedia(f"cannot decode ({type(e).__name__}: {first_line})") from e


def load_many(
    paths: Sequence[str | os.PathLike], max_frames: int | None = None, min_side: int | None = None
) -> tuple[list[Media], list[LoadFailure]]:
    """Load each path; bad files become `LoadFailure`s instead of exceptions. Order is preserved."""
    loaded: list[Media] = []
    failures: list[LoadFailure] = []
    for p in paths:
        try:
            loaded.append(Media(Path(p), load_media(p, max_frames, min_side)))
        except UnreadableMedia as e:
            failures.append(LoadFailure(Path(p), str(e)))
    return loaded, failures


def iter_loaded(
    paths: Sequence[str | os.PathLike],
    max_files: int,
    max_values: int,
    max_frames: int | None = None,
    min_side: int | None = None,
) -> Iterator[tuple[list[Media], list[LoadFailure], int]]:
    """`load_many` in chunks of at most `max_files` files and, past the first file, `max_values` pixel
    values: yields (loaded, failures, number of paths consumed). Only one chunk is alive at a time if the
    caller drops it before asking for the next."""
    loaded: list[Media] = []
    failures: list[LoadFailure] = []
    values = consumed = 0
    for p in paths:
        more, bad = load_many([p], max_frames, min_side)
        loaded += more
        failures += bad
        consumed += 1
        values += sum(m.pixels.numel() for m in more)
        del more  # the chunk list holds it; a second reference would outlive the caller's `del`
        if consumed >= max_files or values >= max_values:
            yield loaded, failures, consumed
            loaded, failures, values, consumed = [], [], 0, 0
    if consumed:
        yield loaded, failures, consumed


def group_by_shape(items: Sequence[Media], batch_size: int) -> list[list[int]]:
    """Indices of `items` grouped into batches of identical pixel shape, at most `batch_size` each.

    Grouping (rather than resizing to a common size) keeps every file's pixels exactly as stored, which
    matters for size-sensitive rewards such as JPEG compressibility.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(tuple(item.pixels.shape), []).append(i)
    batches = []
    for indices in groups.values():
        batches += [indices[k : k + batch_size] for k in range(0, len(indices), batch_size)]
    return batches
