"""One optimizer step of a strategy's plan: accumulate `loss * weight` over its micro-batches, average the
LoRA gradients across processes, clip, step. A non-finite loss or gradient stops the run with a one-line
error before anything is saved, so the last checkpoint stays the last good one."""

from __future__ import annotations

import math

import torch

from diffusion_align.errors import UserError
from diffusion_align.training.across_processes import sync_gradients


def optimizer_step(
    strategy, micros: list[dict], accelerator, params, optimizer, scheduler, max_grad_norm: float,
    epoch: int, step_index: int, sink: list,
) -> float:  # fmt: skip
    """Run the step; each micro-batch's metrics go to `sink`. Returns the gradient norm before clipping."""
    optimizer.zero_grad(set_to_none=True)
    bad = None
    for i, micro in enumerate(micros):
        with accelerator.autocast():
            loss, metrics = strategy.loss(micro)
        where = f"epoch {epoch + 1}, optimizer step {step_index + 1}, micro-batch {i + 1}"
        if bad is None and not torch.isfinite(loss.detach()).all():
            culprit = next((k for k, v in metrics.items() if not math.isfinite(float(v))), None)
            bad = f"non-finite loss ({float(loss.detach())}) at {where}" + (
                f"; first non-finite metric: {culprit}" if culprit else ""
            )
        accelerator.backward(loss * float(micro["weight"]))
        if micro.get("filler"):  # run only to keep a sharded denoiser's processes in step
            continue
        sink.append({"train/loss": float(loss.detach()), **{k: float(v) for k, v in metrics.items()}})
    sync_gradients(params, accelerator, bad, epoch, step_index)
    norm = accelerator.clip_grad_norm_(params, max_grad_norm)
    norm = float(norm) if norm is not None else float("nan")
    if not math.isfinite(norm) and accelerator.scaler is None:  # with fp16 loss scaling inf means "skip"
        raise UserError(
            f"non-finite gradient norm at epoch {epoch + 1}, optimizer step {step_index + 1} (metric "
            "train/grad_norm); lower train.learning_rate or raise train.max_grad_norm clipping"
        )
    optimizer.step()
    scheduler.step()
    return norm
