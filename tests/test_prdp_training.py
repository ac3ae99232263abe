"""PRDP through the trainer: K full-batch updates per sampled batch, and a resume equal to the straight run
(the old policy lives in each batch, so a checkpoint between batches needs no strategy state)."""

import json

from test_trainer import lora_of, max_diff, tiny_config

from diffusion_align.builder import train

PRDP = {"name": "prdp", "group_size": 2, "beta": 0.1, "eps": 1e-3, "num_inner_epochs": 2}
# the whole batch per step: K = num_inner_epochs optimizer steps per epoch, the paper's loop
SETTINGS = {"train.epochs": 4, "train.batch_size": 4, "checkpoint.every": 2, "logging.eval_every": 0}


def prdp_config(out, **overrides):
    return tiny_config(out, PRDP, **{**SETTINGS, **overrides})


def test_prdp_takes_k_updates_per_batch_and_resumes_exactly(tmp_path):
    straight = train(prdp_config(tmp_path / "a"))
    assert straight["optimizer_steps"] == 4 * 2  # K = 2 full-batch updates per sampled batch
    train(prdp_config(tmp_path / "b", **{"train.epochs": 2}))
    resumed = train(prdp_config(tmp_path / "b", **{"checkpoint.resume": "latest"}))
    assert resumed["optimizer_steps"] == 8
    assert max_diff(lora_of(straight["lora_dir"]), lora_of(resumed["lora_dir"])) <= 1e-6
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [x["train/optimizer_steps"] for x in lines if "train/optimizer_steps" in x] == [2.0] * 4
