"""Held-out reward against sampled images and against training wall time, several CPU recipes side by side.

    OMP_NUM_THREADS=1 python benchmarks/learning_curves.py configs/cpu/flow_grpo_shapes_flow.yaml \
        configs/cpu/flow_grpo_fast_shapes_flow.yaml configs/cpu/nft_shapes_flow.yaml \
        --seeds 0 1 2 --eval-every 4 --out benchmarks/results/shapes_flow_curves

Each recipe runs once per `train.seed`, evaluated every `--eval-every` epochs on its held-out prompts (fixed
eval seeds) with the never-optimised detector (`shapes_color`) beside the optimised reward. Wall time counts
the training epochs (collect + update, `time/epoch_seconds`), not the evaluations, on this machine: compare
recipes within one run of this script, not across machines. Writes `curves.json`, `curves.png` (reward vs
images and vs seconds, mean over seeds with every seed drawn thin) and `table.md` (every seed's numbers).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

DETECTOR = "eval_rewards=[{name: shapes_color}]"


def run_recipe(recipe: Path, seed: int, eval_every: int, out: Path) -> list[dict]:
    """One training run; its evaluation points as [{epoch, images, seconds, reward, detector}]."""
    from diffusion_align.builder import train
    from diffusion_align.config import load_config

    overrides = [
        "logging.progress=false", "logging.tensorboard=false", "checkpoint.every=1000", DETECTOR,
        f"logging.eval_every={eval_every}", f"train.seed={seed}", f"output_dir={out}",
    ]  # fmt: skip
    config = load_config(recipe, overrides)
    summary = train(config)
    per_epoch = config.train.samples_per_epoch
    before = summary["eval_before_components"]
    points = [
        dict(epoch=0, images=0, seconds=0.0, reward=before["reward"], detector=before["extra/shapes_color"])
    ]
    if getattr(config.strategy, "pairs", None) == "offline":  # its images were sampled before training
        points[0]["offline"] = True
    seconds = 0.0
    for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        seconds += record.get("time/epoch_seconds", 0.0)
        if "eval/reward" in record:
            points.append(
                dict(
                    epoch=record["epoch"],
                    images=record["epoch"] * per_epoch,
                    seconds=round(seconds, 1),
                    reward=record["eval/reward"],
                    detector=record["eval/extra/shapes_color"],
                )
            )
    return points


def _offline(runs: dict[int, list[dict]]) -> bool:
    """Offline preference recipes sample no images while training: their x is the pair images read."""
    return any(points[0].get("offline") for points in runs.values())


def plot(curves: dict[str, dict[int, list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, runs) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        for ax, x in zip(axes, ("images", "seconds"), strict=True):
            for points in runs.values():
                ax.plot([p[x] for p in points], [p["reward"] for p in points], color=color, alpha=0.3, lw=0.8)
            mean_x = np.mean([[p[x] for p in points] for points in runs.values()], axis=0)
            mean_y = np.mean([[p["reward"] for p in points] for points in runs.values()], axis=0)
            read = ", x: pair images read" if _offline(runs) else ""
            ax.plot(mean_x, mean_y, "o-", color=color, label=f"{name} (mean of {len(runs)} seeds{read})")
    axes[0].set_xlabel("images sampled for training")
    axes[1].set_xlabel("training wall time (s, evaluations excluded)")
    axes[0].set_ylabel("held-out reward (fixed eval seeds)")
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(curves: dict[str, dict[int, list[dict]]]) -> str:
    lines = [
        "| recipe | seed | reward before -> after | detector before -> after | images | train seconds |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in curves.items():
        read = " read" if _offline(runs) else ""
        for seed, points in runs.items():
            a, b = points[0], points[-1]
            lines.append(
                f"| {name} | {seed} | {a['reward']:.3f} -> {b['reward']:.3f} | "
                f"{a['detector']:.3f} -> {b['detector']:.3f} | {b['images']}{read} | {b['seconds']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipes", nargs="+", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/learning_curves"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    curves: dict[str, dict[int, list[dict]]] = {}
    for recipe in args.recipes:
        for seed in args.seeds:
            points = run_recipe(
                recipe, seed, args.eval_every, args.out / "runs" / f"{recipe.stem}_seed{seed}"
            )
            curves.setdefault(recipe.stem, {})[seed] = points
            print(recipe.stem, seed, json.dumps(points[-1]), flush=True)
            (args.out / "curves.json").write_text(json.dumps(curves, indent=1))
    plot(curves, args.out / "curves.png")
    (args.out / "table.md").write_text(table(curves))
    print(table(curves))


if __name__ == "__main__":
    main()
