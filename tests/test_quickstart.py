"""The README's main job, shortened: DRaFT-K on the bundled shapes model raises the held-out reward."""

from pathlib import Path

import pytest

from diffusion_align.builder import train
from diffusion_align.config import load_config

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


@pytest.mark.slow
def test_shortened_quickstart_improves_held_out_prompts(tmp_path):
    config = load_config(
        QUICKSTART,
        [
            "train.epochs=4",
            "prompts.eval_count=24",
            "logging.eval_every=0",
            "logging.tensorboard=false",
            "logging.progress=false",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    summary = train(config)
    before, after = summary["eval_before_components"], summary["eval_after_components"]
    # held-out prompts and fixed seeds: `before` is the bundled model itself, so the gains are the LoRA's
    assert after["reward"] > before["reward"] + 0.02, (before, after)
    assert after["extra/shapes_color"] > before["extra/shapes_color"], (before, after)
    for name in ("before.png", "after.png"):
        assert (tmp_path / "run" / "samples" / name).is_file()
    assert (tmp_path / "run" / "reward_curve.png").is_file()
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()
