"""`diffusion-align COMMAND ...`: one module per command under `diffusion_align.commands`.

Each command module defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from diffusion_align.errors import UserError

# command name -> module under diffusion_align.commands
COMMANDS = {
    "sample": "sample",
    "train": "train",
    "train-artifact-head": "train_artifact_head",
    "score": "score",
    "zoo": "zoo",
    "reno": "reno",
    "pairs": "pairs",
    "soup": "soup",
    "plan": "plan",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusion-align", description="Reward fine-tuning and scoring for diffusion models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"diffusion_align.commands.{module_name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (UserError,)
    try:
        from rewards.errors import RewardError

        errors += (RewardError,)
    except ImportError:
        pass
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "train" and not any(e.startswith("-") for e in extra):
        args.overrides += extra  # `train CONFIG --overwrite key=value`: overrides after an option
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args._run(args) or 0)
    except _user_errors() as e:
        print(f"diffusion-align {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
