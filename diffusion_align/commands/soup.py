"""`diffusion-align soup A B [C ...] --weights w1 w2 ... -o OUT`: one LoRA whose weight change is the
weighted sum of the adapters' (rewarded soups; how: `engine.lora_soup`). With `--sweep N` it evaluates a grid
of weights on held-out prompts instead (`soup_sweep`): a table and the front of two or three rewards."""

from __future__ import annotations

import argparse

from diffusion_align.errors import UserError

HELP = "Mix LoRAs trained on different rewards into one (a weighted sum of their deltas), or sweep the mix."

_EPILOG = """\
examples:
  diffusion-align soup runs/colour/lora runs/count/lora --weights 0.5 0.5 -o soups/half
  diffusion-align soup runs/colour/lora runs/count/lora --sweep 5 --prompts shapes_heldout \\
      --rewards shapes_color shapes_count --config configs/quickstart.yaml -o soups/sweep

The soup stacks the adapters' ranks (rank = the sum of theirs) so that it applies exactly
sum_i w_i * B_i A_i, not the product of averaged A and B matrices. --sweep N tries N weights per edge of
the simplex (for two adapters: w, 1 - w for w in 0, 1/(N-1), ..., 1) and writes OUT/sweep.csv,
OUT/sweep.json, OUT/front.png, each mix in OUT/soups/ and its images in OUT/grids/.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EPILOG
    parser.add_argument("adapters", nargs="+", metavar="LORA", help="LoRA folders (a run's lora/)")
    parser.add_argument("--weights", nargs="+", type=float, help="one weight per LoRA (any sign)")
    parser.add_argument("-o", "--out", required=True, help="the soup's folder (with --sweep: the results')")
    parser.add_argument(
        "--sweep", type=int, metavar="N", help="evaluate a grid of N weights per simplex edge"
    )
    parser.add_argument("--prompts", help="--sweep: prompt list (built-in name, .txt or .jsonl)")
    parser.add_argument(
        "--count",
        type=int,
        default=16,
        help="--sweep: the first COUNT prompts (default 16), each drawn prompts.eval_images_per_prompt times",
    )
    parser.add_argument(
        "--rewards",
        nargs="+",
        metavar="REWARD",
        help="--sweep: 2 or 3 registered rewards (with the args the --config gives them)",
    )
    parser.add_argument("--model", help="--sweep: base model (default: the one the LoRAs record)")
    parser.add_argument("--config", help="--sweep: a YAML config for the model and sampling settings")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    if len(args.adapters) < 2:
        raise UserError(f"soup: give at least two LoRA folders, got {len(args.adapters)}")
    if args.sweep is None:
        if args.weights is None:
            raise UserError("soup: give --weights (one per LoRA), or --sweep N to evaluate a grid of them")
        from diffusion_align.engine.lora_soup import write_soup

        out = write_soup(args.adapters, args.weights, args.out)
        print(f"wrote the soup of {len(args.adapters)} LoRAs ({' '.join(map(str, args.weights))}) to {out}")
        return 0
    if args.weights is not None:
        raise UserError("soup: --weights and --sweep exclude each other (the sweep chooses the weights)")
    from diffusion_align.commands.soup_sweep import sweep

    rows = sweep(args)
    print(f"evaluated {len(rows)} mixes; wrote {args.out}/sweep.csv, sweep.json and front.png")
    return 0
