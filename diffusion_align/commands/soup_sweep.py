"""`soup --sweep N`: soups on a grid of weights, each loaded with diffusers' `load_lora_weights` and evaluated
like the trainer's evaluation (`training.evaluation`: fixed seeds, raw rewards) on held-out prompts.

Writes OUT/sweep.csv and OUT/sweep.json (one row per mix: its weights, each reward's mean, whether it is on
the Pareto front of the rewards) and OUT/front.png (two rewards: one panel; three: the three pairs).
"""

from __future__ import annotations

import csv
import itertools
import json
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

from diffusion_align.errors import UserError


def simplex_grid(adapters: int, n: int) -> list[tuple[float, ...]]:
    """Every weight vector of `adapters` non-negative multiples of 1/(n-1) summing to 1, the first adapter's
    weight descending: for two adapters (1, 0), ..., (0, 1)."""
    steps = n - 1
    grid = [c for c in itertools.product(range(steps, -1, -1), repeat=adapters) if sum(c) == steps]
    return [tuple(k / steps for k in c) for c in grid]


def pareto_front(points: list[tuple[float, ...]]) -> list[bool]:
    """True where no other point is >= on every coordinate and > on one (all maximised)."""
    import torch

    from diffusion_align.math.multi_objective import non_dominated

    return non_dominated(torch.tensor(points, dtype=torch.float64)).tolist()


def sweep(args) -> list[dict]:
    from diffusion_align.builder import eval_sampling
    from diffusion_align.config import load_config
    from diffusion_align.config.registry import build_backbone, build_reward, build_sampler
    from diffusion_align.engine.lora_files import check_lora_fits
    from diffusion_align.engine.lora_soup import Adapter, write_soup
    from diffusion_align.prompts import load_prompts
    from diffusion_align.training.evaluation import evaluate

    if args.sweep < 2:
        raise UserError(f"soup --sweep {args.sweep}: give at least 2 weights per edge")
    if not args.rewards or not 2 <= len(args.rewards) <= 3:
        raise UserError("soup --sweep: give --rewards with two or three reward names (the front's axes)")
    adapters = [Adapter(d) for d in args.adapters]
    model = args.model or next((a.base for a in adapters if a.base), None)
    overrides = [f"model.pretrained={json.dumps(model)}"] if model else []
    config = load_config(args.config or {}, overrides)
    per_prompt = config.prompts.eval_images_per_prompt  # each image its own seed, as the trainer evaluates
    prompts = [
        q for q in load_prompts(args.prompts or config.prompts.eval)[: args.count] for _ in range(per_prompt)
    ]
    if not prompts:
        raise UserError("soup --sweep: no prompts; pass --prompts (a built-in list, .txt or .jsonl)")
    backbone = build_backbone(config.model)
    sampler = build_sampler(backbone, config.sample)
    reward = build_reward(sweep_rewards(args.rewards, config), backbone.device)
    out = Path(args.out)
    rows = []
    for weights in simplex_grid(len(adapters), args.sweep):
        label = "w_" + "_".join(f"{w:.3f}" for w in weights)
        soup_dir = write_soup(args.adapters, weights, out / "soups" / label)
        check_lora_fits(soup_dir, backbone.unet, config.model.pretrained, "soup", f"{backbone.lora_prefix}.")
        backbone.pipe.load_lora_weights(str(soup_dir))
        grid = out / "grids" / f"{label}.png"
        try:
            result, _, _ = evaluate(
                SimpleNamespace(backbone=backbone, sampler=sampler), reward, None, prompts,
                eval_sampling(config.sample), nullcontext, grid, not args.no_progress,
            )  # fmt: skip
        finally:
            backbone.pipe.unload_lora_weights()
        rows.append({"weights": list(weights), **{r: result[f"reward/{r}"] for r in reward.names}})
    front = pareto_front([tuple(row[r] for r in reward.names) for row in rows])
    for row, on in zip(rows, front, strict=True):
        row["front"] = on
    write_tables(rows, reward.names, args.adapters, out)
    plot_front(rows, reward.names, out / "front.png")
    return rows


def sweep_rewards(names: list[str], config) -> list:
    """RewardSettings for `names`: a reward the config lists (eval_rewards first, then rewards) keeps its args
    there (e.g. `clip` on `shapes-clip`), any other is built by name with its defaults."""
    from diffusion_align.config.settings import RewardSettings

    configured = {}
    for r in [*config.rewards, *config.eval_rewards]:
        configured[r.name] = r
    return [RewardSettings(name=n, args=dict(configured[n].args) if n in configured else {}) for n in names]


def write_tables(rows: list[dict], names: list[str], adapters: list[str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    record = {"adapters": [str(a) for a in adapters], "rewards": names, "rows": rows}
    (out / "sweep.json").write_text(json.dumps(record, indent=1))
    with (out / "sweep.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([f"w{i + 1}" for i in range(len(adapters))] + names + ["front"])
        for row in rows:
            writer.writerow([*row["weights"], *(row[n] for n in names), int(row["front"])])


def plot_front(rows: list[dict], names: list[str], path: Path) -> Path:
    """Each pair of rewards: every mix (labelled by its weights), the pair's Pareto front as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(itertools.combinations(names, 2))
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4), squeeze=False)
    for ax, (x, y) in zip(axes[0], pairs, strict=True):
        points = [(row[x], row[y]) for row in rows]
        ax.scatter(*zip(*points, strict=True), color="tab:blue")
        for row, (px, py) in zip(rows, points, strict=True):
            ax.annotate("/".join(f"{w:.2g}" for w in row["weights"]), (px, py), fontsize=7)
        on = sorted(p for p, f in zip(points, pareto_front(points), strict=True) if f)
        ax.plot(*zip(*on, strict=True), "--", color="tab:red", label="Pareto front")
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("LoRA soup sweep (labels: adapter weights)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
