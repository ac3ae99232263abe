"""Numeric settings are checked when the config or flags are read: one line naming key, value, range."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

from diffusion_align.cli import main
from diffusion_align.config import load_config
from diffusion_align.errors import ConfigError


def config_error(overrides: list[str], source: dict | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(source or {}, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "override, expected",
    [
        ("sample.num_steps=-3", "sample.num_steps=-3 must be at least 1"),
        ("train.micro_batch_size=-1", "train.micro_batch_size=-1 must be at least 1"),
        ("train.batch_size=0", "train.batch_size=0 must be"),
        ("train.samples_per_epoch=0", "train.samples_per_epoch=0 must be"),
        ("train.epochs=0", "train.epochs=0 must be at least 1"),
        ("prompts.eval_count=0", "prompts.eval_count=0 must be at least 1"),
        ("prompts.eval_images_per_prompt=0", "prompts.eval_images_per_prompt=0 must be"),
        ("train.learning_rate=0", "train.learning_rate=0.0 must be greater than 0"),
        ("train.learning_rate=-1e-4", "train.learning_rate=-0.0001 must be greater than 0"),
        ("train.learning_rate=nan", "train.learning_rate=nan must be a finite number"),
        ("train.learning_rate=.inf", "train.learning_rate=inf must be a finite number"),
        (
            "train.adam_betas=[0.9, 1.5]",
            "train.adam_betas=(0.9, 1.5) must be in [0, 1)",
        ),
        ("sample.eta=-0.5", "sample.eta=-0.5 must be in [0, 1]"),
        ("sample.eta=2", "sample.eta=2.0 must be in [0, 1]"),
        ("sample.guidance_scale=-1", "sample.guidance_scale=-1.0 must be at least 0"),
        ("sample.batch_size=0", "sample.batch_size=0 must be"),
        ("lora.rank=0", "lora.rank=0 must be at least 1"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last=0 must be"),
        ("logging.log_every=0", "logging.log_every=0 must be"),
        ("strategy={name: ddpo, clip_range: -1e-4}", "strategy.clip_range=-0.0001 must be"),
        ("strategy={name: d3po, timestep_fraction: 0}", "strategy.timestep_fraction=0.0 must be"),
        (
            "strategy={name: prdp, group_size: 1}",
            "strategy.group_size=1 must be at least 2",
        ),
        ("strategy={name: draft, k: -1}", "strategy.k=-1 must be at least 0"),
        (
            "strategy={name: diffusion_dpo, data: x.jsonl, sft_weight: -1}",
            "strategy.sft_weight=-1.0 must be at least 0",
        ),
    ],
)
def test_out_of_range_setting_is_a_one_line_error(override, expected):
    assert config_error([override]).startswith(expected)


def test_reward_weights_must_be_finite():
    source = {"rewards": [{"name": "jpeg_compressibility"}, {"name": "aesthetic"}]}
    message = config_error(["rewards.1.weight=nan"], source)
    assert message == "rewards.1.weight=nan must be a finite number"
    assert load_config(source, ["rewards.1.weight=-2"]).rewards[1].weight == -2.0  # any sign is fine


def test_defaults_and_boundaries_are_accepted():
    config = load_config(
        {}, ["sample.eta=0", "sample.eta=1", "train.lr_warmup_steps=0", "logging.eval_every=0"]
    )
    assert config.sample.eta == 1.0 and config.logging.eval_every == 0


def test_every_declared_range_names_a_real_field():
    # a renamed or removed field must not leave its check silently unused
    from diffusion_align.config.ranges import _RANGES

    for owner, ranges in _RANGES.items():
        module, _, name = owner.partition(":")
        cls = getattr(importlib.import_module(module), name)
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(ranges) <= fields, f"{owner}: {sorted(set(ranges) - fields)} are not fields"


def _cli_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_sample_steps_beyond_the_scheduler_and_bad_flags(tmp_path, capsys):
    out = tmp_path / "out"
    base = ["sample", "--model", "tiny-sd", "--prompt", "a red circle", "--out", str(out)]
    err = _cli_error(capsys, [*base, "--num-steps", "5000"])
    assert "sample.num_steps=5000 must be an integer in [1, 1000]" in err
    assert "--num-steps=-3" not in err
    assert "sample.num_steps=-3 must be" in _cli_error(capsys, [*base, "--num-steps", "-3"])
    assert "--num-per-prompt=0 must be" in _cli_error(capsys, [*base, "--num-per-prompt", "0"])
    assert not (out / "images").exists()


@pytest.mark.parametrize(
    "flag, value",
    [("--lr", "nan"), ("--lr", "0"), ("--guidance", "inf"), ("--grad-clip", "-1"), ("--reg-weight", "nan")],
)
def test_reno_flags_are_checked_before_anything_runs(tmp_path, capsys, flag, value):
    out = tmp_path / "reno"
    argv = ["reno", "--model", "tiny-sd", "--prompt", "one red circle", "--reward", "shapes_color_soft"]
    err = _cli_error(capsys, [*argv, "--iterations", "2", flag, value, "--out", str(out)])
    assert f"{flag}=" in err and "must be" in err
    assert not out.exists()


def test_reno_steps_beyond_the_scheduler(tmp_path, capsys):
    argv = ["reno", "--model", "tiny-sd", "--prompt", "a", "--reward", "shapes_color_soft", "--steps", "2000"]
    err = _cli_error(capsys, [*argv, "--out", str(tmp_path / "reno")])
    assert "--steps=2000 must be an integer in [1, 1000]" in err


def test_score_reward_weight_must_be_finite(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    err = _cli_error(capsys, ["score", str(tmp_path), "--reward", "jpeg_compressibility=nan"])
    assert "must be a finite number" in err
    err = _cli_error(
        capsys, ["score", str(tmp_path), "--reward", "jpeg_compressibility", "--max-frames", "0"]
    )
    assert "--max-frames=0 must be" in err


def test_reno_report_stays_valid_json_with_non_finite_values():
    import json

    from diffusion_align.commands.reno import _finite

    text = json.dumps(_finite({"history": [{"reward": float("nan")}, {"reward": 1.5}], "best": float("inf")}))
    assert json.loads(text) == {"history": [{"reward": None}, {"reward": 1.5}], "best": None}
