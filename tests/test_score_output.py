"""`score` output is safe (never over an input, folders, rows kept on a kill, --resume), memory-bounded (huge
files decoded reduced for resize-first rewards, exact pixels otherwise), and reads `sample` folders as-is."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_align.cli import main
from rewards.io import load_media


def score(capsys, *argv) -> tuple[int, str]:
    rc = main(["score", *map(str, argv)])
    return rc, capsys.readouterr().err


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def noise_images(folder: Path, n: int, size=(24, 16)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        paths.append(folder / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(paths[-1])
    return paths


def test_output_never_overwrites_an_input(tmp_path, capsys):
    (image,) = noise_images(tmp_path, 1)
    before = image.read_bytes()
    rc, err = score(capsys, image, "--reward", "jpeg_compressibility", "-o", image)
    assert rc == 2 and "one of the files being read" in err
    assert image.read_bytes() == before
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"file": "img0.png", "prompt": "a"}) + "\n")
    rc, err = score(capsys, tmp_path, "--reward", "jpeg_compressibility", "--prompts", prompts, "-o", prompts)
    assert rc == 2 and prompts.read_text().startswith('{"file"')


def test_output_folder_gets_a_file_inside(tmp_path, capsys):
    noise_images(tmp_path / "imgs", 2)
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    rc, _ = score(capsys, tmp_path / "imgs", "--reward", "jpeg_compressibility", "-o", out_dir)
    assert rc == 0
    assert len(rows_of(out_dir / "scores.jsonl")) == 2


COUNTING_REWARD = '''
import torch
from rewards.base import Reward

CALLS = []


class Dies(Reward):
    """Mean brightness; raises KeyboardInterrupt (a kill) on its third call."""

    name = "dies"

    def forward(self, images, prompts):
        CALLS.append(len(prompts))
        if len(CALLS) == 3:
            raise KeyboardInterrupt
        return images.mean((1, 2, 3))
'''


def test_rows_survive_a_kill_and_resume_scores_only_the_rest(tmp_path, monkeypatch, capsys):
    (tmp_path / "dying_reward.py").write_text(COUNTING_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    import dying_reward

    paths = noise_images(tmp_path / "imgs", 5)
    out = tmp_path / "s.jsonl"
    argv = [tmp_path / "imgs", "--reward", "dying_reward:Dies", "--batch-size", "1", "-o", out]
    assert main(["score", *map(str, argv)]) == 130
    kept = rows_of(out)
    assert [Path(r["path"]).name for r in kept] == ["img0.png", "img1.png"]  # scored before the kill
    with out.open("a") as f:
        f.write('{"path": "torn')  # a kill in the middle of a row
    dying_reward.CALLS[:] = [0, 0, 0, 0]  # past the dying call
    rc, err = score(capsys, *argv, "--resume")
    assert rc == 0, err
    rows = rows_of(out)
    assert [Path(r["path"]).name for r in rows] == [p.name for p in paths]
    assert rows[:2] == kept  # kept as they were, not rescored
    assert len(dying_reward.CALLS) == 4 + 3  # only the three missing files were scored
    expected = [load_media(p).mean().item() for p in paths]
    assert [r["dying_reward:Dies"] for r in rows] == pytest.approx(expected, rel=1e-6)


def test_resume_refuses_other_rewards(tmp_path, capsys):
    noise_images(tmp_path / "imgs", 1)
    out = tmp_path / "s.jsonl"
    assert score(capsys, tmp_path / "imgs", "--reward", "jpeg_compressibility", "-o", out)[0] == 0
    rc, err = score(capsys, tmp_path / "imgs", "--reward", "jpeg_incompressibility", "-o", out, "--resume")
    assert rc == 2 and "--resume" in err and "columns" in err


def _array(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A smooth image with some texture: what a photo's downsampling sees."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    rng = np.random.default_rng(seed)
    base = np.stack([np.sin(6 * x + c) * np.cos(4 * y - c) for c in range(3)], -1) * 0.4 + 0.5
    return (np.clip(base + rng.normal(0, 0.03, base.shape), 0, 1) * 255).astype(np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_huge_files_decode_reduced_small_ones_exactly(tmp_path, suffix):
    big, small = tmp_path / f"big{suffix}", tmp_path / f"small{suffix}"
    Image.fromarray(_array((1200, 900))).save(big)
    Image.fromarray(_array((300, 200))).save(small)
    # shorter side 900 against min_side 256: factor 3, shorter side 300 >= 256
    assert load_media(big, min_side=256).shape == (3, 300, 400)
    assert torch.equal(load_media(small, min_side=256), load_media(small))  # below 2 * min_side: untouched
    full, reduced = load_media(big), load_media(big, min_side=256)
    area = torch.nn.functional.avg_pool2d(full[None], 3)[0]
    error = (reduced - area).abs()
    if suffix == ".png":  # an area average, rounded to 8 bits
        assert error.max() <= 1 / 255 + 1e-6
    else:  # the JPEG decoder's DCT scaling is close to an area average
        assert error.mean() < 0.01


def test_clip_scores_are_unchanged_on_normal_images_and_close_on_huge_ones(tmp_path, capsys):
    from rewards.testing import save_tiny_clip

    clip_dir = save_tiny_clip(tmp_path / "tiny-clip")  # image_size 64: reduction from a 512 shorter side
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(_array((96, 64))).save(folder / "a_normal.png")
    Image.fromarray(_array((1600, 1200), seed=1)).save(folder / "b_huge.jpg")
    out = tmp_path / "s.jsonl"
    argv = [folder, "--reward", "clip", "--prompt", "a cat", "--reward-arg", f"clip.pretrained={clip_dir}"]
    assert score(capsys, *argv, "-o", out)[0] == 0
    import rewards

    reward = rewards.build("clip", pretrained=str(clip_dir))
    with torch.no_grad():
        direct = [float(reward(load_media(p)[None], ["a cat"])[0]) for p in sorted(folder.iterdir())]
    got = [r["clip"] for r in rows_of(out)]
    assert got[0] == pytest.approx(direct[0], rel=1e-6, abs=1e-6)  # normal size: exact pixels
    assert got[1] == pytest.approx(direct[1], abs=0.01 * abs(direct[1]) + 1e-3)  # reduced decode


def test_sample_folder_scores_its_images_with_their_prompts_not_the_grid(tmp_path, capsys):
    out = tmp_path / "out"
    prompts = ["a red circle", "a blue square"]
    argv = ["sample", "--model", "tiny-sd", "--num-steps", "2", "--out", str(out)]
    assert main([*argv, "--prompt", prompts[0], "--prompt", prompts[1]]) == 0
    capsys.readouterr()
    scores = tmp_path / "scores.jsonl"
    rc, err = score(capsys, out, "--reward", "jpeg_compressibility", "-o", scores)
    assert rc == 0, err
    rows = rows_of(scores)
    index = rows_of(out / "images.jsonl")
    assert [Path(r["path"]).resolve() for r in rows] == [(out / r["file"]).resolve() for r in index]
    assert [r["prompt"] for r in rows] == prompts
    assert "empty prompt" not in err
    index_text = (out / "images.jsonl").read_text()
    rc, _ = score(capsys, out, "--reward", "jpeg_compressibility", "-o", out / "images.jsonl")
    assert rc == 2 and (out / "images.jsonl").read_text() == index_text  # the index is an input too
    # the index also works as --prompts for the image files named directly
    files = [out / r["file"] for r in index]
    rc, err = score(capsys, *files, "--reward", "jpeg_compressibility", "--prompts", out / "images.jsonl")
    assert rc == 0 and "empty prompt" not in err
