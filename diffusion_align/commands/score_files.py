"""What `score` reads and writes: inputs (with `sample`'s images.jsonl index) and a resumable row file.

Inputs: a folder holding `images.jsonl` (what `sample` writes) contributes exactly the files that index lists,
with their prompts, and nothing else under it (so the contact-sheet `grid.png` is never scored).

Output: rows are appended and flushed one by one, so a crash or kill keeps every row scored so far; with
`resume=True` the rows already in the file are kept and their files are not scored again. A torn last line
(a kill mid-write) is cut off before appending. The output may never be one of the input files.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

from diffusion_align.errors import UserError

INDEX = (
    "images.jsonl"  # written by `sample`: {"file": path relative to its folder, "prompt": ..., "seed": ...}
)
DEFAULT_OUTPUT_NAME = "scores.jsonl"  # inside a folder given as -o


def read_index(index: Path) -> list[tuple[Path, str | None]]:
    """(file, prompt) per row of a `sample` index; a video model's row names its video when it has one."""
    out = []
    for n, line in enumerate(index.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = row.get("video") or row["file"]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise UserError(f'{index}:{n}: expected a JSON object with "file" (as `sample` writes)') from None
        prompt = row.get("prompt")
        out.append((index.parent / name, None if prompt is None else str(prompt)))
    return out


def expand_inputs(paths: list[str]):
    """Files to score, prompts from `sample` indexes ({resolved path: prompt}), failures (missing files) and
    the index files read.

    Folders are searched as `rewards.io.find_media` does, except that a folder holding an images.jsonl
    contributes exactly the files it lists.
    """
    from rewards.io import LoadFailure, find_media

    files: list[Path] = []
    prompts: dict[Path, str] = {}
    failures: list[LoadFailure] = []
    seen: set[Path] = set()
    indexes: list[Path] = []

    def add(path: Path) -> None:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            files.append(path)

    for item in paths:
        root = Path(item)
        if not root.is_dir():
            found, bad = find_media([root])
            failures += bad
            for f in found:
                add(f)
            continue
        indexed = sorted(p.parent for p in root.rglob(INDEX) if p.is_file() and not _hidden(p, root))
        found, _ = find_media([root])
        for f in found:
            if not any(f.is_relative_to(folder) for folder in indexed):
                add(f)
        for folder in indexed:
            indexes.append(folder / INDEX)
            for path, prompt in read_index(folder / INDEX):
                if not path.is_file():
                    failures.append(LoadFailure(path, f"listed in {folder / INDEX} but missing"))
                    continue
                add(path)
                if prompt is not None:
                    prompts[path.resolve()] = prompt
    return files, prompts, failures, indexes


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def output_path(output: str | None, inputs: list[Path], protected: list[Path]) -> Path | None:
    """The file `-o` names: a folder (existing, or written with a trailing slash) gets scores.jsonl inside.
    Refuses a path that is one of the inputs or files read (`protected`), whatever its extension."""
    if output is None:
        return None
    path = Path(output)
    if path.is_dir() or output.endswith(("/", "\\")):
        path = path / DEFAULT_OUTPUT_NAME
    taken = {p.resolve() for p in [*inputs, *protected]}
    if path.resolve() in taken:
        raise UserError(f"-o {output}: that is one of the files being read; write the scores elsewhere")
    if path.suffix.lower() not in (".jsonl", ".csv", ".json", ".txt", "") and path.exists():
        raise UserError(f"-o {output}: exists and is not a .jsonl/.csv score file; pick another name")
    return path


class RowWriter:
    """Appends complete rows to a file (JSONL, or CSV for .csv) or stdout, flushed one by one."""

    def __init__(self, path: Path | None, columns: list[str], resume: bool = False):
        self.columns, self.path = columns, path
        self.csv = path is not None and path.suffix.lower() == ".csv"
        self.done: list[dict] = []  # rows already in the file (resume)
        if path is None:
            self.stream = sys.stdout
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            if resume and path.is_file():
                self.done = self._read_existing(path)
            self.stream = open(path, "a" if self.done else "w", encoding="utf-8", newline="")
        if self.csv and not self.done:
            self.writer = csv.DictWriter(self.stream, fieldnames=columns)
            self.writer.writeheader()
        elif self.csv:
            self.writer = csv.DictWriter(self.stream, fieldnames=columns)

    def _read_existing(self, path: Path) -> list[dict]:
        text = path.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):  # a kill mid-write: drop the torn row, it is rescored
            text = text[: text.rfind("\n") + 1]
            path.write_text(text, encoding="utf-8")
        if self.csv:
            reader = csv.DictReader(io.StringIO(text))
            rows = list(reader)
            header = reader.fieldnames or []
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            header = list(rows[0]) if rows else []
        if rows and header != self.columns:
            raise UserError(
                f"--resume: {path} has columns {', '.join(header)}, this run writes "
                f"{', '.join(self.columns)}; give the same --reward list or another -o"
            )
        return rows

    def scored_paths(self) -> set[Path]:
        return {Path(r["path"]).resolve() for r in self.done}

    def write(self, row: dict) -> None:
        if self.csv:
            self.writer.writerow(row)
        else:
            self.stream.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.path is not None:
            self.stream.close()
