"""What the trainer is handed: the ready objects of a run (`TrainingRun`) and its options as plain values
(`RunOptions`). `builder.build_run` makes both from a config; the trainer never sees a config object."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class EvalSampling:
    """How evaluation images are drawn (the `sample` settings): image i uses seed `seed + i`."""

    num_steps: int
    guidance_scale: float
    eta: float
    batch_size: int
    seed: int
    negative_prompt: str | None
    size: tuple[int, int] | None  # (height, width); None: the model's default


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """The plain values of a run: counts are global (split over processes by the trainer)."""

    output_dir: Path
    epochs: int
    samples_per_epoch: int
    batch_size: int
    micro_batch_size: int
    seed: int
    max_grad_norm: float
    base_model: str  # the pretrained model the LoRA belongs to (saved with it)
    title: str  # "<strategy> on <model>", the reward curve's title
    eval: EvalSampling
    eval_every: int
    log_every: int
    progress: bool
    checkpoint_every: int
    keep_last: int
    export_merged: bool
    tensorboard: bool
    wandb: bool
    wandb_project: str
    config_dict: dict[str, Any]  # the config as plain data, for wandb's run record
    keep_best: bool = False  # keep the checkpoint of the best guard.gold in checkpoints/best/
    final_best: bool = False  # the run's lora/ is the best checkpoint's (needs keep_best)
    collapse_fraction: float = 0.5  # warn when eval diversity < this x its value before training


@dataclasses.dataclass
class TrainingRun:
    """The objects a training run works with, all built and on their device."""

    accelerator: Any
    group: Any  # distributed.AccelerateGroup over the accelerator
    backbone: Any
    policy: Any
    strategy: Any
    reward: Any  # the training reward, recording every call's components (`take()`)
    eval_reward: Any  # extra evaluation-only rewards, or None
    optimizer: Any  # prepared by accelerate
    scheduler: Any
    train_prompts: list[str]
    eval_prompts: list[str]  # each eval prompt repeated eval_images_per_prompt times
    folder: Any  # run_folder.RunFolder: how the run starts, and the config to save
    options: RunOptions
    guard: Any = None  # guard.Guard watching the gold metric, or None
    diversity: Any = None  # rewards.diversity.ClipDiversity for the eval images, or None
