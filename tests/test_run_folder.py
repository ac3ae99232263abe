"""A run folder holds one run: a non-empty folder is refused unless resumed or overwritten, nothing is written
before the config is valid, a resume keeps every setting that alters the math (and records the others), and
code named by the config (`module:attr`) is logged with its file. Tiny runs on tiny-sd."""

import json
from pathlib import Path

import pytest
import yaml
from conftest import RUN_SETTINGS as SETTINGS
from conftest import copy_of
from test_trainer import ToyConfig, tiny_config

from diffusion_align.builder import train
from diffusion_align.config.settings import RewardSettings
from diffusion_align.errors import UserError
from diffusion_align.training import checkpointing
from rewards.errors import RewardError
from rewards.jpeg import JpegCompressibility


class CustomJpeg(JpegCompressibility):
    """A reward that is not registered: named in a config as `test_run_folder:CustomJpeg`."""


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def train_epochs(run: Path) -> list[int]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x["epoch"] for x in lines if "train/grad_norm" in x]


# --- one run per folder -------------------------------------------------------------------------------
def test_rerun_in_a_non_empty_folder_is_refused_and_changes_nothing(finished_run, tmp_path):
    run = copy_of(finished_run, tmp_path)
    before = snapshot(run)
    with pytest.raises(UserError, match="not empty.*checkpoint.resume=latest.*--overwrite") as info:
        train(tiny_config(run, "ddpo", **{**SETTINGS, "train.epochs": 1}))
    assert "\n" not in str(info.value)
    assert snapshot(run) == before


def test_an_invalid_config_writes_nothing(finished_run, tmp_path):
    config = tiny_config(tmp_path / "fresh", "ddpo", **SETTINGS)
    config.rewards = [RewardSettings(name="no_such_reward")]
    with pytest.raises((UserError, RewardError)):
        train(config)
    assert not (tmp_path / "fresh").exists()
    run = copy_of(finished_run, tmp_path)
    before = snapshot(run)
    config.output_dir = str(run)
    with pytest.raises((UserError, RewardError)):
        train(config, overwrite=True)  # the old run is deleted only once the new config is known to work
    assert snapshot(run) == before


def test_overwrite_starts_the_folder_over(finished_run, tmp_path):
    """The issue's case: a shorter rerun in a longer run's folder. Without overwrite the old checkpoints
    outlived the new ones (keep_last pruned by epoch number) and `resume=latest` continued the old run."""
    run = copy_of(finished_run, tmp_path)
    (run / "samples" / "epoch_0009.png").write_bytes(b"old run")
    summary = train(tiny_config(run, "ddpo", **{**SETTINGS, "train.epochs": 1}), overwrite=True)
    assert summary["epochs"] == 1
    assert [p.name for p in checkpointing.list_checkpoints(run / "checkpoints")] == ["checkpoint-000001"]
    assert train_epochs(run) == [1]
    assert not (run / "samples" / "epoch_0009.png").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 1
    # a file the trainer did not write is never deleted: the overwrite is refused
    (run / "notes.txt").write_text("mine")
    before = snapshot(run)
    with pytest.raises(UserError, match="notes.txt") as info:
        train(tiny_config(run, "ddpo", **{**SETTINGS, "train.epochs": 1}), overwrite=True)
    assert "\n" not in str(info.value) and snapshot(run) == before


# --- resume checks the config -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, diff",
    [
        ({"lora.rank": 8}, "lora.rank: 4 -> 8"),
        (
            {"train.seed": 1, "train.learning_rate": 1e-3},
            "train.learning_rate: 0.0003 -> 0.001; train.seed: 0 -> 1",
        ),
        ({"sample.num_steps": 3}, "sample.num_steps: 2 -> 3"),
        ({"strategy": {"name": "ddpo", "clip_range": 0.5}}, "strategy.clip_range: 0.0001 -> 0.5"),
        (
            {"rewards": "[{name: jpeg_compressibility, normalize: true}]"},
            "rewards.0.normalize: false -> true",
        ),
    ],
)
def test_resume_refuses_changes_that_alter_the_math(finished_run, tmp_path, change, diff):
    run = copy_of(finished_run, tmp_path)
    before = snapshot(run)
    with pytest.raises(UserError) as info:
        strategy = change.pop("strategy", "ddpo")
        train(tiny_config(run, strategy, **{**SETTINGS, "checkpoint.resume": "latest", **change}))
    message = str(info.value)
    assert diff in message and "\n" not in message
    assert snapshot(run) == before


def test_resume_accepts_and_records_epochs_logging_and_cadence(finished_run, tmp_path):
    run = copy_of(finished_run, tmp_path)
    changed = {"train.epochs": 3, "checkpoint.keep_last": 1, "logging.log_every": 2}
    summary = train(tiny_config(run, "ddpo", **{**SETTINGS, "checkpoint.resume": "latest", **changed}))
    assert summary["epochs"] == 3 and train_epochs(run) == [1, 2, 3]
    history = [json.loads(x) for x in (run / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["resumed_from"].endswith("checkpoint-000002")
    assert history[-1]["changes"] == {
        "train.epochs": [2, 3],
        "checkpoint.keep_last": [3, 1],
        "logging.log_every": [1, 2],
        "checkpoint.resume": [None, "latest"],
        "output_dir": [str(finished_run), str(run)],  # the folder was copied: moving a run is allowed
    }
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 3


# --- a config is code ---------------------------------------------------------------------------------
def test_custom_components_are_logged_with_their_files(tmp_path):
    import test_trainer

    config = tiny_config(tmp_path / "run", f"{ToyConfig.__module__}:ToyConfig", **{"train.epochs": 1})
    config.rewards = [RewardSettings(name=f"{__name__}:CustomJpeg")]
    train(config)
    logged = json.loads((tmp_path / "run" / "custom_components.json").read_text())
    by_key = {c["key"]: c for c in logged}
    assert set(by_key) == {"rewards.0.name", "strategy.name"}
    assert by_key["rewards.0.name"]["ref"] == f"{__name__}:CustomJpeg"
    assert Path(by_key["rewards.0.name"]["file"]) == Path(__file__).resolve()
    assert Path(by_key["strategy.name"]["file"]) == Path(test_trainer.__file__).resolve()


def test_the_image_reward_a_per_frame_video_reward_imports_is_logged_too(tmp_path):
    from diffusion_align.config.registry import custom_components

    config = tiny_config(tmp_path / "run", "ddpo")
    config.rewards = [RewardSettings(name="per_frame", args={"reward": f"{__name__}:CustomJpeg"})]
    (found,) = custom_components(config)
    assert found["key"] == "rewards.0.args.reward" and found["ref"] == f"{__name__}:CustomJpeg"
    assert Path(found["file"]) == Path(__file__).resolve()


def test_check_start_rules_without_training(finished_run, tmp_path):
    """The folder rules alone (`check_start` reads, never writes): a run killed before its first checkpoint
    restarts with `resume=latest` if its config is the same; --overwrite cannot resume from the folder it
    clears; an output_dir that is a file is refused."""
    from diffusion_align.config.loading import save_config
    from diffusion_align.config.run_folder import check_start

    killed = tmp_path / "killed"
    config = tiny_config(killed, "ddpo", **SETTINGS)
    save_config(config, killed / "config.yaml")
    (killed / "metrics.jsonl").write_text('{"epoch": 1, "st')
    latest = tiny_config(killed, "ddpo", **{**SETTINGS, "checkpoint.resume": "latest", "train.epochs": 5})
    start = check_start(latest, overwrite=False)
    assert start.event == "restart" and start.resume_from is None
    assert start.changes["train.epochs"] == (2, 5)
    with pytest.raises(UserError, match="lora.rank: 4 -> 8"):
        check_start(
            tiny_config(killed, "ddpo", **{**SETTINGS, "checkpoint.resume": "latest", "lora.rank": 8}), False
        )
    with pytest.raises(UserError, match="not empty"):
        check_start(config, overwrite=False)
    assert check_start(config, overwrite=True).clear
    resume_inside = tiny_config(finished_run, "ddpo", **{**SETTINGS, "checkpoint.resume": "latest"})
    with pytest.raises(UserError, match="--overwrite .* drop one of the two"):
        check_start(resume_inside, overwrite=True)
    # resuming another folder's checkpoint into a new folder is allowed (the config is still compared)
    elsewhere = str(finished_run / "checkpoints" / "checkpoint-000001")
    start = check_start(
        tiny_config(tmp_path / "new", "ddpo", **{**SETTINGS, "checkpoint.resume": elsewhere}), False
    )
    assert start.event == "resume" and start.resume_from == Path(elsewhere)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        check_start(tiny_config(tmp_path / "file", "ddpo", **SETTINGS), False)
    assert snapshot(killed) == {
        "config.yaml": (killed / "config.yaml").read_bytes(),
        "metrics.jsonl": b'{"epoch": 1, "st',
    }
