"""What a training checkpoint holds, written and read in one place: the LoRA, optimizer, LR schedule,
reward normaliser and strategy states, the run's config, per-rank RNG states and the trainer's counters
and guard record (`checkpointing.COMPLETE_MARKER`, written last). `checkpointing` makes the folder atomic and
verifiable. The best checkpoint (`checkpoint.keep_best`) is a full checkpoint under `checkpoints/best/`,
where the keep_last rotation of `checkpoints/` never looks; only the newest best stays there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from diffusion_align.training import checkpointing

BEST = "best"  # checkpoints/best/checkpoint-<epoch>/


def best_checkpoint(root: Path, epoch: int) -> Path:
    return checkpointing.checkpoint_dir(Path(root) / BEST, epoch)


def save_best(trainer, seconds: float) -> Path:
    """Checkpoint the run's current weights as its best: written (atomically) before the previous best is
    deleted, whatever epoch that one had (a resumed run may find a best from beyond its checkpoint)."""
    t = trainer
    root = t.ckpt_root / BEST
    final = save(t, seconds, root=root, keep_last=1 << 30)
    if t.is_main:
        for other in checkpointing.list_checkpoints(root):
            if other != final:
                shutil.rmtree(other, ignore_errors=True)
    return final


def save(trainer, seconds: float, root: Path | None = None, keep_last: int | None = None) -> Path:
    """Checkpoint `trainer`'s run at its current epoch; every process calls it (rank files, barrier).
    `root`/`keep_last`: where and how many (default: the run's checkpoints/ and keep_last)."""
    t = trainer

    def write_shared(folder: Path) -> None:
        t.policy.save_lora(folder / "lora", base_model=t.options.base_model)
        torch.save(t.optimizer.state_dict(), folder / "optimizer.pt")
        torch.save(t.scheduler.state_dict(), folder / "scheduler.pt")
        torch.save(t.reward.state_dict(), folder / "reward.pt")
        t.folder.save_config(folder / "config.yaml")  # what a resume is compared with
        if hasattr(t.strategy, "state_dict"):
            torch.save(t.strategy.state_dict(), folder / "strategy.pt")
        state = {
            "epoch": t.epoch,
            "global_step": t.global_step,
            "seconds": seconds,
            "world_size": t.world,
            "eval_before": t.eval_before,
            "history": t.history,
            "guard": t.guard.state_dict() if t.guard is not None else None,
        }
        (folder / checkpointing.COMPLETE_MARKER).write_text(json.dumps(state, indent=1))

    return checkpointing.save_checkpoint(
        t.ckpt_root if root is None else root,
        t.epoch,
        write_shared,
        lambda folder: checkpointing.save_rng(folder, t.rank),
        t.is_main,
        t.accelerator.wait_for_everyone,
        t.options.keep_last if keep_last is None else keep_last,
    )


def load(trainer, folder: Path) -> dict:
    """Restore `trainer`'s objects (and this process's RNG) from `folder`; returns the trainer's counters
    {"epoch", "global_step", "seconds", "eval_before", "history", ...}."""
    t = trainer
    state = json.loads((folder / checkpointing.COMPLETE_MARKER).read_text())
    t.policy.load_lora(folder / "lora", t.options.base_model)
    t.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    t.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    t.reward.load_state_dict(torch.load(folder / "reward.pt", weights_only=True))
    if (folder / "strategy.pt").is_file() and hasattr(t.strategy, "load_state_dict"):
        t.strategy.load_state_dict(torch.load(folder / "strategy.pt", weights_only=True))
    checkpointing.load_rng(folder, t.rank)
    if t.scheduler.last_epoch == state["global_step"]:  # saved before warmup_schedule (one step behind)
        t.scheduler.last_epoch += 1
    return state
