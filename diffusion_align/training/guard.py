"""The reward-hacking guard: a held-out *gold* eval metric watched beside the optimised *proxy*.

At every evaluation (`observe`) the guard records (epoch, proxy, gold), keeps the best gold so far (the
trainer keeps that checkpoint under `checkpoints/best/` when `checkpoint.keep_best`) and counts consecutive
evaluations where gold is more than `margin` below its best while the proxy is above its value at gold's best
(the proxy still rises while what it stands for falls: reward hacking). `patience` such evaluations in a row
stop the run. The margin is fixed, or `noise_multiple` standard errors of gold's eval mean, measured on the
first evaluation's per-image scores (the base model's, "before"). A tie is not a new best: the earlier, less
trained checkpoint is kept. The state is plain JSON data, saved in every checkpoint (resume keeps the record).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

RECORD = "guard.json"  # in the run folder: the best record, the margin, the curve, why the run stopped


class Guard:
    def __init__(
        self,
        gold: str,
        proxy: str = "reward",
        patience: int = 0,
        margin: float | None = None,
        noise_multiple: float = 1.0,
    ):
        """gold, proxy: keys of an evaluation's result (e.g. "extra/shapes_match", "reward"); patience 0 =
        never stop; margin None = noise_multiple x gold's standard error at the first evaluation."""
        self.gold, self.proxy, self.patience = gold, proxy, patience
        self.fixed_margin, self.noise_multiple = margin, noise_multiple
        self.noise: float | None = None  # standard error of gold's eval mean at the first evaluation
        self.best: dict | None = None  # {"epoch", "gold", "proxy", "eval"}: the evaluation with the best gold
        self.streak = 0  # consecutive evaluations of gold below best - margin with the proxy above its value
        self.history: list[dict] = []  # [{"epoch", "proxy", "gold"}] in evaluation order
        self.stop_reason: str | None = None

    @property
    def margin(self) -> float:
        if self.fixed_margin is not None:
            return self.fixed_margin
        return self.noise_multiple * (self.noise or 0.0)

    @property
    def last_epoch(self) -> int | None:
        return self.history[-1]["epoch"] if self.history else None

    def observe(
        self, epoch: int, evaluation: dict[str, float], gold_scores: list[float] | None = None
    ) -> bool:
        """Record the evaluation at `epoch` (its result dict; `gold_scores` gold's per-image scores, used
        for the noise at the first evaluation); True when gold is a new best. Sets `stop_reason` when the
        run should stop."""
        gold, proxy = float(evaluation[self.gold]), float(evaluation[self.proxy])
        self.stop_reason = None
        if self.noise is None and gold_scores is not None and len(gold_scores) > 1:
            self.noise = _standard_error(gold_scores)
        self.history.append({"epoch": epoch, "proxy": proxy, "gold": gold})
        if self.best is None or gold > self.best["gold"]:
            self.best = {"epoch": epoch, "gold": gold, "proxy": proxy, "eval": dict(evaluation)}
            self.streak = 0
            return True
        hacked = gold < self.best["gold"] - self.margin and proxy > self.best["proxy"]
        self.streak = self.streak + 1 if hacked else 0
        if self.patience and self.streak >= self.patience:
            b = self.best
            self.stop_reason = (
                f"{self.gold} stayed more than {self.margin:.3g} below its best {b['gold']:.4g} (epoch "
                f"{b['epoch']}) for {self.streak} evaluations while {self.proxy} rose from {b['proxy']:.4g} "
                f"to {proxy:.4g}: now {gold:.4g} at epoch {epoch}"
            )
        return False

    # --- record and resume --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "gold": self.gold,
            "proxy": self.proxy,
            "noise": self.noise,
            "margin": self.margin,
            "best": self.best,
            "streak": self.streak,
            "history": self.history,
            "stop_reason": self.stop_reason,
        }

    def load_state_dict(self, state: dict) -> None:
        self.noise, self.best, self.streak = state["noise"], state["best"], state["streak"]
        self.history, self.stop_reason = list(state["history"]), state.get("stop_reason")

    def summary(self) -> dict:
        """What summary.json says about the guard."""
        b = self.best or {}
        return {
            "gold": self.gold,
            "best_epoch": b.get("epoch"),
            "best_gold": b.get("gold"),
            "margin": self.margin,
            "stopped_early": self.stop_reason,
        }

    def write(self, run_dir: Path, **extra) -> Path:
        path = Path(run_dir) / RECORD
        path.write_text(json.dumps({**self.state_dict(), **extra}, indent=1))
        return path


def _standard_error(scores: list[float]) -> float:
    n = len(scores)
    mean = sum(scores) / n
    return math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1) / n)
