"""Fixed-seed scenarios whose outputs `tests/golden/engine_v1.safetensors` records (see
tests/test_behaviour_preserved.py). Each scenario returns {name: tensor}; the record stores them under
"<scenario>/<name>". Only public entry points are called (CLI commands, `train`, `reno`, `best_of_n`,
`fk_steering`), so an engine redesign that keeps behaviour keeps these values."""

from __future__ import annotations

import json
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

PROMPTS = ["one large red circle on a white background", "two small blue squares on a black background"]
# metrics.jsonl keys that are wall-clock measurements, not behaviour
TIMING = ("time", "seconds", "elapsed", "per_sec", "/s", "throughput", "memory", "_mb", "_gb")


def _cli(*argv: str) -> None:
    from diffusion_align.cli import main

    with redirect_stdout(StringIO()), redirect_stderr(StringIO()):
        rc = main(list(argv))
    assert rc == 0, f"{argv[0]} exited with {rc}"


def _pixels(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8).copy())


def _sample_folder(out: Path) -> None:
    args = ["sample", "--model", "shapes", "--num-steps", "4", "--num-per-prompt", "2", "--batch-size", "3"]
    _cli(*args, *[a for p in PROMPTS for a in ("--prompt", p)], "--out", str(out))


def sample_and_score() -> dict[str, torch.Tensor]:
    """`sample` on the bundled shapes model (4 images, 2 prompts, 4 steps, batches of 3 so one batch is
    ragged), then `score` on those PNGs with a differentiable and a non-differentiable reward."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sample"
        _sample_folder(out)
        rows = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
        record = {"pixels": torch.stack([_pixels(out / r["file"]) for r in rows])}
        record["seeds"] = torch.tensor([r["seed"] for r in rows])
        scores = Path(tmp) / "scores.jsonl"
        rewards = ["shapes_color_soft", "jpeg_compressibility=0.5"]
        _cli("score", str(out / "images"), *[a for r in rewards for a in ("--reward", r)],
             "--prompt", PROMPTS[0], "-o", str(scores))  # fmt: skip
        score_rows = [json.loads(line) for line in scores.read_text().splitlines()]
        assert [Path(r["path"]).name for r in score_rows] == [Path(r["file"]).name for r in rows]
        for column in ("shapes_color_soft", "jpeg_compressibility", "total"):
            record[f"score/{column}"] = torch.tensor([r[column] for r in score_rows], dtype=torch.float64)
    return record


STRATEGIES = {
    "ddpo": {"name": "ddpo"},
    "d3po": {"name": "d3po"},
    "prdp": {"name": "prdp", "group_size": 2, "num_inner_epochs": 2},
    "draft": {"name": "draft", "k": 1},
    "draft_lv": {"name": "draft", "k": 1, "lv_draws": 2},
    "alignprop": {"name": "alignprop", "truncation": "uniform", "truncation_low": 0, "truncation_high": 2},
}


def _train_config(out: Path, strategy: dict):
    from diffusion_align.config import load_config

    data = {
        "model": {"pretrained": "tiny-sd"},
        "strategy": strategy,
        "rewards": [{"name": "shapes_color_soft"}],
        "sample": {"num_steps": 2, "batch_size": 4, "guidance_scale": 1.0, "eta": 1.0},
        "prompts": {"eval_count": 2},
        "train": {"epochs": 1, "samples_per_epoch": 4, "batch_size": 4, "micro_batch_size": 2, "seed": 3},
        "checkpoint": {"every": 1},
        "logging": {"eval_every": 1, "progress": False, "tensorboard": False},
        "output_dir": str(out),
    }
    return load_config(data)


def _is_timing(key: str) -> bool:
    return any(t in key.lower() for t in TIMING)


def train_one_epoch(strategy: str) -> dict[str, torch.Tensor]:
    """One epoch of `strategy` through `train` on tiny-sd: the final LoRA weights, every numeric value of
    metrics.jsonl (except wall-clock ones) and the summary's numbers."""
    from diffusion_align.builder import train

    with tempfile.TemporaryDirectory() as tmp, redirect_stdout(StringIO()), redirect_stderr(StringIO()):
        run = Path(tmp) / "run"
        summary = train(_train_config(run, STRATEGIES[strategy]))
        record = {f"lora/{k}": v for k, v in load_file(Path(summary["lora_dir"]) / LORA).items()}
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for i, line in enumerate(lines):
        for key, value in line.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not _is_timing(key):
                record[f"metrics/{i:03d}/{key}"] = torch.tensor(float(value), dtype=torch.float64)
    for key, value in summary.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not _is_timing(key):
            record[f"summary/{key}"] = torch.tensor(float(value), dtype=torch.float64)
    return record


LORA = "pytorch_lora_weights.safetensors"


def _shapes():
    from diffusion_align.engine.backbones import load_backbone

    return load_backbone("shapes", device="cpu")


def _f64(x) -> torch.Tensor:
    return torch.tensor(float("nan") if x is None else float(x), dtype=torch.float64)


def reno_run() -> dict[str, torch.Tensor]:
    """ReNO on the shapes model: 4 iterations, 1 step; best image/noise and the whole history."""
    import rewards
    from diffusion_align.methods.reno import reno

    r = reno(_shapes(), rewards.build("shapes_color_soft"), PROMPTS[0], iterations=4, seed=2, progress=False)
    record = {"best_image": r.best_image, "best_noise": r.best_noise, "strip": r.strip}
    record |= {"best_reward": _f64(r.best_reward), "best_iteration": torch.tensor(r.best_iteration)}
    for row in r.history:
        i = row["iteration"]
        for key in ("reward", "regulariser", "loss", "z_norm", "grad_norm"):
            record[f"history/{i}/{key}"] = _f64(row[key])
        for name, value in row["rewards"].items():
            record[f"history/{i}/rewards/{name}"] = _f64(value)
    return record


def _search_record(result) -> dict[str, torch.Tensor]:
    record = {
        "best_image": result.best_image,
        "best_reward": _f64(result.best_reward),
        "best_seed": torch.tensor(result.best_seed),
        "rewards": result.rewards,
        "reward_calls": torch.tensor(result.reward_calls),
    }
    if result.best_noise is not None:  # FK steering keeps no initial noise (particles are resampled)
        record["best_noise"] = result.best_noise
    return record


def best_of_n_pick() -> dict[str, torch.Tensor]:
    import rewards
    from diffusion_align.methods.search import best_of_n

    jpeg = rewards.build("jpeg_incompressibility")
    return _search_record(best_of_n(_shapes(), jpeg, PROMPTS[0], 5, seed=0, batch_size=2, progress=False))


def fk_steering_pick() -> dict[str, torch.Tensor]:
    import rewards
    from diffusion_align.methods.search import fk_steering

    soft = rewards.build("shapes_color_soft")
    result = fk_steering(
        _shapes(), soft, PROMPTS[1], num_particles=4, num_steps=4, guidance_scale=3.0, lmbda=10.0,
        adaptive=False, seed=1, progress=False,
    )  # fmt: skip
    return _search_record(result)


SCENARIOS = {
    "sample_and_score": sample_and_score,
    **{f"train_{name}": (lambda n=name: train_one_epoch(n)) for name in STRATEGIES},
    "reno": reno_run,
    "best_of_n": best_of_n_pick,
    "fk_steering": fk_steering_pick,
}


def run(name: str) -> dict[str, torch.Tensor]:
    """Scenario `name` from a fixed global RNG state (nothing in it should read the global RNG; if something
    does, this keeps it reproducible and the record shows it)."""
    torch.manual_seed(0)
    out = SCENARIOS[name]()
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}
