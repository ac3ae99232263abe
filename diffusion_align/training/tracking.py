"""Trainer metrics: a JSONL log in the run folder (always), TensorBoard (default), wandb (optional).

Only the main process writes. `metrics.jsonl` has one object per `log` call, `{"epoch": e, "step": s, ...}`;
on resume from epoch e the lines written after checkpoint e are dropped (later epochs, and a final
evaluation logged at epoch e itself, which comes after its checkpoint), so the file reads as one
uninterrupted run. A line torn by a kill mid-write is dropped with a warning.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from diffusion_align.errors import UserError, warn


class Tracker:
    def __init__(
        self,
        run_dir: str | Path,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str = "diffusion_align",
        config: dict | None = None,
        enabled: bool = True,
        resume_epoch: int | None = None,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_epoch is None:
            self.path.write_text("")
        elif self.path.exists():  # keep what happened up to the checkpoint we resume from
            records, torn = self.read_intact(self.path)
            if torn:
                warn(f"{self.path}: dropped {torn} unreadable line(s) (a run killed while writing)")
            kept = [r for r in records if _before_checkpoint(r, resume_epoch)]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "logs"))
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError as e:
                raise UserError(
                    "logging.wandb=true but wandb is not installed: pip install 'diffusion-align[wandb]' "
                    "or set logging.wandb=false"
                ) from e
            self.wandb = wandb_lib.init(
                project=wandb_project, config=config, dir=str(run_dir), resume="allow"
            )

    def log(self, metrics: dict[str, float], epoch: int, step: int) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"epoch": epoch, "step": step, **_finite(clean)}) + "\n")
        if self.tb is not None:
            for key, value in clean.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({**clean, "epoch": epoch}, step=step)

    def log_image(self, tag: str, path: str | Path, step: int) -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            import numpy as np
            from PIL import Image

            self.tb.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        if self.wandb is not None:
            import wandb as wandb_lib

            self.wandb.log({tag: wandb_lib.Image(str(path))}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()

    @staticmethod
    def read_intact(path: str | Path) -> tuple[list[dict], int]:
        """(the records that parse, how many lines did not)."""
        records, bad = [], 0
        for line in Path(path).read_text().splitlines():
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                bad += 1
        return records, bad

    @staticmethod
    def read(path: str | Path) -> list[dict]:
        """The records of a metrics.jsonl file."""
        path = Path(path)
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _before_checkpoint(record: dict, epoch: int) -> bool:
    """Whether `record` was logged before checkpoint `epoch` was saved: an epoch's training line precedes its
    checkpoint; an evaluation-only line at that epoch is the final evaluation, which follows it."""
    at = record.get("epoch", -1)
    evaluation_only = all(k in ("epoch", "step") or k.startswith("eval/") for k in record)
    return at < epoch or (at == epoch and not evaluation_only)


def _finite(metrics: dict[str, float]) -> dict:
    # JSON has no NaN/inf: write them as strings so the file stays valid JSON
    return {k: v if math.isfinite(v) else str(v) for k, v in metrics.items()}
