"""`diffusion-align train CONFIG [key=value ...]`: reward fine-tuning with the configured strategy.

Also runs under accelerate: `accelerate launch [--config_file configs/accelerate/ddp.yaml] -m diffusion_align
train CONFIG ...`; the global batch sizes in the config stay the same whatever the number of processes.
"""

from __future__ import annotations

import argparse
import json

from diffusion_align.errors import UserError

HELP = (
    "Fine-tune a diffusion model's LoRA on a reward or preference pairs (DDPO, Flow-GRPO, DiffusionNFT, "
    "D3PO, AlignProp, DRaFT, PRDP, Diffusion-DPO, reward-filtered SFT)."
)

_EPILOG = """\
examples:
  diffusion-align train configs/quickstart.yaml
  diffusion-align train configs/quickstart.yaml train.epochs=5 output_dir=runs/try
  diffusion-align train runs/try/config.yaml checkpoint.resume=latest
  diffusion-align train configs/quickstart.yaml --overwrite          # start runs/quickstart over
  accelerate launch --config_file configs/accelerate/ddp.yaml -m diffusion_align train configs/quickstart.yaml

Writes into output_dir: config.yaml, metrics.jsonl, logs/ (TensorBoard), samples/before.png and after.png,
reward_curve.png, lora/ (loads with diffusers' load_lora_weights), checkpoints/, summary.json,
config_history.jsonl (every start and resume, with the config changes it accepted).

One run per folder: a non-empty output_dir is refused unless the run resumes from a checkpoint in it
(checkpoint.resume=latest) or --overwrite is given. Nothing is written before the config is valid.
Resume uses the newest intact checkpoint (a damaged one is skipped with a warning). It refuses changes
that alter the math (model weights and dtype, sampling, lora, rewards, strategy, prompts.train, optimizer,
seeds), naming them; epochs, logging, evaluation, checkpoint cadence and memory knobs may change.

A config is code: a reward or strategy named 'package.module:attr' imports and runs that module, so only
train configs you trust. The file of every such component is listed in custom_components.json.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EPILOG
    parser.add_argument("config", help="a YAML config (see configs/)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=5"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a non-empty output_dir: once the config is valid, delete its run artifacts "
        "(checkpoints/, metrics.jsonl, logs/, samples/, lora/, ...); a file a run does not write is never "
        "deleted (the run is refused instead)",
    )


def run(args) -> int:
    from diffusion_align.builder import train
    from diffusion_align.config import load_config

    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise UserError(f"expected key=value overrides after the config file, got {bad[0]!r}")
    config = load_config(args.config, args.overrides)
    summary = train(config, overwrite=args.overwrite)
    if summary.get("lora_dir"):  # the main process
        keep = ("eval_before", "eval_after", "epochs", "seconds", "run_dir")
        print(json.dumps({k: summary[k] for k in keep}, indent=1))
    return 0
