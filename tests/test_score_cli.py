"""`rewards.io` loading and the `diffusion-align score` command, end to end on real files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rewards.io import UnreadableMedia, find_media, group_by_shape, load_many, load_media


def _rgb(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_frames(path: Path, frames: np.ndarray) -> Path:
    import imageio.v2 as imageio

    if path.suffix == ".gif":
        imageio.mimwrite(path, list(frames), duration=0.1, loop=0)
    else:
        imageio.mimwrite(path, list(frames), fps=8, macro_block_size=16)
    return path


@pytest.fixture()
def mixed_folder(tmp_path) -> Path:
    """Good RGB, grayscale and RGBA PNGs, plus a corrupt and an empty file with image extensions."""
    d = tmp_path / "imgs"
    d.mkdir()
    Image.fromarray(_rgb(seed=1)).save(d / "a_rgb.png")
    Image.fromarray(_rgb(seed=2)[:, :, 0], "L").save(d / "b_gray.png")
    rgba = np.concatenate([_rgb(seed=3), np.full((24, 32, 1), 255, np.uint8)], axis=2)
    rgba[:12, :, 3] = 0  # top half fully transparent
    Image.fromarray(rgba, "RGBA").save(d / "c_rgba.png")
    (d / "d_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (d / "e_empty.jpg").write_bytes(b"")
    return d


# ---------------------------------------------------------------------------------------------------
# rewards.io


def test_find_media_expands_folders_and_reports_missing(tmp_path, mixed_folder):
    (mixed_folder / "a_rgb.txt").write_text("a prompt")  # sidecar: not media
    hidden = mixed_folder / ".cache"
    hidden.mkdir()
    Image.fromarray(_rgb()).save(hidden / "x.png")
    sub = mixed_folder / "sub"
    sub.mkdir()
    Image.fromarray(_rgb()).save(sub / "z.webp")
    explicit = tmp_path / "notes.dat"
    explicit.write_text("x")
    files, failures = find_media(
        [mixed_folder, explicit, tmp_path / "missing.png", mixed_folder / "a_rgb.png"]
    )
    names = [f.name for f in files]
    assert names == [
        "a_rgb.png",
        "b_gray.png",
        "c_rgba.png",
        "d_corrupt.png",
        "e_empty.jpg",
        "z.webp",
        "notes.dat",
    ]
    assert [f.path.name for f in failures] == ["missing.png"]


def test_load_converts_modes_to_rgb(mixed_folder):
    gray = load_media(mixed_folder / "b_gray.png")
    assert gray.shape == (3, 24, 32) and gray.dtype == torch.float32
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    expected = torch.from_numpy(_rgb(seed=2)[:, :, 0]).float() / 255
    torch.testing.assert_close(gray[0], expected)
    rgba = load_media(mixed_folder / "c_rgba.png")
    assert rgba.shape == (3, 24, 32)
    assert torch.equal(rgba[:, :12], torch.ones(3, 12, 32))  # transparent -> white
    torch.testing.assert_close(
        rgba[:, 12:], torch.from_numpy(_rgb(seed=3)[12:]).permute(2, 0, 1).float() / 255
    )
    rgb = load_media(mixed_folder / "a_rgb.png")
    assert 0 <= rgb.min() and rgb.max() <= 1


def test_load_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 1000], [32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    x = load_media(tmp_path / "g16.png")
    torch.testing.assert_close(x[0], torch.from_numpy(values.astype(np.float32) / 65535))


def test_bad_files_are_reported_not_raised(mixed_folder, tmp_path):
    with pytest.raises(UnreadableMedia, match="empty"):
        load_media(mixed_folder / "e_empty.jpg")
    with pytest.raises(UnreadableMedia, match="cannot decode"):
        load_media(mixed_folder / "d_corrupt.png")
    (tmp_path / "bad.mp4").write_bytes(b"not a video" * 50)
    files, _ = find_media([mixed_folder, tmp_path / "bad.mp4"])
    good, bad = load_many(files)
    assert [m.path.name for m in good] == ["a_rgb.png", "b_gray.png", "c_rgba.png"]
    assert {f.path.name for f in bad} == {"d_corrupt.png", "e_empty.jpg", "bad.mp4"}
    assert all("\n" not in f.reason for f in bad)


def test_videos_load_as_frame_stacks(tmp_path):
    frames = np.stack([np.full((32, 48, 3), 20 * t, np.uint8) for t in range(6)])
    gif = load_media(_write_frames(tmp_path / "v.gif", frames))
    assert gif.shape == (6, 3, 32, 48)
    torch.testing.assert_close(gif[:, 0, 0, 0], torch.arange(6).float() * 20 / 255, atol=2 / 255, rtol=0)
    mp4 = load_media(_write_frames(tmp_path / "v.mp4", frames))
    assert mp4.shape == (6, 3, 32, 48)
    # h264 is lossy: flat frames come back within a few levels
    torch.testing.assert_close(mp4.mean((1, 2, 3)), torch.arange(6).float() * 20 / 255, atol=4 / 255, rtol=0)
    capped = load_media(tmp_path / "v.mp4", max_frames=3)  # frames 0, 2-3, 5: evenly spaced, ends kept
    assert capped.shape[0] == 3
    torch.testing.assert_close(capped[[0, -1]], mp4[[0, -1]])
    single = _write_frames(tmp_path / "one.gif", frames[:1])
    assert load_media(single).shape == (3, 32, 48)  # a one-frame gif is an image


def test_group_by_shape_batches_identical_shapes_only(tmp_path):
    from rewards.io import Media

    items = [Media(Path(str(i)), torch.zeros(3, h, 8)) for i, h in enumerate([8, 16, 8, 8, 16])]
    batches = group_by_shape(items, batch_size=2)
    assert sorted(map(sorted, batches)) == [[0, 2], [1, 4], [3]]
    assert all(len({items[i].pixels.shape for i in b}) == 1 for b in batches)


# ---------------------------------------------------------------------------------------------------
# diffusion-align score


def score(argv: list[str], capsys) -> tuple[int, str, str]:
    from diffusion_align.cli import main

    rc = main(["score", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    return [json.loads(line) for line in path.read_text().splitlines()]


def direct_scores(
    reward_name: str, paths: list[Path], prompts: list[str] | None = None, **kwargs
) -> list[float]:
    """The same reward called directly on each file's loaded pixels, one at a time."""
    import rewards

    reward = rewards.build(reward_name, **kwargs)
    prompts = prompts or [""] * len(paths)
    with torch.no_grad():
        return [float(reward(load_media(p)[None], [t])[0]) for p, t in zip(paths, prompts, strict=True)]


def test_score_folder_with_bad_files(tmp_path, mixed_folder, capsys):
    out = tmp_path / "scores.jsonl"
    rc, stdout, err = score([str(mixed_folder), "--reward", "jpeg_compressibility", "-o", str(out)], capsys)
    assert rc == 1
    rows = read_rows(out)
    good = [mixed_folder / n for n in ("a_rgb.png", "b_gray.png", "c_rgba.png")]
    assert [r["path"] for r in rows] == [str(p) for p in good]
    assert all(
        r["type"] == "image" and set(r) == {"path", "type", "prompt", "jpeg_compressibility", "total"}
        for r in rows
    )
    expected = direct_scores("jpeg_compressibility", good)
    assert [r["jpeg_compressibility"] for r in rows] == pytest.approx(expected, rel=1e-6)
    assert [r["total"] for r in rows] == pytest.approx(expected, rel=1e-6)
    assert str(mixed_folder / "d_corrupt.png") in err and str(mixed_folder / "e_empty.jpg") in err
    assert "2 of 5 file(s) failed" in err
    assert "jpeg_compressibility" in stdout and "mean" in stdout  # summary table
    assert not list(tmp_path.glob("*.partial"))


def test_score_csv_and_weights(tmp_path, mixed_folder, capsys):
    out = tmp_path / "scores.csv"
    argv = [
        str(mixed_folder / "a_rgb.png"),
        str(mixed_folder / "c_rgba.png"),
        "--reward",
        "jpeg_compressibility=2",
    ]
    rc, _, err = score([*argv, "-o", str(out), "--batch-size", "1"], capsys)
    assert rc == 0, err
    rows = read_rows(out)
    assert list(rows[0]) == ["path", "type", "prompt", "jpeg_compressibility", "total"]
    for row in rows:
        assert float(row["total"]) == pytest.approx(2 * float(row["jpeg_compressibility"]), rel=1e-6)


def test_score_stdout_jsonl_and_prompt_order(tmp_path, capsys):
    d = tmp_path / "p"
    d.mkdir()
    for name in ("listed", "sidecar", "default"):
        Image.fromarray(_rgb(seed=len(name))).save(d / f"{name}.png")
    (d / "sidecar.txt").write_text("from the sidecar\n")
    (d / "listed.txt").write_text("sidecar loses to --prompts")
    (tmp_path / "prompts.tsv").write_text("listed.png\tfrom the prompts file\n")
    argv = [str(d), "--reward", "jpeg_compressibility", "--prompts", str(tmp_path / "prompts.tsv")]
    rc, stdout, err = score([*argv, "--prompt", "the default"], capsys)
    assert rc == 0, err
    rows = {Path(r["path"]).stem: r["prompt"] for r in map(json.loads, stdout.splitlines())}
    assert rows == {
        "default": "the default",
        "listed": "from the prompts file",
        "sidecar": "from the sidecar",
    }
    assert "mean" in err  # without -o the summary goes to stderr, keeping stdout pure JSONL


def test_score_videos_per_frame(tmp_path, capsys):
    import rewards

    d = tmp_path / "v"
    d.mkdir()
    frames = np.stack([_rgb(32, 48, seed=t) for t in range(5)])
    _write_frames(d / "clip.gif", frames)
    _write_frames(d / "clip2.mp4", frames)
    Image.fromarray(_rgb(seed=9)).save(d / "still.png")
    out = tmp_path / "s.jsonl"
    rc, _, err = score(
        [str(d), "--reward", "jpeg_compressibility", "--frames", "fml", "-o", str(out)], capsys
    )
    assert rc == 0, err
    rows = {Path(r["path"]).name: r for r in read_rows(out)}
    assert rows["clip.gif"]["type"] == "video" and rows["clip2.mp4"]["type"] == "video"
    assert rows["still.png"]["type"] == "image"
    lifted = rewards.per_frame(rewards.build("jpeg_compressibility"), "fml", k=None, generator=None)
    for name in ("clip.gif", "clip2.mp4"):
        with torch.no_grad():
            expected = float(lifted(load_media(d / name)[None], [""])[0])
        assert rows[name]["jpeg_compressibility"] == pytest.approx(expected, rel=1e-6)


def test_score_clip_from_local_checkpoint(tmp_path, mixed_folder, capsys):
    from rewards.testing import save_tiny_clip

    clip_dir = save_tiny_clip(tmp_path / "tiny-clip")
    out = tmp_path / "s.jsonl"
    argv = [
        str(mixed_folder),
        "--reward",
        "clip",
        "--reward",
        "jpeg_compressibility=0.5",
        "--prompt",
        "a cat",
    ]
    rc, _, err = score([*argv, "--reward-arg", f"clip.pretrained={clip_dir}", "-o", str(out)], capsys)
    assert rc == 1  # the two bad files
    rows = read_rows(out)
    assert len(rows) == 3
    paths = [Path(r["path"]) for r in rows]
    expected = direct_scores("clip", paths, ["a cat"] * 3, pretrained=str(clip_dir))
    assert [r["clip"] for r in rows] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    for r in rows:
        assert r["total"] == pytest.approx(r["clip"] + 0.5 * r["jpeg_compressibility"], rel=1e-6)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--reward", "jpeg_compressibility", "--reward-arg", "clip.pretrained=/x"], "no --reward 'clip'"),
        (["--reward", "jpeg_compressibility=heavy"], "is not a number"),
        (["--reward", "jpeg_compressibility", "--frames", "every:2"], "--frames"),
    ],
)
def test_score_bad_arguments_are_one_line_errors(tmp_path, mixed_folder, capsys, argv, message):
    rc, _, err = score([str(mixed_folder / "a_rgb.png"), *argv], capsys)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


def test_score_help_documents_prompt_order(capsys):
    from diffusion_align.cli import main

    with pytest.raises(SystemExit):
        main(["score", "--help"])
    text = capsys.readouterr().out
    assert "sidecar" in text and "--prompts FILE" in text and "first match wins" in text


PICKY_REWARD = '''
import torch
from rewards.base import Reward
from rewards.errors import RewardError


class Picky(Reward):
    """Mean brightness; refuses white images and gives NaN for black ones (to exercise failure paths)."""

    name = "picky"

    def forward(self, images, prompts):
        mean = images.mean((1, 2, 3))
        if (mean > 0.99).any():
            raise RewardError("white image")
        return torch.where(mean < 0.01, torch.full_like(mean, float("nan")), mean)
'''


def test_score_isolates_files_a_reward_fails_on(tmp_path, monkeypatch, capsys):
    (tmp_path / "picky_reward.py").write_text(PICKY_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    d = tmp_path / "imgs"
    d.mkdir()
    for name, value in [("a", 100), ("b_white", 255), ("c", 150), ("d_black", 0)]:
        Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(d / f"{name}.png")
    out = tmp_path / "s.jsonl"
    rc, _, err = score([str(d), "--reward", "picky_reward:Picky", "-o", str(out)], capsys)
    assert rc == 1
    rows = read_rows(out)
    assert [Path(r["path"]).stem for r in rows] == ["a", "c"]  # batch-mates of the bad files still scored
    assert [r["picky_reward:Picky"] for r in rows] == pytest.approx([100 / 255, 150 / 255], rel=1e-6)
    assert "b_white.png: reward picky_reward:Picky failed (RewardError: white image)" in err
    assert "d_black.png: non-finite score" in err
    assert "2 of 4 file(s) failed" in err


def test_score_with_artifact_head_from_files(tmp_path, mixed_folder, capsys):
    from rewards.artifact_head import LogisticHead, save_head
    from rewards.testing import save_tiny_clip

    clip_dir = save_tiny_clip(tmp_path / "clip", image_size=32, patch_size=8)
    head_file = save_head(LogisticHead(32), tmp_path / "head.safetensors", clip=str(clip_dir))
    out = tmp_path / "s.jsonl"
    argv = [
        str(mixed_folder),
        "--reward",
        "artifact_head",
        "--reward-arg",
        f"artifact_head.pretrained={head_file}",
    ]
    rc, _, err = score([*argv, "-o", str(out)], capsys)
    assert rc == 1 and "2 of 5 file(s) failed" in err
    rows = read_rows(out)
    expected = direct_scores("artifact_head", [Path(r["path"]) for r in rows], pretrained=str(head_file))
    assert [r["artifact_head"] for r in rows] == pytest.approx(expected, rel=1e-5)
