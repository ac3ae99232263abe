"""Resume survives damage: a truncated checkpoint file is detected (manifest written last), the run falls back
to the newest intact checkpoint with a one-line warning and ends exactly where an uninterrupted run ends; a
torn metrics line does not block resume and the final evaluation is logged once. Tiny DDPO runs (tiny-sd)."""

import json
from pathlib import Path

import pytest
import torch
from conftest import RUN_SETTINGS as SETTINGS
from conftest import copy_of
from test_trainer import LORA, lora_of, max_diff, tiny_config

from diffusion_align.builder import train
from diffusion_align.errors import UserError
from diffusion_align.training import checkpointing


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def resume(run: Path, **extra):
    return train(tiny_config(run, "ddpo", **{**SETTINGS, "checkpoint.resume": "latest", **extra}))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if "warning" in line]


@pytest.mark.parametrize(
    "name",
    [
        f"lora/{LORA}",
        "optimizer.pt",
        "scheduler.pt",
        checkpointing.COMPLETE_MARKER,
        "rng_rank0.pt",
        "reward.pt",
        "strategy.pt",
        "config.yaml",
        checkpointing.MANIFEST,
    ],
)
def test_truncated_file_falls_back_to_the_previous_checkpoint(finished_run, tmp_path, capsys, name):
    run = copy_of(finished_run, tmp_path)
    truncate(run / "checkpoints" / "checkpoint-000002" / name)
    capsys.readouterr()
    summary = resume(run)
    warned = warnings_in(capsys.readouterr().err)
    assert len(warned) == 1, warned
    assert (
        "checkpoint-000002" in warned[0] and Path(name).name in warned[0] and "checkpoint-000001" in warned[0]
    )
    # epoch 2 retrained from checkpoint 1 == the uninterrupted run's epoch 2 (exact resume)
    assert summary["epochs"] == 2
    assert max_diff(lora_of(finished_run / "lora"), lora_of(run / "lora")) <= 1e-6
    assert [m["epoch"] for m in metrics(run) if "train/grad_norm" in m] == [1, 2]
    # the damaged checkpoint was replaced by an intact one
    assert checkpointing.checkpoint_problem(run / "checkpoints" / "checkpoint-000002") is None


def test_legacy_checkpoints_without_manifest_load_when_every_file_loads(finished_run, tmp_path, capsys):
    """Checkpoints written before manifests: used when all their files load; a truncated one is skipped."""
    run = copy_of(finished_run, tmp_path)
    for folder in checkpointing.list_checkpoints(run / "checkpoints"):
        (folder / checkpointing.MANIFEST).unlink()
        (folder / "config.yaml").unlink()
    truncate(run / "checkpoints" / "checkpoint-000002" / "optimizer.pt")
    capsys.readouterr()
    summary = resume(run)
    warned = warnings_in(capsys.readouterr().err)
    assert any("checkpoint-000002" in w and "optimizer.pt" in w for w in warned), warned
    assert summary["epochs"] == 2
    assert max_diff(lora_of(finished_run / "lora"), lora_of(run / "lora")) <= 1e-6


def test_every_checkpoint_damaged_or_a_damaged_path_is_a_one_line_error(finished_run, tmp_path):
    run = copy_of(finished_run, tmp_path)
    truncate(run / "checkpoints" / "checkpoint-000002" / "reward.pt")
    path = run / "checkpoints" / "checkpoint-000002"
    with pytest.raises(UserError, match=r"checkpoint-000002 is damaged \(reward.pt") as info:
        train(tiny_config(run, "ddpo", **{**SETTINGS, "checkpoint.resume": str(path)}))
    assert "\n" not in str(info.value)
    truncate(run / "checkpoints" / "checkpoint-000001" / "optimizer.pt")
    with pytest.raises(UserError, match="no intact checkpoint") as info:
        resume(run)
    assert "\n" not in str(info.value)


def test_final_evaluation_is_logged_once_after_a_kill_at_the_end(finished_run, tmp_path):
    """A kill after the final evaluation was logged (while the LoRA or summary is written): resuming from the
    last checkpoint evaluates again, and the log keeps one final evaluation."""
    run = copy_of(finished_run, tmp_path)
    (run / "summary.json").unlink()
    final = [m for m in metrics(run) if "train/grad_norm" not in m]
    assert len(final) == 1  # the finished run's final evaluation
    resume(run)
    assert len([m for m in metrics(run) if "train/grad_norm" not in m]) == 1
    assert [m["epoch"] for m in metrics(run) if "train/grad_norm" in m] == [1, 2]


def test_a_torn_last_metrics_line_does_not_block_resume(finished_run, tmp_path, capsys):
    run = copy_of(finished_run, tmp_path)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 2, "step": 4, "eval/rew')  # killed mid-write
    summary = resume(run)
    assert summary["epochs"] == 2
    records = metrics(run)  # every line parses again
    assert [m["epoch"] for m in records if "train/grad_norm" in m] == [1, 2]
    assert any("metrics.jsonl" in w for w in warnings_in(capsys.readouterr().err))


def test_manifest_detects_a_changed_byte_and_lists_every_file(tmp_path):
    def write_shared(folder):
        torch.save({"w": torch.arange(4.0)}, folder / "optimizer.pt")
        (folder / "sub").mkdir()
        (folder / "sub" / "weights.bin").write_bytes(b"abcdef")
        (folder / checkpointing.COMPLETE_MARKER).write_text("{}")

    folder = checkpointing.save_checkpoint(
        tmp_path, 1, write_shared, lambda f: (f / "rng_rank0.pt").write_bytes(b"r"), True, lambda: None, 2
    )
    listed = json.loads((folder / checkpointing.MANIFEST).read_text())["files"]
    assert set(listed) == {"optimizer.pt", "sub/weights.bin", checkpointing.COMPLETE_MARKER, "rng_rank0.pt"}
    assert listed["sub/weights.bin"]["size"] == 6
    assert checkpointing.checkpoint_problem(folder) is None
    (folder / "sub" / "weights.bin").write_bytes(b"abcdeF")  # same size, other content
    assert "sub/weights.bin" in checkpointing.checkpoint_problem(folder)
