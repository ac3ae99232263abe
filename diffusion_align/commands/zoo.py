"""`diffusion-align zoo build|eval shapes|shapes-flow`: re-create or measure the bundled shapes models."""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

from diffusion_align.errors import UserError

HELP = "Build (train from scratch) or evaluate the bundled models of the synthetic shapes world."
WORLDS = ("shapes", "shapes-flow")


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    b = sub.add_parser(
        "build",
        help="shapes: generate the data and train VAE, CLIP and UNet (about 50 min on 2 cores); shapes-flow: "
        "train an SD3-style transformer around the shapes VAE and CLIP (about 30 min)",
    )
    b.add_argument("world", choices=WORLDS)
    b.add_argument(
        "--out",
        required=True,
        help="folder that receives pipeline/, data.json, train_log.jsonl (shapes also clip/ and prompts/)",
    )
    b.add_argument(
        "--shapes",
        default=None,
        help="shapes-flow: the `zoo build shapes` folder whose VAE and CLIP it reuses (default: the bundled)",
    )
    b.add_argument("--steps", type=int, default=None, help="shapes-flow: training steps (default: recipe's)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--minutes", type=float, default=60.0, help="safety cap on wall time (default 60)")
    b.add_argument("--threads", type=int, default=2, help="torch CPU threads (results depend on it)")
    e = sub.add_parser("eval", help="CLIP retrieval and prompt adherence report with a sample grid")
    e.add_argument("world", choices=WORLDS)
    e.add_argument("--pipeline", default=None, help="pipeline folder (default: the bundled `shapes`)")
    e.add_argument("--clip", default=None, help="CLIP folder (default: the bundled `shapes-clip`)")
    e.add_argument("--out", default="samples/shapes_base", help="folder for metrics.json and the grids")
    e.add_argument("--prompts", type=int, default=64, help="held-out prompts to generate for")
    e.add_argument(
        "--steps", type=int, default=None, help="sampling steps (default: shapes 50, shapes-flow 40)"
    )
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--card", default=None, help="a data.json to record the metrics in (e.g. the bundled one)")


def _command_line() -> str:
    return "diffusion-align " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def run(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    if args.action == "build":
        return _build_flow(args) if args.world == "shapes-flow" else _build_shapes(args)
    return _eval(args)


def _build_shapes(args) -> int:
    from diffusion_align.zoo.shapes_card import write_card, write_prompt_lists
    from diffusion_align.zoo.shapes_recipe import RecipeConfig, build

    cfg = RecipeConfig(seed=args.seed, minutes=args.minutes, threads=args.threads)
    times = build(args.out, cfg)
    write_card(Path(args.out) / "data.json", recipe=asdict(cfg), seconds=times, command=_command_line())
    write_prompt_lists(Path(args.out))
    print(json.dumps({k: round(v, 1) for k, v in times.items()}))
    return 0


def _build_flow(args) -> int:
    from diffusion_align.bundled import SHAPES
    from diffusion_align.zoo.shapes_card import write_card
    from diffusion_align.zoo.shapes_flow_recipe import FlowRecipeConfig, build

    shapes = Path(args.shapes) if args.shapes else SHAPES
    for part in ("pipeline/vae", "clip"):
        if not (shapes / part).is_dir():
            raise UserError(
                f"shapes-flow reuses the shapes VAE and CLIP but {shapes / part} is missing; pass --shapes "
                "with a folder written by `diffusion-align zoo build shapes --out FOLDER`"
            )
    cfg = FlowRecipeConfig(seed=args.seed, minutes=args.minutes, threads=args.threads)
    if args.steps is not None:
        cfg.steps = args.steps
    times = build(args.out, shapes, cfg)
    write_card(Path(args.out) / "data.json", recipe=asdict(cfg), seconds=times, command=_command_line())
    print(json.dumps({k: round(v, 1) for k, v in times.items()}))
    return 0


def _eval(args) -> int:
    from diffusion_align.bundled import bundled_path
    from diffusion_align.zoo.shapes_card import write_card
    from diffusion_align.zoo.shapes_eval import evaluate, evaluate_flow

    pipeline = Path(args.pipeline) if args.pipeline else bundled_path(args.world)
    clip = Path(args.clip) if args.clip else bundled_path("shapes-clip")
    for p in (pipeline, clip) if args.world == "shapes" else (pipeline,):  # shapes-flow's eval needs no CLIP
        if not p.is_dir():
            raise UserError(
                f"{p} is not a folder; pass --pipeline/--clip folders written by `zoo build {args.world}`"
            )
    if args.world == "shapes-flow":
        metrics = evaluate_flow(pipeline, args.out, n_prompts=args.prompts, steps=args.steps or 40)
    else:
        metrics = evaluate(pipeline, clip, args.out, n_prompts=args.prompts, steps=args.steps or 50)
        print(json.dumps(metrics["clip_retrieval"]["heldout"], indent=1))
    out = Path(args.out)
    (out / "command.txt").write_text(
        f"{_command_line()}\n# pipeline: {os.path.relpath(pipeline)}\n# clip: {os.path.relpath(clip)}\n"
        f"# torch threads: {args.threads}\n"
    )
    if args.card:
        write_card(Path(args.card), metrics=metrics)
    print(json.dumps(metrics["adherence_heldout"], indent=1))
    return 0
