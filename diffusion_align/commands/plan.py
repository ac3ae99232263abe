"""`diffusion-align plan CONFIG --gpus N [--gpu-memory 80GB] [--sharding none|fsdp]`: will this run fit?

The configured models are built on the meta device from their config files (no weights read or downloaded);
the byte accounting is `engine.memory.plan`. This file only turns the training config into its plain inputs.
"""

from __future__ import annotations

import argparse

HELP = "Per-GPU memory of a training config (weights, LoRA, gradients, optimizer, activation estimate)."

_EPILOG = """\
examples:
  diffusion-align plan configs/quickstart.yaml
  diffusion-align plan configs/ddpo_sd15_aesthetic.yaml --gpus 8 --gpu-memory 24GB
  diffusion-align plan configs/dancegrpo_flux_hpsv21.yaml --gpus 2 --gpu-memory 24GB --sharding fsdp

Only the config files of the models are read (from a local pipeline folder, or fetched from the hub or
its cache). GB means GiB, as GPU memory is quoted. Activations are an estimate scaled from a profile
measured on a tiny model of the same family (benchmarks/measure_activations.py); the output says how.
"""

# strategies whose training forward is the plain conditional denoiser (no classifier-free guidance batch)
NO_CFG_STRATEGIES = ("DiffusionDPOConfig", "RewardSFTConfig")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EPILOG
    parser.add_argument("config", help="a training config (YAML)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for train")
    parser.add_argument("--gpus", type=int, default=1, help="processes (GPUs) the run uses (default 1)")
    parser.add_argument("--gpu-memory", default="80GB", help="memory of one GPU (default 80GB)")
    parser.add_argument(
        "--sharding",
        choices=("none", "fsdp"),
        default=None,
        help="fsdp: the frozen denoiser split over GPUs (default: the config's model.shard)",
    )


def run(args) -> int:
    from diffusion_align.config import load_config
    from diffusion_align.engine.memory.plan import format_plan, parse_bytes, plan_memory

    config = load_config(args.config, args.overrides)
    sharding = args.sharding or config.model.shard or "none"
    plan = plan_memory(plan_inputs(config, args.gpus, parse_bytes(args.gpu_memory), sharding))
    print(format_plan(plan))
    return 0


def plan_inputs(config, gpus: int, gpu_memory: int, sharding: str):
    from diffusion_align.engine.memory.plan import PlanInputs

    m, s, strategy = config.model, config.sample, config.strategy
    strategy_name = type(strategy).__name__
    kept, checkpointed = 1, m.gradient_checkpointing
    if hasattr(strategy, "k") or hasattr(strategy, "truncation"):  # reward backprop through a window
        kept = _window(strategy, s.num_steps)
        if strategy.gradient_checkpointing:  # each denoiser call recomputed in backward: one at a time
            kept = 1
    return PlanInputs(
        pretrained=m.pretrained,
        revision=m.revision,
        dtype=m.dtype,
        mixed_precision=config.train.mixed_precision,
        lora_rank=config.lora.rank,
        lora_alpha=config.lora.alpha,
        lora_targets=config.lora.target_modules,
        gpus=gpus,
        sharding=sharding,
        gpu_memory=gpu_memory,
        size=(s.height, s.width) if s.height and s.width else None,
        micro_batch=config.train.micro_batch_size,
        cfg=s.guidance_scale > 1.0 and strategy_name not in NO_CFG_STRATEGIES,
        kept_steps=kept,
        gradient_checkpointing=checkpointed,
        offload_text_encoders=m.offload_text_encoders,
        max_sequence_length=m.max_sequence_length,
    )


def _window(strategy, num_steps: int) -> int:
    """Denoiser calls a reward-backprop strategy differentiates: DRaFT-K's k (0: all), AlignProp's steps after
    its cut (the fixed one, or the mean of the drawn one)."""
    if hasattr(strategy, "k"):
        return strategy.k or num_steps
    cut = strategy.truncation_fixed if strategy.truncation == "fixed" else round(strategy.truncation_mean)
    return max(1, num_steps - min(cut, num_steps - 1))
