"""Offline preference pairs: JSONL and Pick-a-Pic tables read into one form, ties dropped as the paper's code
drops them, every bad row skipped and named by its line or row, and a 1,000-row file with 10 bad rows trains
on the other 990 through the trainer."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_align.builder import build_run
from diffusion_align.config import load_config
from diffusion_align.errors import UserError
from diffusion_align.methods.preference_data import BadImage, PairOrder, load_image, read_pairs
from diffusion_align.training.trainer import Trainer


def png(value, size=32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (value, value, value)).save(buffer, format="PNG")
    return buffer.getvalue()


def save(folder, name, value):
    (folder / name).write_bytes(png(value))
    return name


def pixel(item) -> int:
    return round(float(load_image(item, (8, 8))[0, 0, 0]) * 255)


# --- JSONL -------------------------------------------------------------------------------------------
def test_jsonl_both_layouts_winner_first_and_ties_dropped(tmp_path):
    a, b = save(tmp_path, "a.png", 10), save(tmp_path, "b.png", 200)
    rows = [
        {"prompt": "wl", "image_w": a, "image_l": b},
        {"prompt": "image 0 wins", "image_0": a, "image_1": b, "label_0": 1},
        {"caption": "image 1 wins", "image_0": a, "image_1": b, "label_0": 0},
        {"prompt": "tie", "image_0": a, "image_1": b, "label_0": 0.5},
    ]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = read_pairs(str(tmp_path / "p.jsonl"))
    assert [p.prompt for p in data.pairs] == ["wl", "image 0 wins", "image 1 wins"]
    assert [[pixel(i) for i in p.images()] for p in data.pairs] == [[10, 200], [10, 200], [200, 10]]
    assert data.ties == 1 and data.skipped == []


def test_bad_jsonl_rows_are_named_by_line_and_skipped(tmp_path, capsys):
    a = save(tmp_path, "a.png", 10)
    lines = [
        json.dumps({"prompt": "good", "image_w": a, "image_l": a}),
        "{not json",
        json.dumps({"image_w": a, "image_l": a}),
        json.dumps({"prompt": "x", "image_w": a, "image_l": "gone.png"}),
        json.dumps({"prompt": "x", "image_0": a, "image_1": a, "label_0": 2}),
        json.dumps({"prompt": "x", "image": a}),
    ]
    (tmp_path / "p.jsonl").write_text("\n".join(lines))
    data = read_pairs(str(tmp_path / "p.jsonl"))
    assert len(data.pairs) == 1
    assert [s.split(":")[0] for s in data.skipped] == [f"p.jsonl line {i}" for i in (2, 3, 4, 5, 6)]
    assert "no prompt" in data.skipped[1] and "gone.png" in data.skipped[2]
    assert capsys.readouterr().err.count("skipped p.jsonl line") == 5


def test_unusable_sources_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_pairs(str(tmp_path / "none.jsonl"))
    with pytest.raises(UserError, match="not found"):
        read_pairs(str(tmp_path / "nothing_here"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no usable pair"):
        read_pairs(str(tmp_path / "empty.jsonl"))


def test_a_hub_id_without_the_datasets_library_says_what_to_install():
    try:  # absent here; where installed, the tests run with the hub off (conftest)
        import datasets  # noqa: F401

        expected = "could not load Hugging Face dataset"
    except ImportError:
        expected = "pip install datasets"
    with pytest.raises(UserError, match=expected) as info:
        read_pairs("no-such-owner/no-such-dataset")
    assert "\n" not in str(info.value)


def test_images_are_resized_to_cover_then_centre_cropped(tmp_path):
    wide = np.zeros((10, 40, 3), dtype=np.uint8)
    wide[:, 18:22] = 255  # a white band in the middle: the crop keeps columns 15-25
    Image.fromarray(wide).save(tmp_path / "wide.png")
    image = load_image(tmp_path / "wide.png", (20, 20))
    assert image.shape == (3, 20, 20)
    assert image[:, :, 10].min() > 0.9 and image[:, :, 0].max() < 0.1
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(BadImage, match="does not decode"):
        load_image(tmp_path / "bad.png", (8, 8))


def test_pair_order_is_a_fresh_permutation_per_pass_and_resumes_from_its_cursor():
    order = PairOrder(5)
    first = order.take(3) + order.take(4)
    assert sorted(first[:5]) == list(range(5))
    again = PairOrder(5)
    again.position = 3
    assert again.take(4) == first[3:]


# --- Parquet in the Pick-a-Pic v2 layout -----------------------------------------------------------
def test_pickapic_parquet_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "caption": ["zero wins", "one wins", "tie", "", "corrupt"],
            "jpg_0": [png(10), png(10), png(10), png(10), b"garbage"],
            "jpg_1": [png(200), png(200), png(200), png(200), png(200)],
            "label_0": [1.0, 0.0, 0.5, 1.0, 1.0],
        }
    )
    pq.write_table(table, tmp_path / "train-0.parquet")
    data = read_pairs(str(tmp_path))  # a folder of files
    assert [p.prompt for p in data.pairs] == ["zero wins", "one wins", "corrupt"]
    assert [pixel(i) for i in data.pairs[1].images()] == [200, 10]
    assert data.ties == 1 and data.skipped == ["train-0.parquet row 3: no prompt (empty caption)"]
    with pytest.raises(BadImage):
        load_image(data.pairs[2].images()[0], (8, 8))
    pq.write_table(table.drop(["label_0"]), tmp_path / "other.parquet")
    with pytest.raises(UserError, match="missing column"):
        read_pairs(str(tmp_path / "other.parquet"))


# --- through the trainer -----------------------------------------------------------------------------
BAD = {
    **dict.fromkeys([7, 333, 777], "missing file"),
    **dict.fromkeys([100, 480, 640, 1000], "corrupt image"),
    **dict.fromkeys([250, 512, 901], "no prompt"),
}


def thousand_rows(folder):
    """1,000 JSONL pairs of 32x32 PNGs; the lines in BAD are broken as named."""
    rng = np.random.default_rng(0)
    lines = []
    for line in range(1, 1001):
        names = []
        for side in "wl":
            name = f"{line}{side}.png"
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name)
            names.append(name)
        row = {"prompt": f"picture {line}", "image_w": names[0], "image_l": names[1]}
        kind = BAD.get(line)
        if kind == "missing file":
            row["image_l"] = "deleted.png"
        elif kind == "corrupt image":
            (folder / names[0]).write_bytes(b"\x89PNG broken")
        elif kind == "no prompt":
            del row["prompt"]
        lines.append(json.dumps(row))
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_thousand_rows_with_ten_bad_train_on_the_990_and_report_the_ten(tmp_path):
    data = thousand_rows(tmp_path)
    readable = 1000 - sum(kind != "corrupt image" for kind in BAD.values())  # corrupt ones are found in use
    config = load_config(
        {
            "model": {"pretrained": "tiny-sd"},
            "strategy": {"name": "diffusion_dpo", "data": str(data), "beta": 500.0},
            "sample": {"num_steps": 2, "batch_size": 8, "guidance_scale": 1.0},
            "prompts": {"eval_count": 1},
            # one pass over the readable pairs, 2 images each, in 7 optimizer steps
            "train": {
                "epochs": 1,
                "samples_per_epoch": 2 * readable,
                "batch_size": 2 * readable // 7,
                "micro_batch_size": 64,
                "learning_rate": 1e-4,
            },  # fmt: skip
            "logging": {"eval_every": 0, "progress": False, "tensorboard": False},
            "output_dir": str(tmp_path / "run"),
        }
    )
    run = build_run(config)
    summary = Trainer(run).run()
    strategy = run.strategy
    where = [s.split(":")[0] for s in strategy.data.skipped]
    found_on_reading = sorted(n for n, kind in BAD.items() if kind != "corrupt image")
    assert where[:6] == [f"pairs.jsonl line {n}" for n in found_on_reading]  # in file order
    reasons = {int(s.split(":")[0].split()[-1]): s for s in strategy.data.skipped}
    assert sorted(reasons) == sorted(BAD)
    for line, kind in BAD.items():
        expected = {"missing file": "not found", "corrupt image": "does not decode", "no prompt": "no prompt"}
        assert expected[kind] in reasons[line], reasons[line]
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in metrics if "preference/pairs" in m]
    assert trained[0]["preference/pairs"] == 990
    assert summary["optimizer_steps"] >= 3
    assert len(strategy.cache) == 990 and not set(strategy.cache) & strategy.bad
    assert torch.cat([p.detach().flatten() for p in run.policy.parameters()]).isfinite().all()


def test_the_pairs_command_writes_reward_labelled_pairs_the_reader_reads(tmp_path):
    from diffusion_align.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(
        "model: {pretrained: tiny-sd}\nsample: {num_steps: 2, batch_size: 4, guidance_scale: 1.0}\n"
        "rewards: [{name: jpeg_compressibility}]\nprompts: {train: shapes_train}\n"
    )
    assert main(["pairs", str(config), "--out", str(tmp_path / "pairs"), "--count", "3"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert row["label_0"] == (
            0.5 if row["reward_0"] == row["reward_1"] else float(row["reward_0"] > row["reward_1"])
        )
    data = read_pairs(str(tmp_path / "pairs" / "pairs.jsonl"))
    assert len(data.pairs) + data.ties == 3 and not data.skipped
    assert main(["pairs", str(config), "--out", str(tmp_path / "pairs"), "--count", "1"]) == 2  # not empty


def test_shared_noise_pairs_are_one_file_for_dpo_and_d3po_human_labels(tmp_path):
    """`pairs --shared-noise` writes D3PO's pairs with their seeds: Diffusion-DPO reads the images, and D3PO,
    given the same file as human labels, regenerates exactly the images that were written (same x_T per pair)
    with the file's winners."""
    from diffusion_align.cli import main
    from diffusion_align.config.registry import build_backbone, build_policy, build_reward
    from diffusion_align.methods.strategies.d3po import D3PO, D3POConfig

    config = tmp_path / "c.yaml"
    config.write_text(
        "model: {pretrained: tiny-sd}\nsample: {num_steps: 2, batch_size: 4, guidance_scale: 1.0, eta: 1.0}\n"
        "rewards: [{name: shapes_color_soft}]\nprompts: {train: shapes_train}\n"
    )
    out = tmp_path / "pairs"
    assert main(["pairs", str(config), "--out", str(out), "--count", "3", "--shared-noise"]) == 0
    rows = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert all(isinstance(r["seed"], int) for r in rows)
    assert len(read_pairs(str(out / "pairs.jsonl")).pairs) == 3  # the DPO reader takes it as it is
    loaded = load_config(config)
    policy = build_policy(build_backbone(loaded.model), loaded.sample, loaded.lora)
    strategy = D3PO(
        D3POConfig(human_labels=str(out / "pairs.jsonl")), policy, build_reward(loaded.rewards), loaded.sample
    )
    batch = strategy.collect(["ignored"] * 6, torch.Generator().manual_seed(0))
    images = policy.backbone.decode(batch["latents"][:, -1]).clamp(0, 1)
    written = torch.stack([load_image(out / r[f"image_{i}"], (32, 32)) for r in rows for i in (0, 1)])
    assert (images - written).abs().max() <= 1 / 255 + 1e-6  # the PNGs, to 8-bit rounding
    winners = [2 * k + (0 if r["label_0"] == 1 else 1) for k, r in enumerate(rows)]
    assert batch["win"].tolist() == winners
