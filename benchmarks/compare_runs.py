"""Held-out before -> after of finished runs side by side, one row per run, one column per eval metric.

    python benchmarks/compare_runs.py runs/guards/ddpo_color_count* --metrics extra/shapes_color \
        extra/shapes_count extra/shapes_match diversity

Reads each run folder's summary.json (`eval_before_components` / `eval_after_components`) and prints a
Markdown table (`--out FILE` also writes it), with the run's seed and epochs; a kept best-gold checkpoint
(guard.json) adds its row. Nothing is recomputed here: the numbers are the runs' own held-out evaluations.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def rows(run: Path, metrics: list[str]) -> list[str]:
    summary = json.loads((run / "summary.json").read_text())
    config = yaml.safe_load((run / "config.yaml").read_text())
    before, after = summary["eval_before_components"], summary["eval_after_components"]
    name = f"{run.name} (seed {config['train']['seed']}, {summary['epochs']} epochs)"
    cells = [f"{before.get(m, float('nan')):.3f} → {after.get(m, float('nan')):.3f}" for m in metrics]
    out = [f"| {name} | " + " | ".join(cells) + " |"]
    guard = run / "guard.json"
    best = json.loads(guard.read_text()).get("best") if guard.is_file() else None
    if best and (run / "checkpoints" / "best").is_dir():
        kept = [f"{best['eval'].get(m, float('nan')):.3f}" for m in metrics]
        out.append(f"| ↳ kept best-gold checkpoint (epoch {best['epoch']}) | " + " | ".join(kept) + " |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--metrics", nargs="+", required=True, help="eval keys, e.g. extra/shapes_match")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    lines = ["| run | " + " | ".join(args.metrics) + " |", "|---" * (len(args.metrics) + 1) + "|"]
    for run in args.runs:
        lines += rows(run, args.metrics)
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
