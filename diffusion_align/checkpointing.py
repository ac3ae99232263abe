"""Crash-safe checkpoints: a checkpoint either exists complete or not at all.

Layout: `<run>/checkpoints/checkpoint-<epoch>/` (epoch = epochs completed). A save writes everything into
`checkpoints/.tmp-checkpoint-<epoch>/` and then renames it into place (`os.replace`, atomic on POSIX), and
only after that deletes checkpoints beyond `keep_last`. A SIGKILL at any moment therefore leaves the previous
checkpoint intact; a leftover `.tmp-*` folder is ignored and cleaned by the next save.

Every rank calls `save_checkpoint` (no rank skips a barrier, so none can hang): each rank writes its own
RNG file, the main process writes the shared files and does the rename.
"""

from __future__ import annotations

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
COMPLETE_MARKER = "trainer_state.json"  # written last inside the temp folder
# Test hook: the save of this epoch's checkpoint stops inside the write (after its files, before the rename)
# and sleeps, so a test can SIGKILL the process at exactly that point.
PAUSE_ENV = "DIFFUSION_ALIGN_TEST_PAUSE_IN_CHECKPOINT"
PAUSE_MARKER = "PAUSED_FOR_TEST"


def checkpoint_dir(root: str | Path, epoch: int) -> Path:
    return Path(root) / f"{PREFIX}{epoch:06d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and re.fullmatch(rf"{PREFIX}\d+", p.name) and (p / COMPLETE_MARKER).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def resolve_resume(resume: str | None, root: str | Path) -> Path | None:
    """`None` -> None; "latest" -> the newest complete checkpoint under `root` (None when there is none yet,
    so `resume: latest` also starts fresh runs); a path -> that checkpoint folder, checked."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume).expanduser()
    if not (path / COMPLETE_MARKER).is_file():
        raise UserError(
            f"checkpoint.resume={resume}: no complete checkpoint there (expected {path / COMPLETE_MARKER}); "
            f"pass a folder like {checkpoint_dir(root, 10)} or 'latest'"
        )
    return path


def save_checkpoint(
    root: str | Path,
    epoch: int,
    write_shared: Callable[[Path], None],
    write_rank: Callable[[Path], None],
    is_main: bool,
    barrier: Callable[[], None],
    keep_last: int,
) -> Path:
    """Write checkpoint `epoch` atomically. `write_shared(folder)` runs on the main process only and must
    write `COMPLETE_MARKER` last; `write_rank(folder)` runs on every rank (per-rank files)."""
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
