"""Offline preference pairs (Diffusion-DPO): one reader for three sources, every bad row reported, none fatal.

- JSONL, one pair per line, image paths relative to the file:
      {"prompt": "a red circle", "image_w": "a.png", "image_l": "b.png"}
      {"prompt": "a red circle", "image_0": "a.png", "image_1": "b.png", "label_0": 1, "seed": 7}
  label_0 is Pick-a-Pic's: 1 = image_0 preferred, 0 = image_1 preferred, 0.5 = a tie (`preferred`: 0 | 1,
  the preferred image, is read too). `caption` is read as the prompt when `prompt` is absent. A `seed` lets
  D3PO regenerate the pair (`read_seeded_labels`: D3PO's human labels are this format, images optional).
- Local Parquet or Arrow files (a file or a folder of them) in the Pick-a-Pic v2 layout: columns caption,
  jpg_0, jpg_1 (encoded image bytes), label_0. Needs `pyarrow`; a file's image columns are read only when
  one of its pairs is first used.
- A Hugging Face dataset id (e.g. yuvalkirstain/pickapic_v2), through `datasets.load_dataset` when the
  library is installed and the hub reachable.
Ties are dropped, as the paper's code does ("eliminate no-decisions (0.5-0.5 labels)" in Salesforce's
train.py). Rows without a prompt, with a bad label or a missing image file are skipped when the source is
read; an image that does not decode is found when its pair is first used (`load_image` raises BadImage) and
that pair is skipped then. Each skipped row is named by line (JSONL, from 1) or row (tables, from 0).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusion_align.errors import UserError, warn

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
TABLE_SUFFIXES = (".parquet", ".arrow")
WARN_ROWS = 20  # skipped rows named one by one on stderr; all of them are kept in PairData.skipped


class BadImage(Exception):
    """An image that is missing or does not decode; the message says which and why."""


@dataclass
class Pair:
    prompt: str
    where: str  # "pairs.jsonl line 17" / "train.parquet row 16": how a report names it
    images: Callable[[], tuple]  # -> (winner, loser), each a Path or encoded bytes
    seed: int | None = None  # JSONL rows that name one: the pair can be regenerated from it (D3PO)
    order: tuple[int, int] = (0, 1)  # (winner, loser) as image 0 / image 1 of the row


@dataclass
class PairData:
    source: str
    pairs: list[Pair] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "<where>: <reason>", in order found
    ties: int = 0

    def skip(self, where: str, reason: str) -> None:
        self.skipped.append(f"{where}: {reason}")
        if len(self.skipped) <= WARN_ROWS:
            warn(f"preference data: skipped {where}: {reason}")
        elif len(self.skipped) == WARN_ROWS + 1:
            warn(f"preference data: more skipped rows in {self.source}; not named here")


def read_pairs(source: str, split: str = "train") -> PairData:
    """The usable pairs of `source` (see the module doc), with the skipped rows and the tie count."""
    path = Path(source).expanduser()
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise UserError(f"preference data {path} not found (a JSONL of prompt/image_w/image_l lines)")
        data = _read_jsonl(path)
    elif path.exists():
        data = _read_tables(path)
    elif source.count("/") == 1 and not source.startswith((".", "/", "~")):
        data = _read_hub(source, split)
    else:
        raise UserError(
            f"preference data {source} not found: give a .jsonl file, Parquet/Arrow file(s) in the "
            "Pick-a-Pic layout, or a Hugging Face dataset id such as yuvalkirstain/pickapic_v2"
        )
    if not data.pairs:
        raise UserError(
            f"preference data {source} holds no usable pair ({len(data.skipped)} rows skipped, "
            f"{data.ties} ties dropped)"
        )
    return data


# --- JSONL -------------------------------------------------------------------------------------------
def _read_jsonl(path: Path, need: str = "images") -> PairData:
    """need "images": pairs whose two image files exist (Diffusion-DPO); "seed": pairs with an integer `seed`
    (D3PO's human labels, regenerated from the seed), images optional."""
    data = PairData(str(path))
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            row = json.loads(line)
        except ValueError as e:
            data.skip(where, f"not JSON ({e})")
            continue
        if not isinstance(row, dict):
            data.skip(where, "not a JSON object")
            continue
        prompt = row.get("prompt", row.get("caption"))
        if not isinstance(prompt, str) or not prompt.strip():
            data.skip(where, "no prompt")
            continue
        order = _preferred_first(data, where, row)
        if order is None:
            continue
        seed = row.get("seed")
        if need == "seed":
            if isinstance(seed, bool) or not isinstance(seed, int):
                data.skip(where, f"needs an integer seed to regenerate the pair, got {seed!r}")
                continue
            data.pairs.append(Pair(prompt, where, lambda: (), seed=seed, order=order))
            continue
        names = (
            (row.get("image_w"), row.get("image_l"))
            if "image_w" in row
            else (row.get("image_0"), row.get("image_1"))
        )
        if None in names:
            data.skip(where, "needs image_w and image_l, or image_0 and image_1 (files)")
            continue
        files = [path.parent / str(names[i]) for i in order]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            data.skip(where, f"image file not found: {missing[0]}")
            continue
        data.pairs.append(Pair(prompt, where, lambda files=files: tuple(files), seed=seed, order=order))
    return data


def _preferred_first(data: PairData, where: str, row: dict) -> tuple[int, int] | None:
    """(winner, loser) as indices of image 0/1 of a JSONL row: from `image_w`/`image_l` (winner first),
    Pick-a-Pic's `label_0` or `preferred` (0 | 1, the preferred image); None for a tie or a bad row."""
    if "image_w" in row and "image_l" in row:
        return (0, 1)
    if "label_0" in row:
        return _winner_first(data, where, row["label_0"], (0, 1))
    if "preferred" in row:
        if row["preferred"] not in (0, 1) or isinstance(row["preferred"], bool):
            data.skip(where, f"preferred must be 0 (image 0) or 1 (image 1), got {row['preferred']!r}")
            return None
        return (row["preferred"], 1 - row["preferred"])
    data.skip(where, "needs image_w and image_l, or image_0, image_1 and label_0 (or preferred)")
    return None


def read_seeded_labels(path: str | Path) -> PairData:
    """Preference rows that name a `seed` (D3PO's human labels: the pair is regenerated from it), from the
    same JSONL layout as the offline pairs: label_0 (Pick-a-Pic) or preferred (0 | 1); images optional, so
    a `diffusion-align pairs --shared-noise` file, relabelled by people, is one. Each pair's `order` is
    (winner, loser) as 0/1. Bad rows are reported by line and skipped; ties dropped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(
            f"human labels {path} not found: a JSONL of {{prompt, seed, label_0}} lines (`diffusion-align "
            "pairs --shared-noise` writes one to relabel)"
        )
    data = _read_jsonl(path, need="seed")
    if not data.pairs:
        raise UserError(
            f"human labels {path} hold no usable pair ({len(data.skipped)} rows skipped, {data.ties} ties "
            "dropped)" + (f"; first: {data.skipped[0]}" if data.skipped else "")
        )
    return data


def _winner_first(data: PairData, where: str, label_0, pair: tuple):
    """`pair` (image 0, image 1) winner first by Pick-a-Pic's label_0 (1: image 0 preferred, 0: image 1);
    None for a tie (counted: ties are dropped) or a bad label (reported, the row skipped)."""
    try:
        value = float(label_0)
    except (TypeError, ValueError):
        value = None
    if value == 0.5:
        data.ties += 1
        return None
    if value not in (0.0, 1.0):
        data.skip(where, f"label_0 must be 1, 0 or 0.5 (a tie), got {label_0!r}")
        return None
    return pair if value == 1.0 else pair[::-1]


# --- tables (Pick-a-Pic v2 layout) -------------------------------------------------------------------
def _add_table_rows(data: PairData, name: str, captions, labels, image_bytes: Callable) -> None:
    """Pairs from a table's caption and label_0 columns; image_bytes(row, column) reads an image lazily."""
    for row, (caption, label) in enumerate(zip(captions, labels, strict=True)):
        where = f"{name} row {row}"
        if not isinstance(caption, str) or not caption.strip():
            data.skip(where, "no prompt (empty caption)")
            continue
        columns = _winner_first(data, where, label, ("jpg_0", "jpg_1"))
        if columns is None:
            continue
        data.pairs.append(
            Pair(caption, where, lambda row=row, c=columns: (image_bytes(row, c[0]), image_bytes(row, c[1])))
        )


def _read_tables(path: Path) -> PairData:
    try:
        import pyarrow  # noqa: F401
    except ImportError as e:
        raise UserError(f"reading {path} needs pyarrow: pip install pyarrow") from e
    files = sorted(p for p in path.iterdir() if p.suffix in TABLE_SUFFIXES) if path.is_dir() else [path]
    if not files or any(f.suffix not in TABLE_SUFFIXES for f in files):
        raise UserError(f"preference data {path}: expected .jsonl, .parquet or .arrow file(s)")
    data = PairData(str(path))
    for file in files:
        table = _Table(file)
        _add_table_rows(data, file.name, table.column("caption"), table.column("label_0"), table.image)
    return data


class _Table:
    """One Parquet/Arrow file; its image columns are read on first use (and then kept, one file at a time)."""

    current: tuple[Path, object] | None = None  # the one file whose image columns are held

    def __init__(self, file: Path):
        self.file = file
        read = self._read(None)
        names = getattr(read, "schema", read).names
        missing = [c for c in PICKAPIC_COLUMNS if c not in names]
        if missing:
            raise UserError(
                f"{file}: missing column(s) {', '.join(missing)} (the Pick-a-Pic v2 layout: "
                f"{', '.join(PICKAPIC_COLUMNS)})"
            )

    def _read(self, columns):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            if self.file.suffix == ".parquet":
                if columns is None:
                    return pq.read_schema(self.file)
                return pq.read_table(self.file, columns=columns)
            source = pa.memory_map(str(self.file))
            try:
                table = pa.ipc.open_file(source).read_all()
            except pa.ArrowInvalid:
                table = pa.ipc.open_stream(pa.memory_map(str(self.file))).read_all()  # datasets' cache files
            return table if columns is None else table.select(columns)
        except (OSError, pa.ArrowException) as e:
            raise UserError(f"{self.file} is not a readable Parquet/Arrow file ({e})") from e

    def column(self, name: str) -> list:
        return self._read([name]).column(name).to_pylist()

    def image(self, row: int, column: str) -> bytes:
        if _Table.current is None or _Table.current[0] != self.file:
            _Table.current = (self.file, self._read(["jpg_0", "jpg_1"]))
        value = _Table.current[1].column(column)[row].as_py()
        return value["bytes"] if isinstance(value, dict) else value  # datasets' Image feature: {bytes, path}


# --- the Hugging Face hub ----------------------------------------------------------------------------
def _read_hub(name: str, split: str) -> PairData:
    try:
        import datasets
    except ImportError as e:
        raise UserError(
            f"{name} looks like a Hugging Face dataset id, which needs the datasets library (pip install "
            "datasets); or give a local .jsonl or Parquet/Arrow path"
        ) from e
    try:
        table = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown id, no such split: the library raises many kinds
        raise UserError(
            f"could not load Hugging Face dataset {name} (split {split}): {str(e).splitlines()[0]}; "
            "check the id and network, or give a local .jsonl or Parquet/Arrow path"
        ) from e
    missing = [c for c in PICKAPIC_COLUMNS if c not in table.column_names]
    if missing:
        raise UserError(f"dataset {name}: missing column(s) {', '.join(missing)} (Pick-a-Pic v2 layout)")
    data = PairData(name)

    def image_bytes(row: int, column: str) -> bytes:
        value = table[row][column]
        return value["bytes"] if isinstance(value, dict) else value

    _add_table_rows(data, f"{name}[{split}]", table["caption"], table["label_0"], image_bytes)
    return data


# --- images ------------------------------------------------------------------------------------------
def load_image(item, size: tuple[int, int]) -> torch.Tensor:
    """A Path or encoded bytes -> (3, H, W) float32 in [0, 1] at `size` (height, width): resized so that it
    covers the size, then centre-cropped (the paper's Resize + CenterCrop). Raises BadImage."""
    try:
        image = Image.open(item if isinstance(item, Path) else io.BytesIO(item))
        image = image.convert("RGB")
    except (OSError, ValueError, SyntaxError, TypeError) as e:
        raise BadImage(f"image does not decode ({type(e).__name__}: {e})") from e
    height, width = size
    scale = max(height / image.height, width / image.width)
    resized = (max(width, math.ceil(image.width * scale)), max(height, math.ceil(image.height * scale)))
    if resized != image.size:
        image = image.resize(resized, Image.BILINEAR)
    left, top = (resized[0] - width) // 2, (resized[1] - height) // 2
    image = image.crop((left, top, left + width, top + height))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


class PairOrder:
    """The order pairs are used in: a fresh permutation of all pairs per pass (seeded by `seed` and the pass
    number), read from a cursor that is checkpointed, so a resumed run continues with the same pairs."""

    def __init__(self, count: int, seed: int | None = 0):
        self.count, self.seed = count, seed
        self.position = 0  # pairs handed out so far, over all passes

    def take(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            passes, at = divmod(self.position, self.count)
            order = np.random.default_rng([self.seed, passes]).permutation(self.count)
            chunk = order[at : at + n - len(out)].tolist()
            out += chunk
            self.position += len(chunk)
        return out
