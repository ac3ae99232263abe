"""`diffusion-align train-artifact-head` on folders of real PNGs with a tiny CLIP saved in the real layout.

"Artifacts" here are synthetic (blocky high-frequency noise on smooth images): the point is that the
command learns whatever separates the two folders, reports an honest held-out accuracy and writes a head
that the `artifact_head` reward loads and uses.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_align.cli import main
from rewards.artifact_head import ArtifactHead, load_head
from rewards.io import load_media
from rewards.testing import save_tiny_clip


def smooth_image(rng) -> np.ndarray:
    """32x32 smooth colour gradient."""
    y, x = np.mgrid[0:32, 0:32] / 31.0
    a, b, c = rng.uniform(0.2, 0.8, (3, 3))
    img = (
        a[None, None] * (1 - x[..., None])
        + b[None, None] * x[..., None] * 0.5
        + c[None, None] * y[..., None] * 0.5
    )
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def artifact_image(rng) -> np.ndarray:
    """A smooth image with blocky salt-and-pepper corruption over a random half."""
    img = smooth_image(rng).astype(np.float32)
    blocks = rng.integers(0, 2, (8, 8, 1)).repeat(4, 0).repeat(4, 1) * 255.0
    mask = np.zeros((32, 32, 1), np.float32)
    top = rng.integers(0, 16)
    mask[top : top + 16] = 1
    return (img * (1 - mask) + blocks * mask).astype(np.uint8)


def write_folder(d: Path, make, n: int, seed: int) -> Path:
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(make(rng)).save(d / f"{i:03d}.png")
    return d


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-clip")
    return save_tiny_clip(d, image_size=32, patch_size=8)


def test_train_reports_heldout_accuracy_and_head_works(tmp_path, clip_dir, capsys):
    clean = write_folder(tmp_path / "clean", smooth_image, 16, seed=0)
    artifact = write_folder(tmp_path / "artifact", artifact_image, 16, seed=1)
    (clean / "broken.png").write_bytes(b"not a png")  # reported and skipped, training goes on
    out = tmp_path / "head.safetensors"
    argv = [
        "train-artifact-head",
        "--clean",
        str(clean),
        "--artifact",
        str(artifact),
        "--clip",
        str(clip_dir),
    ]
    rc = main([*argv, "--out", str(out), "--val-fraction", "0.25", "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "broken.png" in captured.err
    assert "16 clean, 16 artifact; train 24, held-out 8" in captured.out
    heldout = float(re.search(r"held-out accuracy: ([0-9.]+)", captured.out).group(1))
    assert heldout >= 0.875  # at most one of 8 held-out images wrong

    # The file records what it was trained on and what was measured.
    _, meta = load_head(out)
    assert meta["clip"] == str(clip_dir) and abs(float(meta["heldout_accuracy"]) - heldout) < 1e-4

    # The reward loads through its real loader (backbone from the file) and ranks fresh images correctly.
    reward = ArtifactHead.from_pretrained(out, device="cpu")
    fresh_clean = write_folder(tmp_path / "fresh_clean", smooth_image, 8, seed=10)
    fresh_art = write_folder(tmp_path / "fresh_art", artifact_image, 8, seed=11)
    x_clean = torch.stack([load_media(p) for p in sorted(fresh_clean.iterdir())])
    x_art = torch.stack([load_media(p) for p in sorted(fresh_art.iterdir())])
    with torch.no_grad():
        r_clean, r_art = reward(x_clean, [""] * 8), reward(x_art, [""] * 8)
    assert r_clean.mean() > r_art.mean() + 0.3
    assert ((r_clean > 0.5).float().mean() + (r_art < 0.5).float().mean()) / 2 >= 0.75


def test_identical_folders_give_chance_not_perfect_accuracy(tmp_path, clip_dir, capsys):
    # Same distribution under both labels: a truthful report cannot claim high held-out accuracy.
    clean = write_folder(tmp_path / "clean", smooth_image, 20, seed=0)
    artifact = write_folder(tmp_path / "artifact", smooth_image, 20, seed=1)
    rc = main(
        ["train-artifact-head", "--clean", str(clean), "--artifact", str(artifact), "--clip", str(clip_dir),
         "--out", str(tmp_path / "h.safetensors"), "--val-fraction", "0.5", "--device", "cpu"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    heldout = float(re.search(r"held-out accuracy: ([0-9.]+)", out).group(1))
    assert heldout < 0.9


def test_too_few_images_is_a_one_line_error(tmp_path, clip_dir, capsys):
    clean = write_folder(tmp_path / "clean", smooth_image, 1, seed=0)
    artifact = write_folder(tmp_path / "artifact", artifact_image, 4, seed=1)
    rc = main(
        ["train-artifact-head", "--clean", str(clean), "--artifact", str(artifact), "--clip", str(clip_dir)]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "at least 2 usable images per class" in err


def test_missing_clip_checkpoint_says_how_to_fix(tmp_path, capsys):
    clean = write_folder(tmp_path / "clean", smooth_image, 2, seed=0)
    artifact = write_folder(tmp_path / "artifact", artifact_image, 2, seed=1)
    missing = tmp_path / "no-clip"
    rc = main(
        ["train-artifact-head", "--clean", str(clean), "--artifact", str(artifact), "--clip", str(missing)]
    )
    err = capsys.readouterr().err
    assert rc == 2 and str(missing) in err and "HF_HOME" in err
