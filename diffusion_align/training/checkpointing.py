"""Crash-safe checkpoints: a checkpoint either exists complete or not at all, and damage is detected.

Layout: `<run>/checkpoints/checkpoint-<epoch>/` (epoch = epochs completed). A save writes everything into
`checkpoints/.tmp-checkpoint-<epoch>/`, then `manifest.json` (every file's size and SHA-256) last, and then
renames the folder into place (`os.replace`, atomic on POSIX), and only after that deletes checkpoints
beyond `keep_last`. A SIGKILL at any moment therefore leaves the previous checkpoint intact; a leftover
`.tmp-*` folder is ignored and cleaned by the next save. A checkpoint damaged later (a truncated copy, a
full disk) fails its manifest check, and `resolve_resume("latest")` falls back to the newest intact one.
Checkpoints written before manifests existed ("legacy") count as intact when every file in them loads.

Every rank calls `save_checkpoint` (no rank skips a barrier, so none can hang): each rank writes its own
RNG file, the main process writes the shared files and does the rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from diffusion_align.errors import UserError

PREFIX = "checkpoint-"
COMPLETE_MARKER = "trainer_state.json"  # the trainer's state; legacy checkpoints' completeness marker
MANIFEST = "manifest.json"  # written last: {"files": {relative path: {"size", "sha256"}}}
# Test hook: the save of this epoch's checkpoint stops inside the write (after its files, before the rename)
# and sleeps, so a test can SIGKILL the process at exactly that point.
PAUSE_ENV = "DIFFUSION_ALIGN_TEST_PAUSE_IN_CHECKPOINT"
PAUSE_MARKER = "PAUSED_FOR_TEST"


def checkpoint_dir(root: str | Path, epoch: int) -> Path:
    return Path(root) / f"{PREFIX}{epoch:06d}"


def _sealed(folder: Path) -> bool:
    return (folder / MANIFEST).is_file() or (folder / COMPLETE_MARKER).is_file()


def list_checkpoints(root: str | Path) -> list[Path]:
    """Renamed-into-place checkpoints under `root` (intact or not: see `checkpoint_problem`), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(rf"{PREFIX}\d+", p.name) and _sealed(p)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def resolve_resume(resume: str | None, root: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(checkpoint to resume from, [(damaged checkpoint skipped, its problem)]).

    `None` -> no checkpoint; "latest" -> the newest intact checkpoint under `root` (None when there is none
    yet, so `resume: latest` also starts fresh runs; an error when every one is damaged); a path -> that
    checkpoint folder, which must be intact."""
    if resume is None:
        return None, []
    if resume != "latest":
        path = Path(resume).expanduser()
        if not _sealed(path):
            raise UserError(
                f"checkpoint.resume={resume}: no complete checkpoint there (expected {path / MANIFEST}); "
                f"pass a folder like {checkpoint_dir(root, 10)} or 'latest'"
            )
        if problem := checkpoint_problem(path):
            raise UserError(f"checkpoint.resume: {path} is damaged ({problem}); pass another checkpoint")
        return path, []
    damaged = []
    for path in reversed(list_checkpoints(root)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, damaged
        damaged.append((path, problem))
    if damaged:
        listing = "; ".join(f"{p.name}: {problem}" for p, problem in damaged)
        raise UserError(
            f"checkpoint.resume=latest: no intact checkpoint under {root} ({listing}); start over with "
            "--overwrite or choose another output_dir"
        )
    return None, []


# --- the manifest ---------------------------------------------------------------------------------------
def _files(folder: Path) -> list[str]:
    names = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return sorted(n for n in names if n not in (MANIFEST, PAUSE_MARKER))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Seal `folder`: every file's size and hash, written after all of them."""
    files = {n: {"size": (folder / n).stat().st_size, "sha256": _sha256(folder / n)} for n in _files(folder)}
    (folder / MANIFEST).write_text(json.dumps({"format": 1, "files": files}, indent=1))


def is_legacy(folder: Path) -> bool:
    """Written before manifests existed (no manifest, only the trainer state)."""
    return not (Path(folder) / MANIFEST).is_file()


def checkpoint_problem(folder: str | Path) -> str | None:
    """None when the checkpoint is intact, else what is wrong (one short phrase naming the file)."""
    folder = Path(folder)
    if is_legacy(folder):
        return _legacy_problem(folder)
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        expected = {name: (int(f["size"]), str(f["sha256"])) for name, f in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable"
    for name, (size, sha) in expected.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
        if _sha256(path) != sha:
            return f"{name} differs from its hash in the manifest"
    return None


def _legacy_problem(folder: Path) -> str | None:
    """A checkpoint without manifest is intact when every file in it loads."""
    from safetensors.torch import load_file

    for name in _files(folder):
        path = folder / name
        try:
            if name.endswith(".pt"):
                torch.load(path, weights_only=True)
            elif name.endswith(".safetensors"):
                load_file(path)
            elif name.endswith(".json"):
                json.loads(path.read_text())
        except Exception as e:  # noqa: BLE001 - any failure to load means damaged
            return f"{name} does not load ({type(e).__name__})"
    if not (folder / COMPLETE_MARKER).is_file():
        return f"{COMPLETE_MARKER} is missing"
    return None


def save_checkpoint(
    root: str | Path,
    epoch: int,
    write_shared: Callable[[Path], None],
    write_rank: Callable[[Path], None],
    is_main: bool,
    barrier: Callable[[], None],
    keep_last: int,
) -> Path:
    """Write checkpoint `epoch` atomically. `write_shared(folder)` runs on the main process only (the
    trainer state included); `write_rank(folder)` runs on every rank (per-rank files); the manifest of all of
    them is written last."""
    root = Path(root)
    tmp = root / f".tmp-{PREFIX}{epoch:06d}"
    final = checkpoint_dir(root, epoch)
    if is_main:
        for leftover in root.glob(f".tmp-{PREFIX}*"):  # from a run killed mid-write
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    write_rank(tmp)
    barrier()  # every rank's files are in before the main process seals the folder
    if is_main:
        write_shared(tmp)
        write_manifest(tmp)
        _pause_for_test(tmp, epoch)
        if final.exists():  # re-saving an epoch (resumed run): move the old one aside, never delete first
            old = root / f".old-{PREFIX}{epoch:06d}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        for stale in list_checkpoints(root)[: -max(1, keep_last)]:
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    return final


def _pause_for_test(folder: Path, epoch: int) -> None:
    if os.environ.get(PAUSE_ENV) == str(epoch):
        (folder / PAUSE_MARKER).write_text(str(os.getpid()))
        time.sleep(3600)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- RNG states (saved as plain tensors/ints so `torch.load(weights_only=True)` reads them) --------------
def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in internal.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng(folder: Path, rank: int) -> None:
    torch.save(rng_state(), folder / f"rng_rank{rank}.pt")


def load_rng(folder: Path, rank: int) -> bool:
    """Restore this rank's RNG states; False when the checkpoint has none for it (other world size)."""
    path = Path(folder) / f"rng_rank{rank}.pt"
    if not path.is_file():
        return False
    set_rng_state(torch.load(path, weights_only=True))
    return True
