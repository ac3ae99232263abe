"""The training loop: run folder contents, exact resume, crash-safe checkpoints, non-finite stops,
micro-batch invariance, reward building. Tiny real models (tiny-sd, 32x32), a few seconds per run."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion_align.builder import train
from diffusion_align.config import load_config
from diffusion_align.config.registry import build_reward
from diffusion_align.config.settings import RewardSettings
from diffusion_align.engine.rollout import rollout
from diffusion_align.errors import UserError
from diffusion_align.methods.distributed import LocalGroup
from diffusion_align.methods.strategies import STRATEGIES
from diffusion_align.training import checkpointing
from rewards.jpeg import JpegCompressibility

TESTS = Path(__file__).resolve().parent
LORA = "pytorch_lora_weights.safetensors"


# --- a minimal REINFORCE strategy (last denoising step only): a test double that drives the loop ----------
@dataclass
class ToyConfig:
    nan_loss_at_call: int = -1  # loss() returns NaN at this call (1-based); -1 = never


class Toy:
    num_inner_epochs = 1

    def __init__(self, config, policy, reward, sample, group=None):
        self.config, self.policy, self.reward, self.sample = config, policy, reward, sample
        self.group, self.calls = group or LocalGroup(), 0

    def _embeds(self, prompts):
        s = self.sample
        return self.policy.backbone.encode_prompts(prompts, s.negative_prompt, guidance=s.guidance_scale > 1)

    def collect(self, prompts, generator):
        b, s = self.policy.backbone, self.sample
        x_T = b.initial_noise(len(prompts), generator)
        traj = rollout(
            b,
            self.policy.sampler,
            self._embeds(prompts),
            x_T,
            s.num_steps,
            s.guidance_scale,
            s.eta,
            generator=generator,
        )
        total, _ = self.reward.score(traj.images, prompts)
        every = self.group.gather(total)
        adv = self.group.local((every - every.mean()) / (every.std() + 1e-6))
        return {
            "prompts": prompts,
            "reward": total,
            "adv": adv,
            "latents": traj.latents,
            "t": traj.timesteps[-1],
            "metrics": {"toy/adv_abs": adv.abs().mean().item()},
        }

    def plan(self, batch, batch_size, micro_batch_size, generator):
        order = torch.randperm(len(batch["prompts"]), generator=generator)
        steps = []
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            steps.append(
                [
                    {
                        "rows": rows[m : m + micro_batch_size],
                        "batch": batch,
                        "weight": len(rows[m : m + micro_batch_size]) / len(rows),
                    }
                    for m in range(0, len(rows), micro_batch_size)
                ]
            )
        return steps

    def loss(self, micro):
        self.calls += 1
        batch, rows = micro["batch"], micro["rows"]
        lat = batch["latents"][rows]
        s = self.sample
        logp = self.policy.log_prob(
            lat[:, -2],
            lat[:, -1],
            batch["t"].expand(len(rows)),
            self._embeds([batch["prompts"][i] for i in rows.tolist()]),
            s.guidance_scale,
            s.num_steps,
        )
        loss = -(batch["adv"][rows] * logp).mean()
        if self.calls == self.config.nan_loss_at_call:
            loss = loss * float("nan")
        return loss, {"toy/logp": logp.mean().item()}


class NaNAfterFirstCall(JpegCompressibility):
    """JPEG reward that turns NaN from its second call on (the second epoch)."""

    calls = 0

    def forward(self, images, prompts=None):
        NaNAfterFirstCall.calls += 1
        out = super().forward(images, prompts)
        return out * float("nan") if NaNAfterFirstCall.calls > 1 else out


def register_toy():
    """Put the toy first among the strategy variants (config saving looks the class up by name)."""
    items = list(STRATEGIES.items())
    STRATEGIES.clear()
    STRATEGIES.update({"toy": (f"{__name__}:ToyConfig", f"{__name__}:Toy"), **dict(items)})
    return items


@pytest.fixture
def toy():
    items = register_toy()
    yield
    STRATEGIES.clear()
    STRATEGIES.update(dict(items))


def tiny_config(out, strategy="toy", **overrides):
    data = {
        "model": {"pretrained": "tiny-sd"},
        "strategy": strategy,
        "sample": {"num_steps": 2, "batch_size": 4, "guidance_scale": 1.0},
        "prompts": {"eval_count": 2},
        "train": {"epochs": 2, "samples_per_epoch": 4, "batch_size": 2, "micro_batch_size": 2},
        "checkpoint": {"every": 1, "keep_last": 2},
        "logging": {"eval_every": 1, "progress": False, "tensorboard": False},
        "output_dir": str(out),
    }
    return load_config(data, [f"{k}={v}" for k, v in overrides.items()])


def lora_of(folder) -> dict:
    return load_file(Path(folder) / LORA)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# --- the run folder -----------------------------------------------------------------------------------
def test_run_writes_everything_and_lora_loads_in_diffusers(tmp_path, toy):
    from diffusion_align.testing import tiny_sd

    config = tiny_config(tmp_path / "run", **{"logging.tensorboard": True, "train.epochs": 3})
    summary = train(config)
    run = tmp_path / "run"
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "reward_curve.png",
        "samples/before.png",
        "samples/after.png",
        "samples/epoch_0001.png",
        f"lora/{LORA}",
    ):
        assert (run / name).is_file(), name
    assert any((run / "logs").iterdir())  # TensorBoard events
    assert load_config(run / "config.yaml") == config  # resolved config, reloadable
    assert summary["epochs"] == 3 and summary["run_dir"] == str(run) and summary["seconds"] > 0
    assert isinstance(summary["eval_before"], float) and isinstance(summary["eval_after"], float)
    assert set(summary["eval_after_components"]) == {"reward", "reward/jpeg_compressibility"}
    assert json.loads((run / "summary.json").read_text())["eval_after"] == summary["eval_after"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    epoch_lines = [x for x in lines if "reward/mean" in x]
    assert [x["epoch"] for x in epoch_lines] == [1, 2, 3]
    for key in (
        "reward/std",
        "reward/jpeg_compressibility",
        "train/grad_norm",
        "train/lr",
        "train/loss",
        "toy/adv_abs",
        "toy/logp",
        "time/samples_per_second",
        "time/epoch_seconds",
        "eval/reward",
    ):
        assert key in epoch_lines[0], key
    assert epoch_lines[-1]["step"] == 6  # 4 samples / batch 2 = 2 optimizer steps per epoch
    # checkpoints: the last two kept; an interrupted write (a .tmp folder) is never "latest"
    root = run / "checkpoints"
    assert [p.name for p in checkpointing.list_checkpoints(root)] == [
        "checkpoint-000002",
        "checkpoint-000003",
    ]
    (root / ".tmp-checkpoint-000004").mkdir()
    assert checkpointing.resolve_resume("latest", root)[0].name == "checkpoint-000003"
    assert checkpointing.resolve_resume("latest", tmp_path / "nothing") == (None, [])
    with pytest.raises(UserError, match="no complete checkpoint"):
        checkpointing.resolve_resume(str(root / ".tmp-checkpoint-000004"), root)
    state = json.loads((root / "checkpoint-000003" / checkpointing.COMPLETE_MARKER).read_text())
    assert state["epoch"] == 3 and state["global_step"] == 6
    for name in (
        "optimizer.pt",
        "scheduler.pt",
        "reward.pt",
        "rng_rank0.pt",
        f"lora/{LORA}",
        "lora/base_model.json",
    ):
        assert (root / "checkpoint-000003" / name).is_file(), name
    # The saved LoRA loads with diffusers' own loader and changes the model's output.
    pipe = tiny_sd()
    kwargs = dict(prompt=["a red circle"], num_inference_steps=2, output_type="pt", guidance_scale=1.0)
    base = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(str(run / "lora"))
    tuned = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (tuned - base).abs().max() > 1e-4


def test_bad_settings_are_one_line_errors(tmp_path, toy):
    with pytest.raises(UserError, match="samples_per_epoch=5 must be a multiple of train.batch_size=2"):
        train(tiny_config(tmp_path / "run", **{"train.samples_per_epoch": 5}))
    with pytest.raises(UserError, match="no strategy configured"):
        train(load_config({"output_dir": str(tmp_path / "x")}))


def test_eval_images_per_prompt_is_each_prompt_listed_that_many_times(tmp_path, toy):
    """k images per eval prompt = the prompt file with each line repeated k times (image i: seed + i)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    repeated = tmp_path / "p3.txt"
    repeated.write_text("a red circle\n" * 3 + "a blue square\n" * 3)
    extra = {"train.epochs": 1, "prompts.eval_count": 2, "logging.eval_every": 0}
    k = train(
        tiny_config(tmp_path / "k", **extra, **{"prompts.eval": prompts, "prompts.eval_images_per_prompt": 3})
    )
    listed = train(
        tiny_config(tmp_path / "l", **{**extra, "prompts.eval": repeated, "prompts.eval_count": 6})
    )
    one = train(tiny_config(tmp_path / "o", **extra, **{"prompts.eval": prompts}))
    assert k["eval_before"] == listed["eval_before"] != one["eval_before"]
    with pytest.raises(UserError, match="eval_images_per_prompt=0 must be at least 1"):
        train(tiny_config(tmp_path / "z", **{"prompts.eval_images_per_prompt": 0}))


def test_evaluation_samples_with_its_own_steps_and_noise(tmp_path):
    """sample.eval_eta / eval_num_steps (Flow-GRPO: collect on SDE steps, evaluate on the ODE) draw the eval
    images as a run that samples that way would; unset, evaluation samples as training does."""
    extra = {
        "train.epochs": 1,
        "logging.eval_every": 0,
        "sample.eta": 1.0,
        "rewards": "[{name: shapes_color_soft}]",
    }
    own = train(
        tiny_config(tmp_path / "a", "draft", **extra, **{"sample.eval_eta": 0.0, "sample.eval_num_steps": 3})
    )
    ode = train(tiny_config(tmp_path / "b", "draft", **{**extra, "sample.eta": 0.0, "sample.num_steps": 3}))
    same = train(tiny_config(tmp_path / "c", "draft", **extra))
    assert own["eval_before"] == ode["eval_before"] != same["eval_before"]


def test_micro_batches_give_the_same_update(tmp_path, toy):
    extra = {"train.epochs": 1, "train.batch_size": 4, "logging.eval_every": 0}
    one = train(tiny_config(tmp_path / "a", **{**extra, "train.micro_batch_size": 4}))
    four = train(tiny_config(tmp_path / "b", **{**extra, "train.micro_batch_size": 1}))
    assert max_diff(lora_of(one["lora_dir"]), lora_of(four["lora_dir"])) < 1e-6
    assert max(lora_of(one["lora_dir"])[k].abs().max() for k in lora_of(one["lora_dir"])) > 0


# --- exact resume -------------------------------------------------------------------------------------
def test_resume_equals_uninterrupted(tmp_path):
    """DDPO (stat tracker, Adam state, per-sample noise): 4 epochs straight == 2 + resume + 2."""
    strategy = "ddpo"
    extra = {"checkpoint.every": 2, "train.epochs": 4, "logging.eval_every": 0}
    straight = train(tiny_config(tmp_path / "a", strategy, **extra))
    train(tiny_config(tmp_path / "b", strategy, **{**extra, "train.epochs": 2}))
    resumed = train(tiny_config(tmp_path / "b", strategy, **{**extra, "checkpoint.resume": "latest"}))
    assert resumed["epochs"] == 4 and resumed["eval_before"] == straight["eval_before"]
    assert (tmp_path / "b" / "checkpoints" / "checkpoint-000002" / "strategy.pt").is_file()
    assert max_diff(lora_of(straight["lora_dir"]), lora_of(resumed["lora_dir"])) <= 1e-6
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines if "reward/mean" in x] == [1, 2, 3, 4]


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = checkpointing.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpointing.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_sigkill_inside_checkpoint_write_keeps_previous(tmp_path):
    """Kill the process while it writes checkpoint 2 (held there by a test hook): checkpoint 1 stays loadable
    and a resumed run finishes."""
    out = tmp_path / "run"
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_trainer as t; t.register_toy(); "
        "from diffusion_align.builder import train; "
        "train(t.tiny_config(sys.argv[2], **dict(a.split('=', 1) for a in sys.argv[3:])))"
    )
    env = {**os.environ, checkpointing.PAUSE_ENV: "2", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(TESTS), str(out), "train.epochs=3", "logging.eval_every=0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    marker = out / "checkpoints" / ".tmp-checkpoint-000002" / checkpointing.PAUSE_MARKER
    deadline = time.time() + 600  # generous: the CPU may be shared
    while not marker.exists():
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        assert time.time() < deadline, "the run never reached the checkpoint write"
        time.sleep(0.2)
    assert (marker.parent / checkpointing.COMPLETE_MARKER).is_file()  # the new one was fully written ...
    os.kill(proc.pid, signal.SIGKILL)  # ... but not yet renamed into place
    proc.wait()
    latest, _ = checkpointing.resolve_resume("latest", out / "checkpoints")
    assert latest.name == "checkpoint-000001"
    before = lora_of(latest / "lora")
    register_toy()
    try:
        summary = train(
            tiny_config(out, **{"train.epochs": 3, "logging.eval_every": 0, "checkpoint.resume": "latest"})
        )
    finally:
        STRATEGIES.pop("toy")
    assert summary["epochs"] == 3 and not marker.parent.exists()
    assert [p.name for p in checkpointing.list_checkpoints(out / "checkpoints")][-1] == "checkpoint-000003"
    assert max_diff(before, lora_of(out / "lora")) > 0  # it trained on from there


# --- non-finite values --------------------------------------------------------------------------------
def test_non_finite_reward_stops_and_keeps_last_good_checkpoint(tmp_path, toy):
    config = tiny_config(tmp_path / "run", **{"logging.eval_every": 0, "train.epochs": 3})
    config.rewards = [RewardSettings(name=f"{__name__}:NaNAfterFirstCall")]
    NaNAfterFirstCall.calls = -1  # calls: the "before" evaluation, epoch 1, then NaN from epoch 2 on
    with pytest.raises(UserError) as info:
        train(config)
    message = str(info.value)
    assert "\n" not in message and "non-finite reward at epoch 2" in message
    assert "NaNAfterFirstCall" in message
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in checkpointing.list_checkpoints(root)] == ["checkpoint-000001"]
    assert not (tmp_path / "run" / "lora").exists() and not (tmp_path / "run" / "summary.json").exists()
    assert load_config(tmp_path / "run" / "config.yaml") == config  # written before the first step


def test_non_finite_loss_names_epoch_and_step(tmp_path, toy):
    strategy = {"name": "toy", "nan_loss_at_call": 6}
    config = tiny_config(tmp_path / "run", strategy, **{"logging.eval_every": 0, "train.micro_batch_size": 1})
    # 4 micro-batches per epoch (2 steps x 2): call 6 is epoch 2, step 1, micro-batch 2
    with pytest.raises(
        UserError, match=r"non-finite loss \(nan\) at epoch 2, optimizer step 1, micro-batch 2"
    ):
        train(config)
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in checkpointing.list_checkpoints(root)] == ["checkpoint-000001"]


# --- rewards ------------------------------------------------------------------------------------------
def test_build_reward_components_and_truthful_flag():
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    prompts = ["one small red circle on the left on a black background"] * 2
    soft = build_reward([RewardSettings(name="shapes_color_soft")])
    assert soft.differentiable
    total, parts = soft.score(images, prompts)
    total.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    mix = build_reward(
        [RewardSettings(name="shapes_color_soft"), RewardSettings(weight=0.5), RewardSettings(weight=2.0)]
    )
    assert not mix.differentiable and mix.names == [
        "shapes_color_soft",
        "jpeg_compressibility",
        "jpeg_compressibility_2",
    ]
    total, parts = mix.score(images.detach(), prompts)
    expected = (
        parts["shapes_color_soft"] + 0.5 * parts["jpeg_compressibility"] + 2 * parts["jpeg_compressibility_2"]
    )
    assert torch.allclose(total, expected) and not total.requires_grad
    with pytest.raises(UserError, match="no rewards configured"):
        build_reward([])


def test_build_reward_state_keeps_the_checkpoint_layout_of_the_running_statistics():
    """reward.pt holds only the normalisers' statistics, keyed `<component>.<count|mean|m2>` as checkpoints
    written before the single reward object, so those runs still resume."""
    settings = [RewardSettings(name="shapes_color_soft", normalize=True), RewardSettings(weight=0.5)]
    reward = build_reward(settings, record=True)
    images, prompts = torch.rand(3, 3, 32, 32), ["one small red circle on the left on a black background"] * 3
    _, parts = reward.score(images, prompts)
    state = reward.state_dict()
    assert set(state) == {"shapes_color_soft.count", "shapes_color_soft.mean", "shapes_color_soft.m2"}
    assert state["shapes_color_soft.count"].item() == 3
    assert state["shapes_color_soft.mean"].item() == pytest.approx(
        parts["shapes_color_soft"].double().mean().item()
    )
    resumed = build_reward(settings)
    resumed.load_state_dict(state)
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in state.items())
    assert set(reward.take()) == {"total", "shapes_color_soft", "jpeg_compressibility"}
