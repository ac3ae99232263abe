"""Strategies on the tiny SD pipeline (32x32, 2 DDIM steps): on-policy ratio 1, micro-batch x accumulation
equals one big batch, pairs/groups as published, gradients only in the LoRA, clear errors, resume state."""

import json
import math
from contextlib import contextmanager

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

import rewards
from diffusion_align.config.settings import SampleSettings
from diffusion_align.engine.backbones import StableDiffusionBackbone
from diffusion_align.engine.policy import Policy
from diffusion_align.errors import UserError
from diffusion_align.math.samplers import DDIMSampler
from diffusion_align.methods.strategies.d3po import D3PO, D3POConfig, render_pairs
from diffusion_align.methods.strategies.ddpo import DDPO, DDPOConfig
from diffusion_align.methods.strategies.prdp import PRDP, PRDPConfig
from diffusion_align.methods.strategies.reward_backprop import AlignProp, AlignPropConfig, DRaFT, DRaFTConfig
from diffusion_align.methods.strategies.sampling import transition_inputs
from diffusion_align.testing import tiny_sd
from rewards.combine import Combined

PROMPTS = [
    "one large blue square at the bottom on a gray background",
    "two small red triangles at the bottom on a gray background",
    "two small yellow squares on the left on a gray background",
    "three small red triangles on the left on a black background",
]
SAMPLE = SampleSettings(num_steps=2, eta=1.0, guidance_scale=5.0, batch_size=4)


def combined(*names, weights=None):
    """The trainer's reward object (`rewards.Combined`) over registered rewards."""
    return Combined({n: rewards.build(n) for n in names}, weights)


def make_policy(seed=0, perturb=True):
    pipe = tiny_sd()
    backbone = StableDiffusionBackbone(pipe)
    policy = Policy(backbone, DDIMSampler.from_scheduler(pipe.scheduler, eta=SAMPLE.eta), rank=4)
    if perturb:  # a non-zero adapter, so A and B both get gradient and the LoRA path is exercised
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return policy


def accumulated_grads(strategy, steps):
    """sum over micro-batches of weight * grad(loss), as the trainer accumulates one optimizer step."""
    params = strategy.policy.parameters()
    for p in params:
        p.grad = None
    for micro in steps:
        loss, _ = strategy.loss(micro)
        (loss * micro["weight"]).backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def assert_same_grads(a, b, tol=1e-5):
    """Equal up to `tol` relative to the largest gradient entry."""
    scale = max(g.abs().max().item() for g in a)
    assert scale > 0, "no gradient at all"
    worst = max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))
    assert worst <= tol * scale, f"accumulated gradients differ by {worst} (scale {scale})"


@pytest.fixture(scope="module")
def policy():
    """One perturbed policy shared by the tests (those that move its weights put them back)."""
    return make_policy()


def one_step(strategy, batch, micro):
    plan = strategy.plan(batch, 4, micro, torch.Generator().manual_seed(5))
    assert len(plan) == 1
    assert abs(sum(m["weight"] for m in plan[0]) - 1) < 1e-9
    return plan[0]


@contextmanager
def restored(policy):
    """Put the LoRA weights back after the block (tests that take a step share the module's policy)."""
    saved = [p.detach().clone() for p in policy.parameters()]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(policy.parameters(), saved, strict=True):
                p.copy_(s)


def descend(strategy, step, size=1e-3):
    """One plain gradient step of fixed length `size` on the strategy's objective for plan step `step`."""
    grads = accumulated_grads(strategy, step)
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    assert norm > 0, "no gradient at all"
    with torch.no_grad():
        for p, g in zip(strategy.policy.parameters(), grads, strict=True):
            p.sub_(size * g / norm)


def log_probs_by_hand(policy, batch, rows, steps):
    """log pi(x_{t-1} | x_t) of `rows`, each at its own step index, from the policy's transition."""
    x_t, x_prev = batch["latents"][rows, steps], batch["latents"][rows, steps + 1]
    with torch.no_grad():
        mean, std = policy.transition(
            x_t, batch["timesteps"][steps], batch["embeds"][rows], SAMPLE.guidance_scale, SAMPLE.num_steps
        )
    return (-((x_prev - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)).mean(
        (1, 2, 3)
    )


# --- DDPO ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddpo_setup(policy):
    strategy = DDPO(
        DDPOConfig(stat_min_count=2, stat_buffer_size=4), policy, combined("shapes_color"), SAMPLE
    )
    batch = strategy.collect(PROMPTS, torch.Generator().manual_seed(0))
    return strategy, batch


def test_ddpo_ratio_is_exactly_one_on_policy(ddpo_setup):
    strategy, batch = ddpo_setup
    assert batch["latents"].shape == (4, 3, 4, 16, 16) and batch["log_probs"].shape == (4, 2)
    for micro in strategy.plan(batch, 4, 2, torch.Generator().manual_seed(1))[0]:
        _, metrics = strategy.loss(micro)
        assert metrics["ratio_max_deviation"] < 1e-6
        assert metrics["clip_fraction"] == 0.0
        assert metrics["approx_kl"] < 1e-12


def test_ddpo_micro_batches_accumulate_to_the_big_batch(ddpo_setup):
    strategy, batch = ddpo_setup
    assert batch["advantages"].abs().sum() > 0
    big, small = one_step(strategy, batch, 4), one_step(strategy, batch, 1)
    assert len(big) == 2 and len(small) == 8  # 2 trained steps per sample
    # float32 noise of a different UNet batch composition, amplified by 1/std^2 of the last (low-noise) step,
    # is ~1e-4 of the gradient here; a wrong weighting would be off by a factor (>= 1e-1)
    assert_same_grads(accumulated_grads(strategy, big), accumulated_grads(strategy, small), tol=2e-4)


def test_ddpo_step_raises_the_likelihood_of_high_advantage_samples(ddpo_setup):
    """One small gradient step on the loss moves log-probs along the advantages: sum A * dlogp > 0."""
    strategy, batch = ddpo_setup
    step = one_step(strategy, batch, 4)
    grads = accumulated_grads(strategy, step)

    def surrogate():
        with torch.no_grad():
            total = 0.0
            for micro in step:
                x_t, x_prev, t, embeds = transition_inputs(batch, micro["rows"], micro["steps"])
                logp = strategy.policy.log_prob(
                    x_t, x_prev, t, embeds, SAMPLE.guidance_scale, SAMPLE.num_steps
                )
                total += (batch["advantages"][micro["rows"]] * logp).sum().item()
            return total

    before = surrogate()
    params = strategy.policy.parameters()
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.sub_(1e-2 * g)
    after = surrogate()
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.add_(1e-2 * g)
    assert after > before


def test_ddpo_groups_normalise_each_prompt_within_its_group(policy):
    config = DDPOConfig(group_size=2, stat_min_count=2, stat_buffer_size=2)
    batch = DDPO(config, policy, combined("shapes_color_soft"), SAMPLE).collect(
        PROMPTS, torch.Generator().manual_seed(0)
    )
    assert batch["prompts"] == [PROMPTS[0]] * 2 + [PROMPTS[2]] * 2
    assert not torch.equal(batch["latents"][0, 0], batch["latents"][1, 0])
    assert batch["metrics"]["advantage/per_prompt_fraction"] == 1.0
    # each prompt's two rewards are standardised by their own mean and population std
    for rows in ([0, 1], [2, 3]):
        r = batch["reward"][rows].double()
        expected = (r - r.mean()) / (r.std(unbiased=False) + 1e-6)
        torch.testing.assert_close(batch["advantages"][rows].double(), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(UserError, match="multiple of strategy.group_size=3"):
        DDPO(DDPOConfig(group_size=3), policy, combined("shapes_color"), SAMPLE).collect(
            PROMPTS, torch.Generator().manual_seed(0)
        )


@pytest.mark.parametrize("strategy_cls, config_cls", [(DDPO, DDPOConfig), (PRDP, PRDPConfig)])
def test_share_initial_noise_gives_a_group_one_x_T_and_its_own_step_noise(policy, strategy_cls, config_cls):
    gen = torch.Generator().manual_seed(0)
    shared = strategy_cls(
        config_cls(group_size=2, share_initial_noise=True), policy, combined("shapes_color"), SAMPLE
    )
    latents = shared.collect(PROMPTS, gen)["latents"]
    assert torch.equal(latents[0, 0], latents[1, 0]) and torch.equal(latents[2, 0], latents[3, 0])
    assert not torch.equal(latents[0, 0], latents[2, 0])  # groups differ
    assert not torch.equal(latents[0, -1], latents[1, -1])  # the step noise is each image's own


def test_ddpo_plan_shuffles_steps_per_sample_and_keeps_the_fraction(ddpo_setup):
    strategy, batch = ddpo_setup
    strategy.config.timestep_fraction = 0.5  # int(2 * 0.5) = 1 trained step per sample
    try:
        plan = strategy.plan(batch, 2, 2, torch.Generator().manual_seed(0))
    finally:
        strategy.config.timestep_fraction = 1.0
    assert len(plan) == 2 and all(len(step) == 1 for step in plan)
    rows = torch.cat([m["rows"] for step in plan for m in step])
    assert sorted(rows.tolist()) == [0, 1, 2, 3]
    full = strategy.plan(batch, 4, 1, torch.Generator().manual_seed(0))[0]
    per_sample = {}
    for m in full:
        per_sample.setdefault(int(m["rows"]), []).append(int(m["steps"]))
    assert all(sorted(v) == [0, 1] for v in per_sample.values())  # a permutation of all steps per sample
    assert len({tuple(v) for v in per_sample.values()}) > 1  # drawn independently per sample


def test_ddpo_timestep_window_trains_only_the_early_steps(ddpo_setup):
    strategy, batch = ddpo_setup
    strategy.config.timestep_window = 0.5  # of 2 steps: only step 0, the noisiest
    try:
        plan = strategy.plan(batch, 4, 1, torch.Generator().manual_seed(0))
    finally:
        strategy.config.timestep_window = 1.0
    assert {int(m["steps"]) for step in plan for m in step} == {0}
    assert abs(sum(m["weight"] for m in plan[0]) - 1) < 1e-9
    with pytest.raises(UserError, match="timestep_window=0"):
        DDPO(DDPOConfig(timestep_window=0.0), strategy.policy, combined("shapes_color"), SAMPLE)


def test_ddpo_kl_term_is_zero_at_the_base_model_and_positive_away_from_it():
    base = make_policy(perturb=False)
    strategy = DDPO(DDPOConfig(beta=0.5), base, combined("shapes_color"), SAMPLE)
    batch = strategy.collect(PROMPTS[:2], torch.Generator().manual_seed(0))
    micro = strategy.plan(batch, 2, 2, torch.Generator().manual_seed(0))[0][0]
    assert strategy.loss(micro)[1]["kl"] == 0.0
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.05)
    assert strategy.loss(micro)[1]["kl"] > 0


def test_ddpo_state_dict_roundtrip(ddpo_setup):
    strategy, _ = ddpo_setup
    state = json.loads(json.dumps(strategy.state_dict()))  # plain data, so torch.save/load is safe too
    fresh = DDPO(DDPOConfig(stat_min_count=2, stat_buffer_size=4), strategy.policy, strategy.reward, SAMPLE)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == strategy.state_dict() and state["tracker"]["buffers"]


def test_gradient_reaches_only_lora_parameters(ddpo_setup):
    strategy, batch = ddpo_setup
    unet = strategy.policy.backbone.unet
    unet.zero_grad(set_to_none=True)
    loss, _ = strategy.loss(strategy.plan(batch, 4, 4, torch.Generator().manual_seed(0))[0][0])
    loss.backward()
    with_grad = {n for n, p in unet.named_parameters() if p.grad is not None}
    assert with_grad and all("lora" in n for n in with_grad)
    assert all(not p.requires_grad for n, p in unet.named_parameters() if "lora" not in n)


# --- D3PO ----------------------------------------------------------------------------------------------
def test_d3po_pairs_share_noise_and_accumulate(policy):
    strategy = D3PO(D3POConfig(), policy, combined("shapes_color_soft"), SAMPLE)
    prompts = [p for p in PROMPTS[:2] for _ in range(2)]
    batch = strategy.collect(prompts, torch.Generator().manual_seed(0))
    lat = batch["latents"]
    assert torch.equal(lat[0::2, 0], lat[1::2, 0])  # the same x_T within a pair
    assert not torch.equal(lat[0::2, 1], lat[1::2, 1])  # different step noise
    assert not torch.equal(lat[0, 0], lat[2, 0])  # pairs do not share noise with each other
    assert batch["prompts"][0::2] == batch["prompts"][1::2]
    assert len(batch["win"]) == 2  # a continuous reward: every pair is decisive
    r = batch["reward"]
    assert (r[batch["win"]] > r[batch["lose"]]).all()
    big, small = one_step(strategy, batch, 4), one_step(strategy, batch, 1)
    assert len(big) == 2 and len(small) == 4  # 2 pairs per step (2 steps each), at least 1 pair per micro
    assert_same_grads(accumulated_grads(strategy, big), accumulated_grads(strategy, small))


class Rounded(rewards.Reward):
    """shapes_color_soft rounded to 3 decimals: a pair's members (one x_T) often tie, but not always."""

    name = "rounded"

    def __init__(self):
        super().__init__()
        self.soft = rewards.build("shapes_color_soft")

    def forward(self, images, prompts):
        return torch.round(self.soft(images, prompts) * 1000) / 1000


def test_d3po_drops_ties_and_spreads_pairs_over_a_fixed_step_count(policy):
    strategy = D3PO(D3POConfig(), policy, Combined({"rounded": Rounded()}), SAMPLE)
    batch = strategy.collect([p for p in PROMPTS for _ in range(2)], torch.Generator().manual_seed(0))
    r = batch["reward"].view(-1, 2)
    untied = [k for k in range(len(r)) if r[k, 0] != r[k, 1]]
    assert 0 < len(untied) < len(r)  # this seed gives both: the test sees a tie dropped and a pair kept
    assert sorted((batch["win"] // 2).tolist()) == untied and (batch["lose"] // 2 == batch["win"] // 2).all()
    assert (batch["reward"][batch["win"]] > batch["reward"][batch["lose"]]).all()
    plan = strategy.plan(batch, 2, 2, torch.Generator().manual_seed(0))  # one pair per optimizer step
    assert len(plan) == len(untied)
    planned = [int(m["pairs"]) for step in plan for m in step[:1]]
    assert sorted(planned) == list(range(len(untied)))  # every kept pair once, one per step
    assert all(int(m["pairs"]) == int(step[0]["pairs"]) for step in plan for m in step)


@pytest.mark.parametrize("swap", [False, True], ids=["as-preferred", "winner-and-loser-swapped"])
def test_d3po_update_raises_the_winners_likelihood_over_the_losers(swap):
    """One step on the D3PO loss raises sum over trained (pair, step) of log pi(winner) - log pi(loser);
    with the labels swapped, the other member's. A loss with its sign flipped fails both."""
    policy = make_policy(perturb=False)  # every ratio 1: inside the clamp, so every pair has a gradient
    strategy = D3PO(D3POConfig(), policy, combined("shapes_color_soft"), SAMPLE)
    batch = strategy.collect([p for p in PROMPTS for _ in range(2)], torch.Generator().manual_seed(0))
    if swap:
        batch["win"], batch["lose"] = batch["lose"], batch["win"]
    (step,) = strategy.plan(batch, 8, 8, torch.Generator().manual_seed(0))

    def margin():
        total = 0.0
        for m in step:
            win, lose = batch["win"][m["pairs"]], batch["lose"][m["pairs"]]
            diff = log_probs_by_hand(policy, batch, win, m["steps"])
            total += (diff - log_probs_by_hand(policy, batch, lose, m["steps"])).sum().item()
        return total

    before = margin()
    descend(strategy, step)
    assert margin() > before


@pytest.mark.parametrize(
    "soft_weight, other, other_weight",
    [(-1.0, "shapes_color", 0.0), (1.0, "jpeg_incompressibility", 0.0), (-2.0, "shapes_color", 1.0)],
)
def test_d3po_prefers_by_the_signed_weights_of_the_trainers_reward(policy, soft_weight, other, other_weight):
    """With the trainer's reward object: each component counts as weight * value, so a negative
    weight is preferred smaller and a zero-weight (log-only) component neither decides nor blocks a pair."""
    from diffusion_align.config.registry import build_reward
    from diffusion_align.config.settings import RewardSettings

    settings = [
        RewardSettings(name="shapes_color_soft", weight=soft_weight),
        RewardSettings(name=other, weight=other_weight),
    ]
    strategy = D3PO(D3POConfig(), policy, build_reward(settings, record=True), SAMPLE)
    batch = strategy.collect([p for p in PROMPTS for _ in range(2)], torch.Generator().manual_seed(3))
    soft = soft_weight * batch["components"]["shapes_color_soft"].view(-1, 2)
    second = other_weight * batch["components"][other].view(-1, 2)
    expected = []  # (winner row, loser row) by hand: dominance on the weighted, non-zero-weight components
    for k in range(len(soft)):
        for w, lose in ((0, 1), (1, 0)):
            at_least = soft[k, w] >= soft[k, lose] and second[k, w] >= second[k, lose]
            better = soft[k, w] > soft[k, lose] or (other_weight != 0 and second[k, w] > second[k, lose])
            if at_least and better:
                expected.append((2 * k + w, 2 * k + lose))
    assert list(zip(batch["win"].tolist(), batch["lose"].tolist(), strict=True)) == expected
    if other_weight == 0:  # the continuous component alone decides every pair
        assert len(expected) == len(soft)


def test_d3po_refuses_a_reward_whose_weights_are_all_zero(policy):
    zero = {"shapes_color_soft": 0.0, "shapes_color": 0.0}
    reward = combined("shapes_color_soft", "shapes_color", weights=zero)
    strategy = D3PO(D3POConfig(), policy, reward, SAMPLE)
    with pytest.raises(UserError, match="every reward weight is 0"):
        strategy.collect(PROMPTS, torch.Generator().manual_seed(0))


def test_d3po_human_labels_regenerate_the_pair_exactly(tmp_path, policy):
    shown = render_pairs(policy, combined("shapes_color"), SAMPLE, [(PROMPTS[0], 7), (PROMPTS[1], 8)])
    assert shown["images"].shape == (4, 3, 32, 32)
    labels = tmp_path / "labels.jsonl"
    labels.write_text(
        json.dumps({"prompt": PROMPTS[0], "seed": 7, "preferred": 1})
        + "\n"
        + json.dumps({"prompt": PROMPTS[1], "seed": 8, "preferred": 0})
        + "\n"
    )
    strategy = D3PO(D3POConfig(human_labels=str(labels)), policy, combined("shapes_color"), SAMPLE)
    batch = strategy.collect(["ignored"] * 4, torch.Generator().manual_seed(0))
    assert torch.equal(batch["latents"], shown["latents"])  # regenerated by the base model from the seed
    assert batch["win"].tolist() == [1, 2] and batch["lose"].tolist() == [0, 3]
    assert strategy.state_dict() == {"cursor": 0}  # two records, two pairs: wrapped around
    # the offline pairs' layout (Pick-a-Pic's label_0, images optional) says the same; bad rows are skipped
    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": PROMPTS[0], "seed": 7, "label_0": 0, "image_0": "a.png", "image_1": "b.png"},
        {"prompt": PROMPTS[0], "seed": 9, "label_0": 0.5},  # a tie: dropped
        {"prompt": PROMPTS[0], "label_0": 1},  # no seed: cannot be regenerated
        {"prompt": PROMPTS[1], "seed": 8, "label_0": 1},
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    again = D3PO(D3POConfig(human_labels=str(pairs)), policy, combined("shapes_color"), SAMPLE)
    batch = again.collect(["ignored"] * 4, torch.Generator().manual_seed(0))
    assert batch["win"].tolist() == [1, 2] and batch["lose"].tolist() == [0, 3]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "seed": 1, "preferred": 2}\n')
    with pytest.raises(UserError, match="bad.jsonl line 1: preferred must be 0"):
        D3PO(D3POConfig(human_labels=str(bad)), policy, combined("shapes_color"), SAMPLE)


# --- PRDP ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prdp_setup(policy):
    strategy = PRDP(
        PRDPConfig(group_size=2, beta=0.1, eps=1e-3),
        policy,
        combined("shapes_color_soft"),
        SAMPLE,
    )
    batch = strategy.collect(PROMPTS, torch.Generator().manual_seed(0))
    return strategy, batch


def test_prdp_groups_share_prompts_with_independent_noise(prdp_setup):
    _, batch = prdp_setup
    assert batch["prompts"] == [PROMPTS[0]] * 2 + [PROMPTS[2]] * 2
    assert not torch.equal(batch["latents"][0, 0], batch["latents"][1, 0])


def test_prdp_ratio_is_exactly_one_on_policy_and_accumulates(prdp_setup):
    strategy, batch = prdp_setup
    big, small = one_step(strategy, batch, 4), one_step(strategy, batch, 2)
    assert len(big) == 1 and len(small) == 2
    _, metrics = strategy.loss(big[0])
    assert metrics["sampling_ratio_max_deviation"] < 1e-6  # re-scored exactly as sampled
    assert metrics["ratio_max_deviation"] < 1e-6 and metrics["clip_fraction"] == 0.0
    assert_same_grads(accumulated_grads(strategy, big), accumulated_grads(strategy, small))


def move_weights(policy, delta):
    """An "optimizer step": every LoRA weight moves by `delta`."""
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(delta)


def deviation_from_sampler(policy, batch):
    """max |exp(log pi_now - log pi_sampler) - 1| over every row and step, computed here (not by PRDP)."""
    n, steps = batch["log_probs"].shape
    now = torch.stack(
        [
            policy.log_prob(
                batch["latents"][:, i],
                batch["latents"][:, i + 1],
                batch["timesteps"][i].expand(n),
                batch["embeds"],
                SAMPLE.guidance_scale,
                SAMPLE.num_steps,
            )
            for i in range(steps)
        ],
        1,
    )
    return (torch.exp(now - batch["log_probs"]) - 1).abs().max().item()


def test_prdp_clips_around_the_policy_that_sampled_each_batch(prdp_setup):
    """Algorithm 1: theta_old <- theta, sample, K updates. After updates on one batch, the next batch's clip
    is centred on its own sampler: ratio exactly 1 before its first update, and after one the deviation
    that PRDP reports is the deviation from the sampler's stored log-probs."""
    strategy, _ = prdp_setup
    policy = strategy.policy
    prdp = PRDP(PRDPConfig(group_size=2, beta=0.1, eps=1e-3), policy, strategy.reward, SAMPLE)
    first = prdp.collect(PROMPTS, torch.Generator().manual_seed(1))
    try:
        for _ in range(2):  # two updates on the first batch
            prdp.loss(one_step(prdp, first, 4)[0])
            move_weights(policy, 1e-2)
        second = prdp.collect(PROMPTS, torch.Generator().manual_seed(2))  # sampled by the moved policy
        micro = one_step(prdp, second, 4)[0]
        _, metrics = prdp.loss(micro)
        assert metrics["ratio_max_deviation"] < 1e-6 and metrics["clip_fraction"] == 0.0
        move_weights(policy, 1e-2)  # one update on the second batch
        expected = deviation_from_sampler(policy, second)
        assert expected > 1e-4  # the update moved the log-probs
        _, metrics = prdp.loss(micro)
        assert metrics["ratio_max_deviation"] == pytest.approx(expected, rel=1e-3, abs=1e-6)
        # a resumed strategy (state from the old one) clips the same batch the same way
        resumed = PRDP(prdp.config, policy, strategy.reward, SAMPLE)
        resumed.load_state_dict(prdp.state_dict())
        assert resumed.loss(micro)[1]["ratio_max_deviation"] == metrics["ratio_max_deviation"]
    finally:
        move_weights(policy, -3e-2)


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["reward", "negated-reward"])
def test_prdp_update_raises_the_log_ratio_of_the_better_sample_of_each_pair(policy, sign):
    """With a tiny beta the target (r_i - r_j) / beta dwarfs every log-ratio difference, so one step raises
    sum over pairs of (r_i - r_j) * (h_i - h_j), h = mean over steps of log pi (the reference is fixed). With
    the reward negated, the other member's. A loss with its sign flipped fails both."""
    reward = combined("shapes_color_soft", weights={"shapes_color_soft": sign})
    strategy = PRDP(PRDPConfig(group_size=2, beta=3e-5, eps=1e-3), policy, reward, SAMPLE)
    batch = strategy.collect(PROMPTS, torch.Generator().manual_seed(0))
    r = batch["reward"]
    assert (r[0::2] != r[1::2]).all() and ((r < 0) if sign < 0 else (r > 0)).all()

    def spread():
        rows, steps = torch.arange(4).repeat_interleave(2), torch.tensor([0, 1] * 4)
        h = log_probs_by_hand(policy, batch, rows, steps).view(4, 2).mean(1)
        return ((r[0::2] - r[1::2]) * (h[0::2] - h[1::2])).sum().item()

    with restored(policy):
        before = spread()
        descend(strategy, one_step(strategy, batch, 4))
        assert spread() > before


def test_prdp_refresh_every_is_refused_with_what_to_do_instead():
    from diffusion_align.config import load_config

    with pytest.raises(ValueError, match="refresh_every was removed"):
        PRDPConfig(refresh_every=10)
    data = {"model": {"pretrained": "shapes"}, "rewards": [{"name": "shapes_color"}]}
    data["strategy"] = {"name": "prdp", "refresh_every": 10}
    with pytest.raises(UserError, match="refresh_every was removed.*num_inner_epochs"):
        load_config(data)


def test_prdp_timestep_window_leaves_late_steps_out(prdp_setup):
    """window 0.5 of 2 steps: h is the first step's log-ratio only, so the last transition cannot move it."""
    strategy, batch = prdp_setup
    config = PRDPConfig(**{**vars(strategy.config), "timestep_window": 0.5})
    windowed = PRDP(config, strategy.policy, strategy.reward, SAMPLE)

    def loss_with_last_latent_moved(prdp, shift):
        moved = {**batch, "latents": batch["latents"].clone()}
        moved["latents"][:, -1] += shift
        moved["ref_log_probs"] = torch.full_like(batch["log_probs"], float("nan"))
        return prdp.loss(one_step(prdp, moved, 4)[0])[0].item()

    assert loss_with_last_latent_moved(windowed, 0.5) == loss_with_last_latent_moved(windowed, 0.0)
    full = PRDP(strategy.config, strategy.policy, strategy.reward, SAMPLE)
    assert loss_with_last_latent_moved(full, 0.5) != loss_with_last_latent_moved(full, 0.0)
    with pytest.raises(UserError, match="timestep_window=0 must be in"):
        PRDP(PRDPConfig(timestep_window=0), strategy.policy, strategy.reward, SAMPLE)


# --- reward backprop -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls, config",
    [
        (AlignProp, AlignPropConfig(truncation="fixed", truncation_fixed=1)),
        (DRaFT, DRaFTConfig(k=1, lv_draws=2)),
    ],
    ids=["alignprop", "draft-lv"],
)
def test_reward_backprop_accumulates_with_the_same_noise(cls, config, policy):
    strategy = cls(config, policy, combined("shapes_color_soft"), SAMPLE)
    batch = strategy.collect(PROMPTS, torch.Generator().manual_seed(0))
    big, small = one_step(strategy, batch, 4), one_step(strategy, batch, 1)
    assert len(big) == 1 and len(small) == 4
    assert_same_grads(accumulated_grads(strategy, big), accumulated_grads(strategy, small))


def window_objective_by_hand(strategy, batch, cut):
    """Mean reward of the re-run from each stored latent at `cut`: steps cut..S-1 through the policy's
    transition with each sample's re-run noise (seeded from batch["noise_seeds"]), decoded and scored.
    Differentiable in the LoRA weights; everything before the cut is the stored, constant latent."""
    policy = strategy.policy
    gens = [torch.Generator().manual_seed(seed) for seed in batch["noise_seeds"]]
    x = batch["latents"][:, cut]
    for i in range(cut, len(batch["timesteps"])):
        t = batch["timesteps"][i]
        mean, std = policy.transition(x, t, batch["embeds"], SAMPLE.guidance_scale, SAMPLE.num_steps)
        x = mean + std * randn_tensor(x.shape, generator=gens, dtype=mean.dtype)
    return strategy.reward.score(policy.backbone.decode(x), batch["prompts"])[0].float().mean()


@pytest.mark.parametrize("k", [1, 0], ids=["draft-k1", "draft-full"])
def test_draft_gradient_is_the_gradient_of_its_window_re_run(policy, k):
    """DRaFT-K's gradient is that of -loss_scale * reward of the last k steps re-run from the stored latent
    (steps outside the window contribute nothing); the full chain (k = 0) re-runs from x_T."""
    strategy = DRaFT(DRaFTConfig(k=k, loss_scale=0.5), policy, combined("shapes_color_soft"), SAMPLE)
    batch = strategy.collect(PROMPTS[:2], torch.Generator().manual_seed(0))
    micro = one_step(strategy, batch, 2)[0]
    cut = SAMPLE.num_steps - k if k else 0
    assert micro["cut"] == cut
    params = policy.parameters()
    loss, metrics = strategy.loss(micro)
    assert metrics["grad_steps"] == SAMPLE.num_steps - cut
    ours = torch.autograd.grad(loss, params)
    expected = torch.autograd.grad(-0.5 * window_objective_by_hand(strategy, batch, cut), params)
    assert_same_grads(list(ours), list(expected))
    if k == 1:  # the window matters: the full chain's gradient is another one
        full = torch.autograd.grad(-0.5 * window_objective_by_hand(strategy, batch, 0), params)
        assert max((a - b).abs().max().item() for a, b in zip(ours, full, strict=True)) > 1e-3 * max(
            g.abs().max().item() for g in ours
        )


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["reward", "negated-reward"])
@pytest.mark.parametrize(
    "cls, config",
    [
        (AlignProp, AlignPropConfig(truncation="fixed", truncation_fixed=1)),
        (DRaFT, DRaFTConfig(k=1)),
        (DRaFT, DRaFTConfig(k=0)),
    ],
    ids=["alignprop", "draft-k1", "draft-full"],
)
def test_reward_backprop_update_raises_the_reward(policy, cls, config, sign):
    """One step raises the reward of the window's re-run (measured by hand); with the reward negated, the
    negated reward. A loss with its sign flipped fails both."""
    reward = combined("shapes_color_soft", weights={"shapes_color_soft": sign})
    strategy = cls(config, policy, reward, SAMPLE)
    batch = strategy.collect(PROMPTS, torch.Generator().manual_seed(0))
    step = one_step(strategy, batch, 4)
    with restored(policy):
        with torch.no_grad():
            before = window_objective_by_hand(strategy, batch, step[0]["cut"]).item()
        descend(strategy, step)
        with torch.no_grad():
            after = window_objective_by_hand(strategy, batch, step[0]["cut"]).item()
    assert after > before


def test_reward_backprop_rejects_a_non_differentiable_reward(policy):
    reward = combined("shapes_color_soft", "jpeg_compressibility")
    with pytest.raises(UserError, match="component 'jpeg_compressibility' is not differentiable"):
        AlignProp(AlignPropConfig(), policy, reward, SAMPLE)
    with pytest.raises(UserError, match="DRaFT-LV"):
        DRaFT(DRaFTConfig(k=2, lv_draws=2), policy, combined("shapes_color_soft"), SAMPLE)
