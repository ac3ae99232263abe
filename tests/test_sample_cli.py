"""`diffusion-align sample`: files, grid, reproducible seeds, LoRA, and one-line errors for bad input."""

import json

import pytest
import torch
from PIL import Image

from diffusion_align.cli import main


def _run(capsys, *argv):
    rc = main(["sample", *argv])
    return rc, capsys.readouterr()


def _pixels(path) -> torch.Tensor:
    return torch.from_numpy(__import__("numpy").asarray(Image.open(path), dtype="float32"))


def test_writes_images_grid_and_index(tmp_path, capsys):
    out = tmp_path / "out"
    rc, _ = _run(
        capsys,
        "--model",
        "tiny-sd",
        "--prompt",
        "a red circle",
        "--prompt",
        "a blue square",
        "--num-per-prompt",
        "2",
        "--num-steps",
        "2",
        "--out",
        str(out),
    )
    assert rc == 0
    rows = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a red circle"] * 2 + ["a blue square"] * 2
    assert [r["seed"] for r in rows] == [0, 1, 2, 3]
    assert all(Image.open(out / r["file"]).size == (32, 32) for r in rows)
    assert Image.open(out / "grid.png").size[0] >= 64
    assert (out / "config.yaml").is_file()


def test_image_depends_on_its_seed_not_on_batch_size(tmp_path, capsys):
    common = ["--model", "tiny-sd", "--prompt", "a", "--prompt", "b", "--prompt", "c", "--num-steps", "2"]
    _run(capsys, *common, "--batch-size", "3", "--out", str(tmp_path / "one"))
    _run(capsys, *common, "--batch-size", "1", "--out", str(tmp_path / "three"))
    for name in ("0000_a", "0001_b", "0002_c"):
        one, three = (
            _pixels(tmp_path / "one/images" / f"{name}.png"),
            _pixels(tmp_path / "three/images" / f"{name}.png"),
        )
        assert (one - three).abs().max() <= 1, name  # rounding to uint8 only


def test_lora_changes_images(tmp_path, capsys):
    from diffusion_align.engine.backbones import StableDiffusionBackbone
    from diffusion_align.engine.policy import Policy
    from diffusion_align.testing import tiny_sd

    policy = Policy(StableDiffusionBackbone(tiny_sd()), None)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.5 * torch.randn_like(p))
    policy.save_lora(tmp_path / "lora")
    common = ["--model", "tiny-sd", "--prompt", "a", "--num-steps", "2"]
    _run(capsys, *common, "--out", str(tmp_path / "base"))
    rc, _ = _run(capsys, *common, "--lora", str(tmp_path / "lora"), "--out", str(tmp_path / "tuned"))
    assert rc == 0
    diff = _pixels(tmp_path / "base/images/0000_a.png") - _pixels(tmp_path / "tuned/images/0000_a.png")
    assert diff.abs().max() > 5


def test_config_file_and_overrides(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {pretrained: tiny-sd}\nsample: {num_steps: 2, guidance_scale: 1.0, seed: 7}\n")
    rc, _ = _run(capsys, str(cfg), "sample.seed=9", "--prompt", "x", "--out", str(tmp_path / "o"))
    assert rc == 0
    assert json.loads((tmp_path / "o/images.jsonl").read_text())["seed"] == 9


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["sample.num_step=3"], "unknown config key 'sample.num_step'"),
        (["sample.guidance_scale=high"], "sample.guidance_scale: expected float"),
        (["--model", "/no/such/model"], "could not load model '/no/such/model'"),
        (["--prompt", "  "], "no prompts to sample"),
        (["--lora", "/no/such/lora"], "--lora /no/such/lora"),
    ],
)
def test_bad_input_is_one_line_error(argv, expected, tmp_path, capsys):
    base = ["--model", "tiny-sd", "--num-steps", "1", "--out", str(tmp_path / "o")]
    if "--prompt" not in argv:
        base += ["--prompt", "a"]
    rc, captured = _run(capsys, *base, *argv)
    assert rc == 2
    lines = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(lines) == 1 and expected in lines[0], captured.err
