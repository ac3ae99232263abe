"""Trainer metrics: a JSONL log in the run folder (always), TensorBoard (default), wandb (optional).

Only the main process writes. `metrics.jsonl` has one object per `log` call, `{"epoch": e, "step": s, ...}`;
on resume the lines after the resumed epoch (written by the interrupted run) are dropped, so the file reads
as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from diffusion_align.errors import UserError


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
            kept = [line for line in self.read(self.path) if line.get("epoch", -1) <= resume_epoch]
            self.path.write_text("".join(json.dumps(line) + "\n" for line in kept))
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
    def read(path: str | Path) -> list[dict]:
        """The records of a metrics.jsonl file."""
        path = Path(path)
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finite(metrics: dict[str, float]) -> dict:
    # JSON has no NaN/inf: write them as strings so the file stays valid JSON
    return {k: v if math.isfinite(v) else str(v) for k, v in metrics.items()}
