"""`diffusion-align score PATH... --reward NAME[=WEIGHT]`: score image and video files with rewards.

One output row per file (JSONL, or CSV when --output ends in .csv), then a summary table. Bad files are
reported by path and skipped; the exit status is 1 when any file failed.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from diffusion_align.commands.score_batches import MAX_CHUNK_VALUES, decode_side, score_batch
from diffusion_align.commands.score_inputs import (
    parse_frames,
    parse_reward_args,
    parse_reward_specs,
    read_prompt_file,
    resolve_prompt,
)
from diffusion_align.errors import UserError

HELP = "Score image/video files and folders with one or more rewards; write one row per file."

_EPILOG = """\
`sample` output folders: a folder holding images.jsonl (what `sample` writes) contributes exactly the
files it lists, with their prompts; nothing else under it is scored (not grid.png).

prompts, per file, first match wins:
  1. its entry in --prompts FILE (lines "NAME<TAB>prompt", or JSONL rows {"file": NAME, "prompt": ...};
     NAME may be the path as given, the file name, the file name without extension, or a path relative
     to the prompts file's folder, so `--prompts OUT/images.jsonl` works)
  2. its row in the images.jsonl of a `sample` folder it was found through
  3. a sidecar text file next to it with the same stem (cat.png -> cat.txt)
  4. --prompt TEXT
  5. the empty prompt (a warning says how many files got it)

output: -o FILE (.jsonl, or .csv) or -o FOLDER/ (writes FOLDER/scores.jsonl); never one of the inputs.
Each row is written and flushed as soon as its file is scored, so an interrupted run keeps what it
scored; --resume keeps the rows already in the output and scores only the files missing from it.

memory and batching: files are loaded a few at a time (at most 4 batches and about 64M pixel values per
chunk) and grouped by exact pixel shape. When every reward resizes to a known side first (CLIP-type
rewards: `image_size`), a file whose shorter side is at least 8x that side is decoded reduced by an
integer factor (area average; JPEG decodes at 1/2-1/8 scale) keeping the shorter side >= 4x the
reward's; smaller files are scored from their stored pixels exactly. Size-sensitive rewards such as
jpeg_compressibility always see the stored pixels. Videos (mp4, mov, webm, mkv, avi; gif with more than
one frame) are scored frame-wise with the image reward lifted by rewards.per_frame (--frames) and
--max-frames evenly spaced frames at most.

examples:
  diffusion-align score out/ --reward jpeg_compressibility -o scores.jsonl
  diffusion-align score a.png clip.mp4 --prompt "a cat" --reward clip=1 --reward aesthetic=0.5 \\
      --reward-arg clip.pretrained=/models/clip-vit-large-patch14 -o scores.csv
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EPILOG
    parser.add_argument("paths", nargs="+", help="image/video files and folders (searched recursively)")
    parser.add_argument(
        "--reward",
        action="append",
        required=True,
        metavar="NAME[=WEIGHT]",
        help=(
            "a reward from rewards.REWARDS or package.module:Class (imports and runs that code); "
            "repeat for several (weight default 1)"
        ),
    )
    parser.add_argument(
        "--reward-arg",
        action="append",
        default=[],
        metavar="NAME.KEY=VALUE",
        help="argument for a reward's loader, e.g. clip.pretrained=/path/to/dir (repeatable)",
    )
    parser.add_argument("--prompt", help="prompt for files without a --prompts entry or sidecar .txt")
    parser.add_argument("--prompts", metavar="FILE", help="per-file prompts (see below)")
    parser.add_argument(
        "-o",
        "--output",
        metavar="FILE|DIR/",
        help="rows as .jsonl or .csv, or a folder (gets scores.jsonl); default: JSONL on stdout",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows already in -o and score only the files not in it (after an interrupted run)",
    )
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="files per reward call (default 8)")
    parser.add_argument(
        "--frames",
        default="all",
        metavar="SELECTION",
        help="video frames to score: all, fml (first/middle/last), random:K, segments:K (default all)",
    )
    parser.add_argument(
        "--max-frames", type=int, default=64, help="frames decoded per video at most (default 64)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for random frame selection")


# ---------------------------------------------------------------------------------------------------
# Output


def summary_table(columns: list[str], values: dict[str, list[float]], weights: dict[str, float]) -> str:
    header = f"{'reward':<24} {'weight':>7} {'n':>6} {'mean':>10} {'std':>10} {'min':>10} {'max':>10}"
    lines = [header, "-" * len(header)]
    for name in columns:
        v = values[name]
        w = f"{weights[name]:g}" if name in weights else ""
        if not v:
            lines.append(f"{name:<24} {w:>7} {0:>6}")
            continue
        mean = sum(v) / len(v)
        std = math.sqrt(sum((x - mean) ** 2 for x in v) / len(v))
        lines.append(
            f"{name:<24} {w:>7} {len(v):>6} {mean:>10.4f} {std:>10.4f} {min(v):>10.4f} {max(v):>10.4f}"
        )
    return "\n".join(lines)


def lift_to_video(reward, spec: str, generator):
    """The image reward applied to selected frames of `(B, T, 3, H, W)` videos (rewards.per_frame)."""
    import rewards

    mode, k = parse_frames(spec)
    return rewards.per_frame(reward, mode, k=k, generator=generator)


# ---------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    import rewards
    from diffusion_align.bundled import resolve_reward_args
    from diffusion_align.commands.score_files import RowWriter, expand_inputs, output_path
    from rewards.io import LoadFailure, group_by_shape, iter_loaded

    if args.batch_size < 1:
        raise UserError(f"--batch-size={args.batch_size} must be at least 1")
    if args.max_frames < 1:
        raise UserError(f"--max-frames={args.max_frames} must be at least 1")
    if args.resume and not args.output:
        raise UserError("--resume needs -o FILE (the output of the interrupted run)")
    parse_frames(args.frames)  # fail on a bad --frames before loading any model
    specs = parse_reward_specs(args.reward)
    names = [n for n, _ in specs]
    weights = dict(specs)
    reward_args = parse_reward_args(args.reward_arg, names)
    table = read_prompt_file(args.prompts) if args.prompts else {}
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )

    files, indexed, failures, indexes = expand_inputs(args.paths)
    for f in failures:
        print(f"{f.path}: {f.reason}", file=sys.stderr)
    if not files:
        raise UserError(f"no image or video files found in {' '.join(args.paths)}")
    read_too = [Path(p) for p in [*args.paths, args.prompts] if p and Path(p).is_file()] + indexes
    out_path = output_path(args.output, files, read_too)

    columns = ["path", "type", "prompt", *names, "total"]
    writer = RowWriter(out_path, columns, resume=args.resume)
    values: dict[str, list[float]] = {c: [float(r[c]) for r in writer.done] for c in [*names, "total"]}
    if writer.done:
        done = writer.scored_paths()
        files = [f for f in files if f.resolve() not in done]
        print(f"--resume: {len(writer.done)} row(s) kept, {len(files)} file(s) to score", file=sys.stderr)

    image_rewards = {n: rewards.build(n, **resolve_reward_args(reward_args[n])).to(device) for n in names}
    image_reward = rewards.Combined(image_rewards, weights)
    video_reward = None  # built on first video: the per-frame lifting of each image reward
    gen = torch.Generator().manual_seed(args.seed)
    side = decode_side(list(image_rewards.values()))
    n_unprompted = 0
    complete = False
    try:
        with tqdm(total=len(files), unit="file", desc="scoring", disable=None, file=sys.stderr) as bar:
            # a few batches per chunk so same-shape files share a batch; few pixels alive at once
            chunks = iter_loaded(files, 4 * args.batch_size, MAX_CHUNK_VALUES, args.max_frames, side)
            for media, bad, consumed in chunks:
                # a comprehension: no loop variable keeps a file's pixels alive into the next chunk
                found = [resolve_prompt(m.path, table, args.prompt, indexed) for m in media]
                n_unprompted += sum(p is None for p in found)
                prompts = [p or "" for p in found]
                rows: dict[int, dict] = {}
                for batch in group_by_shape(media, args.batch_size):
                    is_video = media[batch[0]].is_video
                    if is_video and video_reward is None:
                        lifted = {n: lift_to_video(r, args.frames, gen) for n, r in image_rewards.items()}
                        video_reward = rewards.Combined(lifted, weights)
                    scorer = video_reward if is_video else image_reward
                    # one file: a view, not a copy (a huge image is not held twice)
                    pixels = (
                        media[batch[0]].pixels[None]
                        if len(batch) == 1
                        else torch.stack([media[i].pixels for i in batch])
                    ).to(device)
                    scored = score_batch(scorer, pixels, [prompts[i] for i in batch])
                    del pixels
                    for i, result in zip(batch, scored, strict=True):
                        if isinstance(result, str):
                            bad.append(LoadFailure(media[i].path, result))
                        else:
                            kind = "video" if is_video else "image"
                            rows[i] = {
                                "path": str(media[i].path),
                                "type": kind,
                                "prompt": prompts[i],
                                **result,
                            }
                            writer.write(rows[i])  # as soon as it is scored
                for i in sorted(rows):
                    for c in values:
                        values[c].append(rows[i][c])
                for f in bad:
                    tqdm.write(f"{f.path}: {f.reason}", file=sys.stderr)  # keeps the bar intact
                failures += bad
                del media
                bar.update(consumed)
        complete = True
    finally:
        writer.close()
        if not complete and out_path is not None:
            print(
                f"interrupted: rows scored so far are in {out_path}; rerun with --resume to score the rest",
                file=sys.stderr,
            )

    out = sys.stdout if args.output else sys.stderr
    if n_unprompted:
        print(
            f"warning: {n_unprompted} file(s) had no prompt and were scored with the empty prompt",
            file=sys.stderr,
        )
    print(summary_table([*names, "total"], values, weights), file=out)
    n_ok = len(values["total"])
    if out_path is not None:
        print(f"wrote {n_ok} row(s) to {out_path}", file=out)
    if failures:
        print(f"{len(failures)} of {n_ok + len(failures)} file(s) failed (listed above)", file=sys.stderr)
        return 1
    return 0
