"""`diffusion-align zoo build|eval shapes`: re-create or measure the bundled shapes models."""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

from diffusion_align.errors import UserError

HELP = "Build (train from scratch) or evaluate the bundled models of the synthetic shapes world."
WORLDS = ("shapes",)


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    b = sub.add_parser(
        "build", help="generate the data and train VAE, CLIP and UNet (about 40 min on 2 cores)"
    )
    b.add_argument("world", choices=WORLDS)
    b.add_argument(
        "--out",
        required=True,
        help="folder that receives pipeline/, clip/, prompts/, data.json, train_log.jsonl",
    )
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--minutes", type=float, default=60.0, help="safety cap on wall time (default 60)")
    b.add_argument("--threads", type=int, default=2, help="torch CPU threads (results depend on it)")
    e = sub.add_parser("eval", help="CLIP retrieval and prompt adherence report with a sample grid")
    e.add_argument("world", choices=WORLDS)
    e.add_argument("--pipeline", default=None, help="pipeline folder (default: the bundled `shapes`)")
    e.add_argument("--clip", default=None, help="CLIP folder (default: the bundled `shapes-clip`)")
    e.add_argument("--out", default="samples/shapes_base", help="folder for metrics.json and the grids")
    e.add_argument("--prompts", type=int, default=64, help="held-out prompts to generate for")
    e.add_argument("--steps", type=int, default=50, help="DDIM steps")
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--card", default=None, help="a data.json to record the metrics in (e.g. the bundled one)")


def _command_line() -> str:
    return "diffusion-align " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def run(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    if args.action == "build":
        from diffusion_align.zoo.shapes_card import write_card, write_prompt_lists
        from diffusion_align.zoo.shapes_recipe import RecipeConfig, build

        cfg = RecipeConfig(seed=args.seed, minutes=args.minutes, threads=args.threads)
        times = build(args.out, cfg)
        write_card(Path(args.out) / "data.json", recipe=asdict(cfg), seconds=times, command=_command_line())
        write_prompt_lists(Path(args.out))
        print(json.dumps({k: round(v, 1) for k, v in times.items()}))
        return 0

    from diffusion_align.bundled import bundled_path
    from diffusion_align.zoo.shapes_eval import evaluate

    pipeline = Path(args.pipeline) if args.pipeline else bundled_path("shapes")
    clip = Path(args.clip) if args.clip else bundled_path("shapes-clip")
    for p in (pipeline, clip):
        if not p.is_dir():
            raise UserError(
                f"{p} is not a folder; pass --pipeline/--clip folders written by `zoo build shapes`"
            )
    metrics = evaluate(pipeline, clip, args.out, n_prompts=args.prompts, steps=args.steps)
    out = Path(args.out)
    (out / "command.txt").write_text(
        f"{_command_line()}\n# pipeline: {os.path.relpath(pipeline)}\n# clip: {os.path.relpath(clip)}\n"
        f"# torch threads: {args.threads}\n"
    )
    if args.card:
        from diffusion_align.zoo.shapes_card import write_card

        write_card(Path(args.card), metrics=metrics)
    print(json.dumps(metrics["clip_retrieval"]["heldout"], indent=1))
    print(json.dumps(metrics["adherence_heldout"], indent=1))
    return 0
