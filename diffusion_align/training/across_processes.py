"""What the processes of a training run agree on: averaged LoRA gradients, gathered reward statistics and
mean metrics. With one process every function is the plain local computation."""

from __future__ import annotations

import numpy as np
import torch

from diffusion_align.errors import UserError


def sync_gradients(params, accelerator, bad: str | None, epoch: int, step_index: int) -> None:
    """Average the LoRA gradients over processes (one all-reduce) and agree on a non-finite loss."""
    # Not accelerate's DDP wrapper + `accumulate`: strategies call the UNet through the backbone, several
    # forwards per backward, which DDP's hooks do not support; this one flat reduce also carries the flag.
    world = accelerator.num_processes
    if world > 1:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat(
            [g.flatten().float() for g in grads]
            + [torch.tensor([float(bad is not None)], device=grads[0].device)]
        )
        flat = accelerator.reduce(flat, reduction="sum")
        any_bad = flat[-1].item() > 0
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = (flat[offset : offset + n] / world).view_as(p).to(p.dtype)
            offset += n
        if any_bad and bad is None:
            bad = f"non-finite loss on another process at epoch {epoch + 1}, step {step_index + 1}"
    if bad is not None:
        raise UserError(bad + "; no checkpoint was written over the last good one")


def equal_micro_counts(micros: list[dict], strategy, group, device) -> tuple[list[dict], int]:
    """One optimizer step's micro-batches, padded so that every process runs as many: a sharded denoiser's
    blocks gather their weights from all processes, so each forward and backward must happen on every
    process at once. Micro-batches of weight 0 (nothing to learn) are dropped, then the step is filled up to
    the largest count over processes (at least one) with `strategy.filler(micros[0])`: real rows at weight 0,
    which call the denoiser exactly as a training micro-batch does and add nothing to the gradient.
    Returns (micro-batches, fillers added)."""
    real = [m for m in micros if m["weight"] > 0]
    counts = group.gather(torch.tensor([len(real)], device=device))
    wanted = max(1, int(counts.max().item()))
    missing = wanted - len(real)
    if not missing:
        return real, 0
    filler = {**strategy.filler(micros[0]), "weight": 0.0, "filler": True}  # built once, run `missing` times
    return real + [filler] * missing, missing


def reward_metrics(recorded: dict[str, torch.Tensor], group, epoch: int) -> dict[str, float]:
    """Mean/std of the epoch's rewards over all processes, per component; stops on a non-finite value.
    `recorded`: {"total" | component: this process's (N,) values}. Processes may hold different numbers of
    values, or none of a component (offline pairs whose images all failed to decode), so the values travel as
    objects: a tensor gather would need equal shapes on every process."""
    mine = {name: values.detach().float().flatten().cpu().tolist() for name, values in recorded.items()}
    every = group.gather_object([mine])
    metrics = {}
    for name in sorted({k for m in every for k in m}, key=lambda k: (k == "total", k)):  # components first
        values = torch.tensor([v for m in every for v in m.get(name, [])], dtype=torch.float32)
        bad = (~torch.isfinite(values)).sum().item()
        if bad:
            what = "total reward" if name == "total" else f"reward component '{name}'"
            raise UserError(
                f"non-finite reward at epoch {epoch + 1}: {what} has {bad} non-finite values out of "
                f"{values.numel()}; check the reward model and its inputs (no checkpoint was written)"
            )
        key = "reward" if name == "total" else f"reward/{name}"
        metrics[f"{key}/mean" if name == "total" else key] = values.mean().item()
        if name == "total":
            metrics["reward/std"] = values.std().item() if values.numel() > 1 else 0.0
    return metrics


def mean_over_processes(metrics: dict[str, float], group, world: int) -> dict[str, float]:
    if world == 1:
        return {k: float(v) for k, v in metrics.items()}
    every = group.gather_object([{k: float(v) for k, v in metrics.items()}])
    keys = sorted({k for m in every for k in m})
    return {k: float(np.mean([m[k] for m in every if k in m])) for k in keys}


def mean_dicts(items: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for d in items for k in d})
    return {k: float(np.mean([d[k] for d in items if k in d])) for k in keys}
