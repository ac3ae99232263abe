"""PRDP through the trainer: K full-batch updates per sampled batch, and a resume equal to the straight run
(the old policy lives in each batch, so a checkpoint between batches needs no strategy state)."""

import json
from pathlib import Path

from safetensors.torch import load_file

from diffusion_align.config import load_config
from diffusion_align.trainer import train

PRDP = {"name": "prdp", "group_size": 2, "beta": 0.1, "eps": 1e-3, "num_inner_epochs": 2}


def prdp_config(out, **overrides):
    data = {
        "model": {"pretrained": "tiny-sd"},
        "strategy": PRDP,
        "sample": {"num_steps": 2, "batch_size": 4, "guidance_scale": 1.0},
        "prompts": {"eval_count": 2},
        # the whole batch per step: K = num_inner_epochs optimizer steps per epoch, the paper's loop
        "train": {"epochs": 4, "samples_per_epoch": 4, "batch_size": 4, "micro_batch_size": 2},
        "checkpoint": {"every": 2},
        "logging": {"eval_every": 0, "progress": False, "tensorboard": False},
        "output_dir": str(out),
    }
    return load_config(data, [f"{k}={v}" for k, v in overrides.items()])


def lora(summary) -> dict:
    return load_file(Path(summary["lora_dir"]) / "pytorch_lora_weights.safetensors")


def test_prdp_takes_k_updates_per_batch_and_resumes_exactly(tmp_path):
    straight = train(prdp_config(tmp_path / "a"))
    assert straight["optimizer_steps"] == 4 * 2  # K = 2 full-batch updates per sampled batch
    train(prdp_config(tmp_path / "b", **{"train.epochs": 2}))
    resumed = train(prdp_config(tmp_path / "b", **{"checkpoint.resume": "latest"}))
    assert resumed["optimizer_steps"] == 8
    a, b = lora(straight), lora(resumed)
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [x["train/optimizer_steps"] for x in lines if "train/optimizer_steps" in x] == [2.0] * 4
