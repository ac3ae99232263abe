"""Strategies on the tiny SD pipeline (32x32, 2 DDIM steps): on-policy ratio 1, micro-batch x accumulation
equals one big batch, pairs/groups as published, gradients only in the LoRA, clear errors, resume state."""

import json

import pytest
import torch

import rewards
from diffusion_align.backbones import StableDiffusionBackbone
from diffusion_align.errors import UserError
from diffusion_align.policy import Policy
from diffusion_align.samplers import DDIMSampler
from diffusion_align.settings import SampleSettings
from diffusion_align.strategies.d3po import D3PO, D3POConfig, render_pairs
from diffusion_align.strategies.ddpo import DDPO, DDPOConfig, transition_inputs
from diffusion_align.strategies.prdp import PRDP, PRDPConfig
from diffusion_align.strategies.reward_backprop import AlignProp, AlignPropConfig, DRaFT, DRaFTConfig
from diffusion_align.testing import tiny_sd
from rewards.combine import Combined

PROMPTS = [
    "one large blue square at the bottom on a gray background",
    "two small red triangles at the bottom on a gray background",
    "two small yellow squares on the left on a gray background",
    "three small red triangles on the left on a black background",
]
SAMPLE = SampleSettings(num_steps=2, eta=1.0, guidance_scale=5.0, batch_size=4)


class Reward:
    """The trainer's reward contract over `rewards.Combined`: (total (B,), {name: (B,)}), `differentiable`."""

    def __init__(self, *names, weights=None):
        self.combined = Combined({n: rewards.build(n) for n in names}, weights)
        self.differentiable = self.combined.differentiable

    def __call__(self, images, prompts):
        return self.combined.score(images, prompts)


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


# --- DDPO ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddpo_setup(policy):
    strategy = DDPO(DDPOConfig(stat_min_count=2, stat_buffer_size=4), policy, Reward("shapes_color"), SAMPLE)
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
    batch = DDPO(config, policy, Reward("shapes_color_soft"), SAMPLE).collect(
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
        DDPO(DDPOConfig(group_size=3), policy, Reward("shapes_color"), SAMPLE).collect(
            PROMPTS, torch.Generator().manual_seed(0)
        )


@pytest.mark.parametrize("strategy_cls, config_cls", [(DDPO, DDPOConfig), (PRDP, PRDPConfig)])
def test_share_initial_noise_gives_a_group_one_x_T_and_its_own_step_noise(policy, strategy_cls, config_cls):
    gen = torch.Generator().manual_seed(0)
    shared = strategy_cls(
        config_cls(group_size=2, share_initial_noise=True), policy, Reward("shapes_color"), SAMPLE
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
        DDPO(DDPOConfig(timestep_window=0.0), strategy.policy, Reward("shapes_color"), SAMPLE)


def test_ddpo_kl_term_is_zero_at_the_base_model_and_positive_away_from_it():
    base = make_policy(perturb=False)
    strategy = DDPO(DDPOConfig(beta=0.5), base, Reward("shapes_color"), SAMPLE)
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
    strategy = D3PO(D3POConfig(), policy, Reward("shapes_color_soft"), SAMPLE)
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


def test_d3po_drops_ties_and_spreads_pairs_over_a_fixed_step_count(policy):
    strategy = D3PO(D3POConfig(), policy, Reward("shapes_color"), SAMPLE)  # values in {0, .5, 1}: ties
    batch = strategy.collect([p for p in PROMPTS for _ in range(2)], torch.Generator().manual_seed(3))
    r = batch["reward"].view(-1, 2)
    assert len(batch["win"]) == int((r[:, 0] != r[:, 1]).sum())
    plan = strategy.plan(batch, 2, 2, torch.Generator().manual_seed(0))
    assert len(plan) == max(1, len(batch["win"]))
    for step in plan:
        loss, _ = strategy.loss(step[0])
        assert torch.isfinite(loss) and loss.requires_grad


@pytest.mark.parametrize(
    "soft_weight, other, other_weight",
    [(-1.0, "shapes_color", 0.0), (1.0, "jpeg_incompressibility", 0.0), (-2.0, "shapes_color", 1.0)],
)
def test_d3po_prefers_by_the_signed_weights_of_the_trainers_reward(policy, soft_weight, other, other_weight):
    """Through the trainer's own reward wrappers: each component counts as weight * value, so a negative
    weight is preferred smaller and a zero-weight (log-only) component neither decides nor blocks a pair."""
    from diffusion_align.registry import build_reward
    from diffusion_align.settings import RewardSettings
    from diffusion_align.trainer import RecordingReward

    settings = [
        RewardSettings(name="shapes_color_soft", weight=soft_weight),
        RewardSettings(name=other, weight=other_weight),
    ]
    strategy = D3PO(D3POConfig(), policy, RecordingReward(build_reward(settings)), SAMPLE)
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
    reward = Reward("shapes_color_soft", "shapes_color", weights=zero)
    strategy = D3PO(D3POConfig(), policy, reward, SAMPLE)
    with pytest.raises(UserError, match="every reward weight is 0"):
        strategy.collect(PROMPTS, torch.Generator().manual_seed(0))


def test_d3po_human_labels_regenerate_the_pair_exactly(tmp_path, policy):
    shown = render_pairs(policy, Reward("shapes_color"), SAMPLE, [(PROMPTS[0], 7), (PROMPTS[1], 8)])
    assert shown["images"].shape == (4, 3, 32, 32)
    labels = tmp_path / "labels.jsonl"
    labels.write_text(
        json.dumps({"prompt": PROMPTS[0], "seed": 7, "preferred": 1})
        + "\n"
        + json.dumps({"prompt": PROMPTS[1], "seed": 8, "preferred": 0})
        + "\n"
    )
    strategy = D3PO(D3POConfig(human_labels=str(labels)), policy, Reward("shapes_color"), SAMPLE)
    batch = strategy.collect(["ignored"] * 4, torch.Generator().manual_seed(0))
    assert torch.equal(batch["latents"], shown["latents"])  # regenerated by the base model from the seed
    assert batch["win"].tolist() == [1, 2] and batch["lose"].tolist() == [0, 3]
    assert strategy.state_dict() == {"cursor": 0}  # two records, two pairs: wrapped around
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "seed": 1, "preferred": 2}\n')
    with pytest.raises(UserError, match="bad.jsonl:1: preferred must be 0"):
        D3PO(D3POConfig(human_labels=str(bad)), policy, Reward("shapes_color"), SAMPLE)


# --- PRDP ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prdp_setup(policy):
    strategy = PRDP(
        PRDPConfig(group_size=2, beta=0.1, eps=1e-3),
        policy,
        Reward("shapes_color_soft"),
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
    strategy = cls(config, policy, Reward("shapes_color_soft"), SAMPLE)
    batch = strategy.collect(PROMPTS, torch.Generator().manual_seed(0))
    big, small = one_step(strategy, batch, 4), one_step(strategy, batch, 1)
    assert len(big) == 1 and len(small) == 4
    assert_same_grads(accumulated_grads(strategy, big), accumulated_grads(strategy, small))


def test_draft_windows(policy):
    strategy = DRaFT(DRaFTConfig(k=1), policy, Reward("shapes_color_soft"), SAMPLE)
    batch = strategy.collect(PROMPTS[:2], torch.Generator().manual_seed(0))
    micro = one_step(strategy, batch, 2)[0]
    assert micro["cut"] == 1
    for p in policy.parameters():
        p.grad = None
    loss, metrics = strategy.loss(micro)
    loss.backward()
    assert metrics["grad_steps"] == 1.0 and all(p.grad is not None for p in policy.parameters())
    full = DRaFT(DRaFTConfig(k=0), policy, Reward("shapes_color_soft"), SAMPLE)
    assert one_step(full, batch, 2)[0]["cut"] == 0  # the whole chain from x_T


def test_reward_backprop_rejects_a_non_differentiable_reward(policy):
    reward = Reward("shapes_color_soft", "jpeg_compressibility")
    with pytest.raises(UserError, match="component 'jpeg_compressibility' is not differentiable"):
        AlignProp(AlignPropConfig(), policy, reward, SAMPLE)
    with pytest.raises(UserError, match="DRaFT-LV"):
        DRaFT(DRaFTConfig(k=2, lv_draws=2), policy, Reward("shapes_color_soft"), SAMPLE)
