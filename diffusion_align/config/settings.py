"""Config sections shared by every command: what model, how to sample, what LoRA.

Each field's comment is its documentation (it is what users read in the YAML recipes). Strategy and
training sections live next to the code that uses them and are gathered by the root config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from diffusion_align.config.ranges import FRACTION, POSITIVE, PROBABILITY, Range, add_ranges, at_least
from diffusion_align.errors import ConfigError
from diffusion_align.methods.strategies import STRATEGY_CONFIGS


@dataclass
class ModelSettings:
    pretrained: str = (
        "tiny-sd"  # built-in (shapes, shapes-flow, tiny-sd, tiny-sd3, ...), local diffusers folder or hub id
    )
    revision: str | None = None  # hub revision (branch, tag or commit)
    variant: str | None = None  # weight-file variant on the hub, e.g. "fp16"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # frozen base weights; LoRA trains in fp32
    device: str = "auto"  # "auto" = cuda when available, else cpu (accelerate overrides it when launched)
    gradient_checkpointing: bool = False  # recompute UNet activations in backward (reward backprop memory)
    vae_slicing: bool = False  # decode one image at a time
    vae_tiling: bool = False  # decode in tiles (large resolutions)
    attention: Literal["sdpa", "xformers"] = "sdpa"  # xformers needs the [xformers] extra
    # keep the text encoders on the CPU, on the model's device only while encoding (T5-XXL of SD3/FLUX: 9 GB)
    offload_text_encoders: bool = False
    num_frames: int | None = (
        None  # video models: clip length (None = the pipeline's default, 16 for AnimateDiff)
    )
    grad_decode_frames: int | None = (
        None  # video reward backprop: decode only this many random frames (VADER)
    )
    # SD3/FLUX/Wan: T5 (UMT5) prompt tokens; None = the pipeline's default (SD3 256, FLUX and Wan 512; the
    # bundled shapes-flow, which has no T5, was trained with 1). Flow-GRPO trains SD3.5 with 128.
    max_sequence_length: int | None = None
    # "fsdp": shard the frozen denoiser across processes with FSDP2 (each keeps 1/N of its weights; the LoRA
    # stays replicated); "none": every process holds all of it. None: "fsdp" when launched with
    # configs/accelerate/fsdp.yaml, else "none".
    shard: Literal["none", "fsdp"] | None = None


@dataclass
class SampleSettings:
    num_steps: int = 50  # denoising steps (DDPO/AlignProp papers: 50 DDIM steps; Flow-GRPO: 10)
    # DDIM eta (1.0 = DDPM-like), or a flow model's noise level a (0 = the ODE; Flow-GRPO 0.7, DanceGRPO 0.3,
    # CPS 0.8); policy-gradient methods need eta > 0
    eta: float = 1.0
    sde: Literal["sde", "dance", "cps"] = "sde"  # flow models: Flow-GRPO's SDE step, DanceGRPO's, or CPS
    guidance_scale: float = 5.0  # classifier-free guidance (DDPO: 5.0); <= 1 disables it
    negative_prompt: str | None = None  # None = the pipeline default ("" for SD, zeros for SDXL)
    height: int | None = None  # None = the model's native size
    width: int | None = None
    batch_size: int = 4  # images per rollout call (per process)
    seed: int = 0
    # Evaluation images (trainer's before/after and eval_every): steps and noise, None = the training ones.
    # Flow-GRPO collects on 10 SDE steps and evaluates on the ODE (eval_eta 0) at 40.
    eval_num_steps: int | None = None
    eval_eta: float | None = None


@dataclass
class LoraSettings:
    rank: int = 4  # LoRA rank (DDPO: 4)
    alpha: float | None = None  # LoRA alpha; None = rank (scale 1)
    dropout: float = 0.0
    target_modules: list[str] | None = None  # None = the model family's (SD: to_q, to_k, to_v, to_out.0)


@dataclass
class RewardSettings:
    name: str = "jpeg_compressibility"  # a registered reward (see `rewards.REWARDS`) or "package.module:attr"
    weight: float = 1.0  # weight in the combined reward
    normalize: bool = False  # standardise by running mean/std before weighting
    args: dict = field(
        default_factory=dict
    )  # passed to the reward's from_pretrained, e.g. {pretrained: /path}


@dataclass
class StrategySettings:
    """Annotation only: `strategy: ddpo` or `strategy: {name: ddpo, ...}` picks the strategy's own config."""

    VARIANTS: ClassVar[dict] = STRATEGY_CONFIGS


@dataclass
class PromptSettings:
    train: str = (
        "shapes_train"  # built-in list (see diffusion_align.prompts), a .txt (one per line) or .jsonl file
    )
    eval: str = "shapes_heldout"  # held-out prompts for evaluation grids and the before/after reward
    eval_count: int = 16  # how many eval prompts to use (the first N)
    eval_images_per_prompt: int = 1  # images per eval prompt, each with its own seed: averages out seed noise


@dataclass
class TrainSettings:
    epochs: int = 100  # collect-then-update rounds
    samples_per_epoch: int = 256  # images collected per epoch, summed over processes (DDPO: 512)
    batch_size: int = 64  # samples per optimizer step, summed over processes (accumulation is derived)
    micro_batch_size: int = 4  # samples per forward/backward per process (memory knob; no effect on math)
    learning_rate: float = 3e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_warmup_steps: int = 0  # linear warm-up in optimizer steps, then constant
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 0  # per-process seeds derive from it; noise never repeats across ranks


@dataclass
class CheckpointSettings:
    every: int = 10  # epochs between checkpoints (and one at the end)
    keep_last: int = 3  # older checkpoints are deleted
    resume: str | None = None  # "latest" (in output_dir) or a checkpoint folder
    export_merged: bool = False  # also save the LoRA merged into a full pipeline at the end
    # also keep, in checkpoints/best/ (never rotated away by keep_last), the checkpoint whose evaluation
    # scored best on guard.gold; guard.json in the run folder records which epoch and value
    keep_best: bool = False


@dataclass
class LoggingSettings:
    tensorboard: bool = True
    wandb: bool = False  # needs the [wandb] extra
    wandb_project: str = "diffusion_align"
    log_every: int = 1  # epochs
    eval_every: int = 10  # epochs between evaluation grids on the eval prompts (0 = only before/after)
    progress: bool = True  # tqdm bars


@dataclass
class GuardSettings:
    """Reward-hacking guards: watch a held-out gold metric beside the optimised proxy at every evaluation."""

    # eval metric to guard with, "extra/<name>" of an eval_rewards entry that is not optimised; None = the
    # first eval reward's (no guard without eval_rewards). Its curve against the proxy: guard_curve.png
    gold: str | None = None
    # early stop when gold stays more than `margin` below its best for this many evaluations in a row while
    # the proxy (the eval "reward") is above its value at gold's best; 0 = never stop early
    patience: int = 0
    margin: float | None = None  # in gold's units; None = noise_multiple x gold's standard error at "before"
    noise_multiple: float = 1.0  # how many standard errors of gold's eval mean make a fall real
    final: Literal["last", "best"] = "last"  # the run's lora/: last weights, or best gold (needs keep_best)
    # CLIP (hub id, folder, or shapes-clip) whose image embeddings measure per-prompt diversity of the eval
    # images (logged as eval "diversity"; needs prompts.eval_images_per_prompt >= 2); None = shapes-clip on
    # the bundled models, none on others; "off" = none
    diversity_model: str | None = None
    collapse_fraction: float = (
        0.5  # warn when diversity falls below this fraction of its value before training
    )


@dataclass
class Config:
    model: ModelSettings = field(default_factory=ModelSettings)
    sample: SampleSettings = field(default_factory=SampleSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    rewards: list[RewardSettings] = field(default_factory=lambda: [RewardSettings()])
    # extra rewards measured on the eval prompts only (not optimised), e.g. a detector of prompt adherence
    eval_rewards: list[RewardSettings] = field(default_factory=list)
    strategy: StrategySettings | None = None  # None for commands that only sample
    prompts: PromptSettings = field(default_factory=PromptSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    guard: GuardSettings = field(default_factory=GuardSettings)
    output_dir: str = "runs/default"  # run folder: config.yaml, checkpoints/, logs/, samples/, lora/


# Allowed values, checked when a config is read (every float must also be finite). Strategy configs are named
# by import path so they are checked without importing every strategy here.
NON_NEGATIVE = Range(0)
add_ranges(ModelSettings, num_frames=at_least(1), grad_decode_frames=at_least(1))
add_ranges(
    SampleSettings,
    num_steps=at_least(1),  # the upper bound (the scheduler's num_train_timesteps) is checked at build time
    eta=Range(0, 1),  # DDIM's eta: 0 deterministic, 1 DDPM-like; above 1 the DDIM mean's sqrt goes negative
    eval_eta=Range(0, 1),
    eval_num_steps=at_least(1),
    guidance_scale=NON_NEGATIVE,
    height=at_least(8),
    width=at_least(8),
    batch_size=at_least(1),
    seed=at_least(0),
)
add_ranges(LoraSettings, rank=at_least(1), alpha=POSITIVE, dropout=PROBABILITY)
add_ranges(RewardSettings, weight=Range())  # any sign, finite
add_ranges(PromptSettings, eval_count=at_least(1), eval_images_per_prompt=at_least(1))
add_ranges(
    TrainSettings,
    epochs=at_least(1),
    samples_per_epoch=at_least(1),
    batch_size=at_least(1),
    micro_batch_size=at_least(1),
    learning_rate=POSITIVE,
    adam_betas=PROBABILITY,
    adam_weight_decay=NON_NEGATIVE,
    adam_epsilon=POSITIVE,
    max_grad_norm=POSITIVE,
    lr_warmup_steps=at_least(0),
    seed=at_least(0),
)
add_ranges(CheckpointSettings, every=at_least(1), keep_last=at_least(1))
add_ranges(LoggingSettings, log_every=at_least(1), eval_every=at_least(0))
add_ranges(
    GuardSettings,
    patience=at_least(0),
    margin=NON_NEGATIVE,
    noise_multiple=NON_NEGATIVE,
    collapse_fraction=NON_NEGATIVE,
)
_STRATEGY_RANGES = {
    "ddpo": dict(
        clip_range=POSITIVE, adv_clip_max=POSITIVE, num_inner_epochs=at_least(1), timestep_fraction=FRACTION,
        timestep_window=FRACTION, group_size=at_least(1), stat_buffer_size=at_least(1),
        stat_min_count=at_least(0), beta=NON_NEGATIVE,
    ),
    "d3po": dict(
        beta=POSITIVE, eps=NON_NEGATIVE, num_inner_epochs=at_least(1), timestep_fraction=FRACTION,
        kl_beta=NON_NEGATIVE,
    ),
    "prdp": dict(
        group_size=at_least(2), beta=POSITIVE, eps=POSITIVE,
        timestep_window=FRACTION, num_inner_epochs=at_least(1), kl_beta=NON_NEGATIVE,
    ),
    "alignprop": dict(
        truncation_std=NON_NEGATIVE, truncation_low=at_least(0), truncation_high=at_least(1),
        truncation_fixed=at_least(0), loss_scale=Range(), kl_beta=NON_NEGATIVE, balance_ema=PROBABILITY,
    ),
    "draft": dict(
        k=at_least(0), lv_draws=at_least(0), loss_scale=Range(), kl_beta=NON_NEGATIVE,
        balance_ema=PROBABILITY,
    ),
    "diffusion_dpo": dict(
        beta=POSITIVE, group_size=at_least(2), ref_update_every=at_least(0),
        empty_prompt_fraction=PROBABILITY, num_inner_epochs=at_least(1), noise_draws=at_least(1),
        sft_weight=NON_NEGATIVE,
    ),
    "reward_sft": dict(group_size=at_least(1), keep_fraction=FRACTION, num_inner_epochs=at_least(1)),
}  # fmt: skip
for _name, _ranges in _STRATEGY_RANGES.items():
    add_ranges(STRATEGY_CONFIGS[_name], **_ranges)


def check_num_steps(num_steps: int, scheduler, key: str = "sample.num_steps") -> None:
    """One-line error unless 1 <= num_steps <= the scheduler's training timesteps (known only once the
    model is loaded, hence not a config-time check)."""
    limit = int(getattr(scheduler.config, "num_train_timesteps", 0) or 0) or None
    allowed = Range(1, limit, integer=True)
    if not allowed.allows(num_steps):
        raise ConfigError(
            f"{key}={num_steps} must be {allowed.describe()}"
            + (" (the scheduler's num_train_timesteps)" if limit else "")
        )
