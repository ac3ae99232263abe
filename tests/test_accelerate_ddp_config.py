"""The shipped configs/accelerate/ddp.yaml launches: two CPU processes (`accelerate launch --config_file
configs/accelerate/ddp.yaml`; torchrun, and the trainer forms a gloo group where CUDA is absent) train the
same LoRA as one process at the same global batch. Not `--cpu`: accelerate then starts a single process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_train_cli import LORA, write_config

from diffusion_align.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ddp_config_on_two_cpu_processes_matches_one_process(tmp_path):
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    if not Path(accelerate).exists():
        pytest.skip("accelerate CLI not installed")
    path = write_config(tmp_path, epochs=1)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", str(path), f"output_dir={one}"]) == 0
    command = [
        accelerate, "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "ddp.yaml"),
        "--num_processes", "2", "--dynamo_backend", "no",
        "-m", "diffusion_align", "train", str(path), f"output_dir={two}",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["lora_max_rank_difference"] == 0.0
    a, b = load_file(one / "lora" / LORA), load_file(two / "lora" / LORA)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5  # float32 all-reduce order only
