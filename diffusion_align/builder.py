"""The builder: a config in, the ready objects of a training run out (`build_run`), and `train(config)`.

    from diffusion_align.builder import train
    summary = train(config)   # build_run(config) + Trainer(run).run()

This is the one place that reads a training config: it starts accelerate, decides how the run starts in
its folder, builds backbone, policy, strategy (from the STRATEGIES table), reward, optimizer, LR schedule
and prompt lists, and hands the trainer those objects with the run's options as plain values
(`training_run`). The trainer imports no config module. Order matters for exact results: the torch seed is
set before the policy is built (the LoRA's initial weights draw from it).

The run folder needs the config twice: to decide how the run starts (`run_folder.check_start` compares it
with a checkpoint's; done here, before anything is built) and to be saved, at start and in every checkpoint.
For the second the trainer gets a `run_folder.RunFolder` holding the config already written as YAML text:
what is saved is fixed when the run is built, and the loop handles text, not config objects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import torch

from diffusion_align.bundled import BUNDLED, bundled_path
from diffusion_align.config import run_folder
from diffusion_align.config.loading import config_yaml, to_dict
from diffusion_align.config.registry import (
    build_backbone,
    build_policy,
    build_reward,
    custom_components,
)
from diffusion_align.config.settings import Config
from diffusion_align.engine.sharding import shard_denoiser
from diffusion_align.errors import ConfigError, UserError
from diffusion_align.methods.distributed import AccelerateGroup, LocalGroup
from diffusion_align.methods.strategies import strategy_class
from diffusion_align.prompts import load_prompts
from diffusion_align.training.epoch_draws import derive_seed
from diffusion_align.training.guard import Guard
from diffusion_align.training.trainer import Trainer
from diffusion_align.training.training_run import EvalSampling, RunOptions, TrainingRun

FSDP_LAUNCH_ENV = "ACCELERATE_USE_FSDP"  # set by `accelerate launch` with a distributed_type: FSDP config
SUPPORTED_DISTRIBUTED = {"NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_MUSA"}


def train(config: Config, overwrite: bool = False) -> dict:
    """Fine-tune `config.model` with `config.strategy`; returns the summary also written to summary.json.
    `overwrite`: start over in a non-empty output_dir, deleting its run artifacts (see `run_folder`)."""
    return Trainer(build_run(config, overwrite)).run()


def build_run(config: Config, overwrite: bool = False) -> TrainingRun:
    """Everything `config` names, built; nothing is written to the run folder (the trainer does that)."""
    from accelerate import Accelerator

    if config.strategy is None:
        raise UserError("no strategy configured: add `strategy: ddpo` (or d3po, alignprop, draft, prdp)")
    t = config.train
    # Processes started by torchrun on a machine without CUDA form a CPU (gloo) group only with cpu=True.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = config.model.device == "cpu" or (launched and not torch.cuda.is_available())
    shard = sharding_mode(config)
    with _without_env(FSDP_LAUNCH_ENV):  # the trainer shards the denoiser itself (`engine.sharding`)
        acc = Accelerator(mixed_precision=t.mixed_precision, cpu=cpu)
    kind = str(acc.distributed_type).split(".")[-1]
    if kind not in SUPPORTED_DISTRIBUTED:
        raise UserError(
            f"accelerate distributed_type {kind} is not supported by the trainer: launch with "
            "configs/accelerate/ddp.yaml, or configs/accelerate/fsdp.yaml to shard the frozen model"
        )
    _check_batch_sizes(config, acc.num_processes)
    start = run_folder.on_main(acc, lambda: run_folder.check_start(config, overwrite))
    # Prompts before the model: a wrong file name should not wait for a checkpoint to load.
    p = config.prompts
    if p.eval_images_per_prompt < 1:
        raise UserError(f"prompts.eval_images_per_prompt={p.eval_images_per_prompt} must be at least 1")
    train_prompts = load_prompts(p.train)
    eval_prompts = [q for q in load_prompts(p.eval)[: p.eval_count] for _ in range(p.eval_images_per_prompt)]

    torch.manual_seed(derive_seed(t.seed, acc.process_index, 7))  # dropout etc.; saved with the RNG state
    backbone = build_backbone(dataclasses.replace(config.model, device=str(acc.device)))
    policy = build_policy(backbone, config.sample, config.lora)
    _start_from_process_0(policy.parameters(), acc)
    if shard == "fsdp" and acc.num_processes > 1:  # after the LoRA is added: it stays outside the shards
        shard_denoiser(backbone.unet, policy.parameters(), acc.device)
    reward = build_reward(config.rewards, acc.device, record=True)  # the trainer logs every call
    eval_reward = build_reward(config.eval_rewards, acc.device) if config.eval_rewards else None
    guard = build_guard(config, reward, eval_reward)
    diversity = build_diversity(config, acc.device)
    group = AccelerateGroup(acc)
    strategy = build_strategy(config, policy, reward, group)
    optimizer = torch.optim.AdamW(
        policy.parameters(),
        lr=t.learning_rate,
        betas=tuple(t.adam_betas),
        weight_decay=t.adam_weight_decay,
        eps=t.adam_epsilon,
    )
    # Not passed to accelerate.prepare: its scheduler wrapper steps once per process per step.
    scheduler = warmup_schedule(optimizer, t.lr_warmup_steps)
    optimizer = acc.prepare(optimizer)  # fp16 loss scaling lives in accelerate's wrapper

    folder = run_folder.RunFolder(
        Path(config.output_dir),
        start,
        config_yaml(config),
        custom_components(config),
    )
    return TrainingRun(
        accelerator=acc,
        group=group,
        backbone=backbone,
        policy=policy,
        strategy=strategy,
        reward=reward,
        eval_reward=eval_reward,
        optimizer=optimizer,
        scheduler=scheduler,
        train_prompts=train_prompts,
        eval_prompts=eval_prompts,
        folder=folder,
        options=run_options(config),
        guard=guard,
        diversity=diversity,
    )


def build_diversity(config: Config, device):
    """The CLIP image tower that measures eval diversity (`guard.diversity_model`), or None."""
    name, model = config.guard.diversity_model, config.model.pretrained
    if name is None:  # automatic: the bundled world's own CLIP, when there are image pairs to compare
        if model not in BUNDLED or config.prompts.eval_images_per_prompt < 2:
            return None
        name = "shapes-clip"
    if name == "off":
        return None
    if config.prompts.eval_images_per_prompt < 2:
        raise ConfigError(
            f"guard.diversity_model={name} compares the images of each eval prompt: set "
            "prompts.eval_images_per_prompt >= 2 (or guard.diversity_model=off)"
        )
    from rewards.diversity import ClipDiversity

    path = bundled_path(name) if name in BUNDLED else name
    return ClipDiversity.from_pretrained(path).to(device)


def build_guard(config: Config, reward, eval_reward) -> Guard | None:
    """The guard on `guard.gold` (an eval reward never optimised; None picks the first such one), or None
    when there is none; one-line errors for guard options that cannot work."""
    g, trained = config.guard, set(reward.names)
    held_out = [
        f"extra/{n}" for n in (eval_reward.names if eval_reward is not None else []) if n not in trained
    ]
    gold = g.gold if g.gold is not None else (held_out[0] if held_out else None)
    if gold is not None and gold not in held_out:
        optimised = gold.removeprefix("extra/") in trained
        raise ConfigError(
            f"guard.gold={gold} is {'an optimised reward' if optimised else 'not an eval reward'}: choose "
            f"one of {held_out or 'the eval_rewards (none is configured that is not optimised)'}"
        )
    wanted = (("checkpoint.keep_best", config.checkpoint.keep_best), ("guard.patience", g.patience))
    needs = [key for key, on in wanted if on]
    if gold is None and needs:
        raise ConfigError(
            f"{needs[0]} needs a gold metric: add an eval_rewards entry that is not optimised (e.g. "
            "shapes_match) or set guard.gold"
        )
    if g.final == "best" and not config.checkpoint.keep_best:
        raise ConfigError(
            "guard.final=best needs checkpoint.keep_best=true (the best checkpoint is what it exports)"
        )
    if g.patience and not config.logging.eval_every:
        raise ConfigError("guard.patience needs evaluations during training: set logging.eval_every > 0")
    if gold is None:
        return None
    return Guard(gold, "reward", g.patience, g.margin, g.noise_multiple)


def build_strategy(config: Config, policy, reward, group=None):
    """The configured strategy (its class from the STRATEGIES table) on `policy` and `reward`; `group`: the
    processes it gathers over (one process when None). Also what `benchmarks/bench_strategies.py` uses."""
    cls = strategy_class(config.strategy)
    return cls(config.strategy, policy, reward, config.sample, group=LocalGroup() if group is None else group)


def run_options(config: Config) -> RunOptions:
    """The config's plain values the training loop reads."""
    t, log, ckpt = config.train, config.logging, config.checkpoint
    strategy = type(config.strategy).__name__.removesuffix("Config")
    return RunOptions(
        output_dir=Path(config.output_dir),
        epochs=t.epochs,
        samples_per_epoch=t.samples_per_epoch,
        batch_size=t.batch_size,
        micro_batch_size=t.micro_batch_size,
        seed=t.seed,
        max_grad_norm=t.max_grad_norm,
        base_model=config.model.pretrained,
        title=f"{strategy} on {config.model.pretrained}",
        eval=eval_sampling(config.sample),
        eval_every=log.eval_every,
        log_every=log.log_every,
        progress=log.progress,
        checkpoint_every=ckpt.every,
        keep_last=ckpt.keep_last,
        export_merged=ckpt.export_merged,
        tensorboard=log.tensorboard,
        wandb=log.wandb,
        wandb_project=log.wandb_project,
        config_dict=to_dict(config),
        keep_best=ckpt.keep_best,
        final_best=config.guard.final == "best",
        collapse_fraction=config.guard.collapse_fraction,
    )


def eval_sampling(s) -> EvalSampling:
    """How evaluation images are drawn, from the `sample` settings `s` (eval_num_steps / eval_eta: None =
    the training ones)."""
    size = (s.height, s.width) if s.height and s.width else None
    steps = s.num_steps if s.eval_num_steps is None else s.eval_num_steps
    eta = s.eta if s.eval_eta is None else s.eval_eta
    return EvalSampling(steps, s.guidance_scale, eta, s.batch_size, s.seed, s.negative_prompt, size)


def sharding_mode(config: Config) -> str:
    """`model.shard` ("fsdp" or "none"), or when unset the launcher's (configs/accelerate/fsdp.yaml)."""
    launched_fsdp = os.environ.get(FSDP_LAUNCH_ENV, "false").lower() == "true"
    shard = config.model.shard or ("fsdp" if launched_fsdp else "none")
    if launched_fsdp and shard != "fsdp":
        raise UserError(
            "model.shard=none contradicts the FSDP launch (configs/accelerate/fsdp.yaml): remove model.shard "
            "or launch with configs/accelerate/ddp.yaml"
        )
    if shard == "fsdp" and config.checkpoint.export_merged:
        raise UserError(
            "checkpoint.export_merged cannot merge the LoRA into a sharded denoiser: set it to false (the "
            "saved LoRA loads into the full model with diffusers' load_lora_weights + fuse_lora)"
        )
    # a sharded block runs only when every process calls it: processes whose plans differ in length (D3PO's
    # decisive pairs, filtered advantages) are padded with the strategy's weight-0 `filler` micro-batches
    if shard == "fsdp" and not hasattr(strategy_class(config.strategy), "filler"):
        name = type(config.strategy).__name__.removesuffix("Config")
        raise UserError(
            f"model.shard=fsdp needs the strategy to pad its plan with weight-0 micro-batches, and {name} "
            "has no `filler(micro)` method (see diffusion_align/methods/strategies/__init__.py): add one, "
            "or use model.shard=none"
        )
    return shard


def _start_from_process_0(params, accelerator) -> None:
    """Every process starts from process 0's LoRA: peft draws A from the global RNG, which is seeded per
    process above, so without this the processes would train different adapters (a checkpoint loaded from
    disk leaves the seeds' difference in place; a tiny model built from a config re-seeds it away)."""
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        for p in params:
            p.data.copy_(broadcast(p.data.contiguous(), from_process=0))


@contextlib.contextmanager
def _without_env(name: str):
    """`name` unset inside the block. accelerate's FSDP mode wraps a model it trains together with its
    optimizer; here only the frozen denoiser is sharded and the LoRA is trained replicated, so accelerate
    is started as plain data parallel and the launch setting only tells `sharding_mode` to shard."""
    value = os.environ.pop(name, None)
    try:
        yield
    finally:
        if value is not None:
            os.environ[name] = value


def _check_batch_sizes(config: Config, world: int) -> None:
    t = config.train
    for key, value in (("train.samples_per_epoch", t.samples_per_epoch), ("train.batch_size", t.batch_size)):
        if value <= 0 or value % world:
            raise UserError(
                f"{key}={value} must be a positive multiple of the number of processes ({world}); "
                "both are global counts, split evenly over processes"
            )
    if t.samples_per_epoch % t.batch_size:
        raise UserError(
            f"train.samples_per_epoch={t.samples_per_epoch} must be a multiple of "
            f"train.batch_size={t.batch_size} (every optimizer step uses a full batch)"
        )


def warmup_schedule(optimizer, warmup_steps: int):
    """diffusers' constant_with_warmup schedule, started one step in: optimizer step k (from 1) runs at
    min(1, k / warmup_steps) of the learning rate (never a step at 0, full rate from step warmup_steps), as
    this trainer always has; diffusers' own start spends step 1 at rate 0."""
    from diffusers.optimization import get_scheduler

    for group in optimizer.param_groups:  # what a scheduler built with last_epoch >= 0 starts from
        group.setdefault("initial_lr", group["lr"])
    return get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup_steps, last_epoch=0)
