"""Flow-GRPO's pieces that do not depend on the model family: GRPO advantages (flow_grpo
`stat_tracking.py`), the Fast variant's SDE window in the one loop, and the strategy trained on it.
Run on the tiny SD pipeline with DDIM-eta (a flow backbone plugs into the same loop and strategy)."""

import math

import numpy as np
import pytest
import torch

import rewards
from diffusion_align.config.settings import SampleSettings
from diffusion_align.engine.backbones import StableDiffusionBackbone
from diffusion_align.engine.policy import Policy
from diffusion_align.engine.rollout import rollout
from diffusion_align.errors import UserError
from diffusion_align.math.samplers import DDIMSampler
from diffusion_align.math.stat_tracking import group_advantages
from diffusion_align.methods.strategies.ddpo import DDPO, FlowGRPOConfig
from diffusion_align.testing import tiny_sd
from rewards.combine import Combined

PROMPTS = [
    "two small red circles on the left on a black background",
    "one large blue square at the bottom on a gray background",
]
SAMPLE = SampleSettings(num_steps=6, eta=1.0, guidance_scale=3.0, batch_size=4)


def test_group_advantages_by_hand():
    prompts, r = ["a", "a", "b", "b"], [1.0, 3.0, 2.0, 6.0]
    global_std = math.sqrt(((1 - 3) ** 2 + 0 + (2 - 3) ** 2 + (6 - 3) ** 2) / 4)
    expected = np.array([-1, 1, -2, 2]) / (global_std + 1e-4)
    assert np.allclose(group_advantages(prompts, r, global_std=True), expected, atol=1e-6)
    own = np.array([-1 / (1 + 1e-4), 1 / (1 + 1e-4), -2 / (2 + 1e-4), 2 / (2 + 1e-4)])
    assert np.allclose(group_advantages(prompts, r, global_std=False), own, atol=1e-6)


@pytest.fixture(scope="module")
def policy():
    pipe = tiny_sd()
    return Policy(StableDiffusionBackbone(pipe), DDIMSampler.from_scheduler(pipe.scheduler, eta=1.0), rank=4)


def test_a_per_step_noise_level_makes_only_the_window_stochastic(policy):
    backbone, sampler = policy.backbone, policy.sampler
    embeds = backbone.encode_prompts(PROMPTS, guidance=True)
    x_T = backbone.initial_noise(2, torch.Generator().manual_seed(0))
    etas = [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    with torch.no_grad():
        windowed = rollout(
            backbone, sampler, embeds, x_T, 6, 3.0, etas, generator=torch.Generator().manual_seed(1)
        )
        ode = rollout(backbone, sampler, embeds, x_T, 6, 3.0, 0.0)
        tail = rollout(backbone, sampler, embeds, windowed.latents[:, 4], 6, 3.0, etas, start=4)
    assert torch.equal(windowed.latents[:, :3], ode.latents[:, :3])  # deterministic before the window
    assert not torch.equal(windowed.latents[:, 4], ode.latents[:, 4])  # the window drew noise
    assert torch.equal(tail.latents, windowed.latents[:, 4:])  # deterministic after it
    assert windowed.log_probs.shape == (2, 6)
    assert (windowed.log_probs[:, [0, 1, 4, 5]] == 0).all() and (windowed.log_probs[:, 2:4] != 0).all()


def test_fast_trains_only_its_window_with_ratio_one_on_policy(policy):
    config = FlowGRPOConfig(group_size=2, sde_window=2, timestep_window=0.5, timestep_fraction=1.0, beta=0.0)
    strategy = DDPO(config, policy, Combined({"soft": rewards.build("shapes_color_soft")}), SAMPLE)
    batch = strategy.collect(PROMPTS * 2, [torch.Generator().manual_seed(i) for i in range(4)])
    window = batch["sde_steps"].tolist()
    assert len(window) == 2 and window[0] + 2 <= 3  # inside the first half of 6 steps
    outside = [i for i in range(6) if i not in window]
    assert (batch["log_probs"][:, outside] == 0).all()
    plan = strategy.plan(batch, 4, 2, torch.Generator().manual_seed(0))
    trained = {int(s) for step in plan for micro in step for s in micro["steps"]}
    assert trained == set(window)
    for micro in plan[0]:
        _, metrics = strategy.loss(micro)
        assert metrics["ratio_max_deviation"] < 1e-6


def test_flow_grpo_advantages_are_group_normalised_with_the_global_std(policy):
    strategy = DDPO(
        FlowGRPOConfig(group_size=2, beta=0.0),
        policy,
        Combined({"soft": rewards.build("shapes_color_soft")}),
        SAMPLE,
    )
    batch = strategy.collect(PROMPTS * 2, [torch.Generator().manual_seed(i) for i in range(4)])
    r = batch["reward"].double().numpy()
    expected = group_advantages(batch["prompts"], r, global_std=True)
    assert np.allclose(batch["advantages"].numpy(), np.clip(expected, -5, 5), atol=1e-5)


def test_a_window_larger_than_the_trainable_steps_is_refused(policy):
    with pytest.raises(UserError, match="sde_window=4"):
        DDPO(FlowGRPOConfig(sde_window=4, timestep_window=0.5), policy, None, SAMPLE)


def test_the_sliding_window_moves_one_step_every_n_collects_and_resumes(policy):
    """MixGRPO's schedule: with 3 trainable steps and a 2-step window there are 2 places; every 2 collects the
    window moves one step later, wrapping around; the clock is part of the strategy's state."""
    config = FlowGRPOConfig(
        sde_window=2, sde_window_mode="sliding", sde_window_every=2, timestep_window=0.5, beta=0.0
    )
    strategy = DDPO(config, policy, None, SAMPLE)
    gens = [torch.Generator().manual_seed(0)]
    starts = [int(strategy.sde_steps(gens)[1][0]) for _ in range(6)]
    assert starts == [0, 0, 1, 1, 0, 0]
    state = strategy.state_dict()
    again = DDPO(config, policy, None, SAMPLE)
    again.load_state_dict(state)
    assert int(again.sde_steps(gens)[1][0]) == int(strategy.sde_steps(gens)[1][0]) == 1


def test_zero_advantage_samples_leave_the_update_and_the_steps_keep_their_count(policy):
    strategy = DDPO(
        FlowGRPOConfig(group_size=2, beta=0.0, timestep_fraction=0.5),
        policy,
        Combined({"soft": rewards.build("shapes_color_soft")}),
        SAMPLE,
    )
    batch = strategy.collect(PROMPTS * 2, [torch.Generator().manual_seed(i) for i in range(4)])
    batch["advantages"] = torch.tensor([0.0, 1.5, 0.0, -0.7])  # rows 0 and 2: a group of equal rewards
    for batch_size, micro in ((4, 4), (2, 1)):
        plan = strategy.plan(batch, batch_size, micro, torch.Generator().manual_seed(0))
        assert len(plan) == 4 // batch_size  # as many optimizer steps as without the filter
        assert {int(r) for step in plan for m in step for r in m["rows"]} == {1, 3}
        for step in plan:
            assert math.isclose(sum(m["weight"] for m in step), 1.0)
    strategy.config.filter_zero_advantages = False  # DDPO's default: every row stays
    plan = strategy.plan(batch, 4, 4, torch.Generator().manual_seed(0))
    assert {int(r) for m in plan[0] for r in m["rows"]} == {0, 1, 2, 3}
    batch["advantages"] = torch.zeros(4)  # nothing remains: the step is one micro-batch of weight 0
    strategy.config.filter_zero_advantages = True
    (nothing,), *_ = strategy.plan(batch, 4, 4, torch.Generator().manual_seed(0))
    assert len(nothing["rows"]) == 0 and nothing["weight"] == 0.0
    loss, _ = strategy.loss(nothing)
    loss.backward()  # a zero with a graph, so every process can take the step
    assert loss.item() == 0.0
