"""`diffusion-align train`: in-process CLI, one-line errors, and `accelerate launch` on two CPU processes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from diffusion_align.cli import main

LORA = "pytorch_lora_weights.safetensors"
ACCELERATE = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


def free_port() -> int:
    """A port nobody listens on: other runs on this host may hold accelerate's default 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(folder: Path, **train) -> Path:
    config = {
        "model": {"pretrained": "tiny-sd"},
        "strategy": {"name": "ddpo"},
        "sample": {"num_steps": 2, "batch_size": 2, "guidance_scale": 1.0},
        "rewards": [{"name": "jpeg_compressibility"}],
        "prompts": {"eval_count": 2},
        "train": {"epochs": 2, "samples_per_epoch": 4, "batch_size": 4, "micro_batch_size": 2, **train},
        "checkpoint": {"every": 2},
        "logging": {"eval_every": 0, "progress": False, "tensorboard": False},
        "output_dir": str(folder / "run"),
    }
    path = folder / "tiny_ddpo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_train_command_runs_and_prints_summary(tmp_path, capsys):
    path = write_config(tmp_path)
    assert main(["train", str(path), "train.epochs=1", f"output_dir={tmp_path / 'out'}"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["epochs"] == 1 and printed["run_dir"] == str(tmp_path / "out")
    assert {"eval_before", "eval_after", "seconds"} <= set(printed)
    assert (tmp_path / "out" / "lora" / LORA).is_file()
    # the same command again: the folder holds a run, so it is refused; --overwrite (after CONFIG, before
    # the overrides) starts over
    assert main(["train", str(path), "train.epochs=1", f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not empty" in err and "--overwrite" in err and "\n" not in err
    assert main(["train", str(path), "--overwrite", "train.epochs=1", f"output_dir={tmp_path / 'out'}"]) == 0
    assert json.loads(capsys.readouterr().out)["epochs"] == 1


def test_train_help_says_a_config_is_code_and_what_overwrite_does(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "A config is code" in text and "custom_components.json" in text
    assert "--overwrite" in text and "delete its run artifacts" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["train.epochs=1", "strategy=null"], "no strategy configured"),
        (["train.batch_size=3"], "train.samples_per_epoch=4 must be a multiple of train.batch_size=3"),
        (["train.epochs=1", "oops"], "expected key=value overrides"),
        (["train.epoch=1"], "unknown config key 'train.epoch'"),
    ],
)
def test_train_command_errors_are_one_line(tmp_path, capsys, args, message):
    path = write_config(tmp_path)
    assert main(["train", str(path), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("diffusion-align train: error:")


@pytest.mark.slow
def test_accelerate_two_processes_match_one_process(tmp_path):
    """Two CPU processes (torchrun through `accelerate launch` with the shipped configs/accelerate/ddp.yaml;
    the trainer forms a gloo group when CUDA is absent) with the same global batch: both ranks end
    identical, and the LoRA matches a one-process run up to float32 summation order (per-sample noise is
    keyed by global sample index, so both runs draw the same samples; one optimizer step per epoch makes
    the update order-free)."""
    path = write_config(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one"
    assert main(["train", str(path), f"output_dir={one}"]) == 0
    two = tmp_path / "two"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / "ddp.yaml"),
        "--num_processes", "2", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        "-m", "diffusion_align", "train", str(path), f"output_dir={two}",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["lora_max_rank_difference"] == 0.0
    a, b = load_file(one / "lora" / LORA), load_file(two / "lora" / LORA)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    scale = max(a[k].abs().max().item() for k in a)
    print(f"one vs two processes: max |dLoRA| = {diff:.3g} (max |LoRA| {scale:.3g})")
    assert diff < 1e-5  # measured ~1e-7..1e-6: float32 reduction order in the all-reduce and accumulation
    assert summary["eval_after"] == pytest.approx(
        json.loads((one / "summary.json").read_text())["eval_after"], abs=1e-3
    )
    # the run folder is checked on the main process and its verdict shared: both ranks stop, none hangs
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "is not empty" in again.stderr
