"""The reward-hacking guard: the best gold checkpoint kept, early stop exactly where the gold metric falls
while the proxy rises (and not on noise), the record surviving a resume. The guard is driven directly with
scripted evaluations, and through tiny-sd runs whose eval rewards return a scripted value per evaluation."""

import json
import math

import pytest
import torch
from test_trainer import LORA, lora_of, max_diff, tiny_config, toy  # noqa: F401 - toy is a fixture

from diffusion_align.builder import train
from diffusion_align.errors import ConfigError
from diffusion_align.training.guard import Guard
from rewards.base import Reward

PROBES = ["a guard probe circle", "a guard probe square"]  # the eval prompts: scripted rewards answer them


class Scripted(Reward):
    """On the probe prompts: the next value of `script` (one per evaluation); elsewhere the image mean."""

    script: list[float] = []

    def forward(self, images, prompts):
        if list(prompts) == PROBES:
            return torch.full((len(prompts),), type(self).script.pop(0))
        return images.float().mean(dim=(1, 2, 3))


class ScriptedProxy(Scripted):
    name = "proxy"


class ScriptedGold(Scripted):
    name = "gold"


GOLD = "extra/ScriptedGold"


def evaluation(proxy, gold):
    return {"reward": proxy, GOLD: gold}


def guarded(tmp_path, name, proxy, gold, **overrides):
    ScriptedProxy.script, ScriptedGold.script = list(proxy), list(gold)
    probes = tmp_path / "probes.txt"
    probes.write_text("\n".join(PROBES) + "\n")
    config = tiny_config(
        tmp_path / name,
        **{
            "rewards": f"[{{name: '{__name__}:ScriptedProxy'}}]",
            "eval_rewards": f"[{{name: '{__name__}:ScriptedGold'}}]",
            "prompts.eval": str(probes),
            "checkpoint.keep_best": True,
            **overrides,
        },
    )
    return train(config)


# --- the guard alone, on scripted evaluations -----------------------------------------------------------
def test_best_is_the_highest_gold_and_ties_keep_the_earlier():
    guard = Guard(GOLD)
    golds = [0.50, 0.62, 0.71, 0.71, 0.64, 0.70]
    news = [guard.observe(epoch, evaluation(0.1 * epoch, g)) for epoch, g in enumerate(golds)]
    assert news == [True, True, True, False, False, False]
    assert guard.best["epoch"] == 2 and guard.best["gold"] == 0.71 and guard.best["eval"][GOLD] == 0.71


def test_early_stop_triggers_exactly_when_gold_falls_for_patience_evaluations_while_proxy_rises():
    guard = Guard(GOLD, patience=2, margin=0.05)
    script = [  # (proxy, gold) per evaluation, epoch = index
        (0.60, 0.70),
        (0.70, 0.76),  # best gold
        (0.75, 0.74),  # within the margin: noise
        (0.80, 0.69),  # falls: 1
        (0.78, 0.77),  # a new best resets
        (0.85, 0.70),  # falls: 1
        (0.76, 0.70),  # gold down but proxy below its value at the best: not hacking, resets
        (0.90, 0.71),  # falls: 1
        (0.95, 0.70),  # falls: 2 -> stop here
    ]
    stops = []
    for epoch, (proxy, gold) in enumerate(script):
        guard.observe(epoch, evaluation(proxy, gold))
        stops.append(guard.stop_reason is not None)
    assert stops == [False] * 8 + [True]
    assert guard.best["epoch"] == 4 and "epoch 4" in guard.stop_reason and "epoch 8" in guard.stop_reason


def test_default_margin_is_the_standard_error_of_gold_at_the_first_evaluation():
    scores = [1.0, 0.0, 1.0, 1.0]  # mean 0.75, sample variance 0.25, standard error sqrt(0.25 / 4) = 0.25
    guard = Guard(GOLD, patience=1, noise_multiple=2.0)
    guard.observe(0, evaluation(0.5, 0.75), scores)
    assert guard.noise == pytest.approx(0.25) and guard.margin == pytest.approx(0.5)
    guard.observe(1, evaluation(0.9, 0.30))  # 0.45 below: inside 2 standard errors, seed noise
    assert guard.stop_reason is None
    guard.observe(2, evaluation(0.9, 0.24))  # 0.51 below
    assert guard.stop_reason is not None


def test_state_round_trips_through_json():
    guard = Guard(GOLD, patience=3, margin=0.01)
    for epoch, (proxy, gold) in enumerate([(0.1, 0.5), (0.2, 0.8), (0.3, 0.6)]):
        guard.observe(epoch, evaluation(proxy, gold))
    again = Guard(GOLD, patience=3, margin=0.01)
    again.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert again.state_dict() == guard.state_dict()
    again.observe(3, evaluation(0.4, 0.55))
    assert again.streak == 2


# --- through the trainer --------------------------------------------------------------------------------
def test_keep_best_keeps_the_scripted_best_checkpoint_and_exports_it(tmp_path, toy):  # noqa: F811
    # evaluations: before, epochs 1..3, after (epoch 4); best gold at epoch 2
    gold = [0.40, 0.55, 0.90, 0.60, 0.50]
    summary = guarded(
        tmp_path,
        "run",
        proxy=[0.1, 0.2, 0.3, 0.4, 0.5],
        gold=gold,
        **{"train.epochs": 4, "checkpoint.keep_last": 1, "guard.final": "best"},
    )
    run = tmp_path / "run"
    for name in ("guard.json", "guard_curve.png", "summary.json", f"lora/{LORA}"):
        assert (run / name).is_file(), name
    best = run / "checkpoints" / "best" / "checkpoint-000002"
    assert (best / "lora" / LORA).is_file() and (best / "manifest.json").is_file()
    assert [p.name for p in (run / "checkpoints" / "best").iterdir()] == ["checkpoint-000002"]
    # keep_last=1 rotated the regular checkpoints away, never the best
    assert [p.name for p in (run / "checkpoints").glob("checkpoint-*")] == ["checkpoint-000004"]
    record = json.loads((run / "guard.json").read_text())
    assert record["best"]["epoch"] == 2 and record["best"]["gold"] == pytest.approx(0.90)
    assert [h["epoch"] for h in record["history"]] == [0, 1, 2, 3, 4]
    # the recorded best is the best of what metrics.jsonl logged
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {x["epoch"]: x[f"eval/{GOLD}"] for x in lines if f"eval/{GOLD}" in x}
    logged[0] = summary["eval_before_components"][GOLD]
    assert max(logged, key=logged.get) == record["best"]["epoch"]
    assert summary["guard"]["best_epoch"] == 2 and summary["guard"]["final"] == "best"
    assert summary["guard"]["stopped_early"] is None
    # lora/ is the best checkpoint's, not the last weights
    assert max_diff(lora_of(run / "lora"), lora_of(best / "lora")) == 0
    assert max_diff(lora_of(run / "checkpoints" / "checkpoint-000004" / "lora"), lora_of(best / "lora")) > 0


def test_run_stops_early_at_the_scripted_evaluation_and_says_why(tmp_path, toy, capsys):  # noqa: F811
    summary = guarded(
        tmp_path,
        "run",
        proxy=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        gold=[0.50, 0.60, 0.70, 0.60, 0.58, 0.0],  # epochs 3 and 4 fall 0.1: stop after epoch 4's evaluation
        **{"train.epochs": 8, "guard.patience": 2, "guard.margin": 0.05},
    )
    run = tmp_path / "run"
    assert (
        summary["epochs"] == 4
        and "stayed more than 0.05 below its best 0.7" in summary["guard"]["stopped_early"]
    )
    assert json.loads((run / "summary.json").read_text())["guard"]["stopped_early"]
    assert "early stop at epoch 4" in capsys.readouterr().out
    assert (run / "checkpoints" / "checkpoint-000004").is_dir()  # saved where it stopped
    assert (run / "checkpoints" / "best" / "checkpoint-000002").is_dir()
    assert ScriptedGold.script == []  # the after evaluation ran (the last scripted value)
    assert json.loads((run / "guard.json").read_text())["history"][-1]["epoch"] == 4  # not judged twice


def test_resume_keeps_the_best_record(tmp_path, toy):  # noqa: F811
    extra = {"checkpoint.every": 2, "guard.final": "best"}
    # first 2 epochs: before, epoch 1 (best), after at 2 (not in checkpoint 2's state: observed after it)
    guarded(tmp_path, "run", [0.1, 0.2, 0.3], [0.5, 0.9, 0.6], **{**extra, "train.epochs": 2})
    # resumed to 4: epoch 3, after at 4 (both below epoch 1's gold)
    summary = guarded(
        tmp_path, "run", [0.4, 0.5], [0.7, 0.8], **{**extra, "train.epochs": 4, "checkpoint.resume": "latest"}
    )
    run = tmp_path / "run"
    assert summary["guard"]["best_epoch"] == 1 and summary["guard"]["best_gold"] == pytest.approx(0.9)
    record = json.loads((run / "guard.json").read_text())
    assert [h["epoch"] for h in record["history"]] == [0, 1, 3, 4]
    best = run / "checkpoints" / "best" / "checkpoint-000001"
    assert max_diff(lora_of(run / "lora"), lora_of(best / "lora")) == 0


def test_guard_settings_that_cannot_work_are_one_line_errors(tmp_path, toy):  # noqa: F811
    with pytest.raises(ConfigError, match="checkpoint.keep_best needs a gold metric"):
        train(tiny_config(tmp_path / "a", **{"checkpoint.keep_best": True}))
    with pytest.raises(ConfigError, match="guard.final=best needs checkpoint.keep_best"):
        guarded(tmp_path, "b", [], [], **{"checkpoint.keep_best": False, "guard.final": "best"})
    with pytest.raises(ConfigError, match="guard.gold=extra/nope is not an eval reward"):
        guarded(tmp_path, "c", [], [], **{"guard.gold": "extra/nope"})
    with pytest.raises(ConfigError, match="guard.patience needs evaluations"):
        guarded(tmp_path, "d", [], [], **{"guard.patience": 2, "logging.eval_every": 0})


def test_no_eval_rewards_no_guard_files(tmp_path, toy):  # noqa: F811
    summary = train(tiny_config(tmp_path / "run", **{"train.epochs": 1}))
    assert "guard" not in summary and not (tmp_path / "run" / "guard_curve.png").exists()
    assert math.isfinite(summary["eval_after"])
