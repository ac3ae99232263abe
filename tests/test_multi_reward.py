"""Several rewards at once on the tiny SD pipeline: Parrot's Pareto selection in DDPO / Flow-GRPO trains
exactly the non-dominated samples (checked against a front found by hand), and gradient balancing in reward
backprop steps along the min-norm point of the per-reward gradients (each gradient taken from a one-reward
run, the two-vector solve written out by hand)."""

import pytest
import torch

import rewards
from diffusion_align.errors import UserError
from diffusion_align.methods.strategies.ddpo import DDPO, DDPOConfig
from diffusion_align.methods.strategies.reward_backprop import DRaFT, DRaFTConfig
from rewards.combine import Combined
from tests.test_strategies import PROMPTS, SAMPLE, make_policy


@pytest.fixture(scope="module")
def policy():
    return make_policy(seed=1)


def colour_and_size(weights=(1.0, -1.0)):
    """A continuous colour reward and the JPEG size (negative weight: smaller files preferred)."""
    parts = {"colour": rewards.build("shapes_color_soft"), "jpeg": rewards.build("jpeg_incompressibility")}
    return Combined(parts, dict(zip(parts, weights, strict=True)))


def front_by_hand(objectives: list[tuple[float, float]], groups: list[int]) -> list[bool]:
    keep = []
    for i, a in enumerate(objectives):
        beaten = any(
            groups[j] == groups[i]
            and all(x >= y for x, y in zip(b, a, strict=True))
            and any(x > y for x, y in zip(b, a, strict=True))
            for j, b in enumerate(objectives)
        )
        keep.append(not beaten)
    return keep


@pytest.mark.parametrize("scope", ["batch", "prompt"])
def test_pareto_selection_trains_exactly_the_non_dominated_samples(policy, scope):
    prompts, gens = PROMPTS[:2] * 4, lambda: [torch.Generator().manual_seed(i) for i in range(8)]
    config = dict(group_size=4, advantages="group", timestep_fraction=1.0)
    plain = DDPO(DDPOConfig(**config), policy, colour_and_size(), SAMPLE).collect(prompts, gens())
    strategy = DDPO(DDPOConfig(**config, pareto_selection=scope), policy, colour_and_size(), SAMPLE)
    batch = strategy.collect(prompts, gens())
    colour, jpeg = batch["components"]["colour"].tolist(), batch["components"]["jpeg"].tolist()
    assert torch.equal(batch["components"]["colour"], plain["components"]["colour"])  # same samples
    groups = [0] * 8 if scope == "batch" else [prompts[0::4].index(p) for p in batch["prompts"]]
    keep = front_by_hand([(c, -j) for c, j in zip(colour, jpeg, strict=True)], groups)
    assert 0 < sum(keep) < 8, "a degenerate batch: every or no sample on the front"
    expected = torch.where(torch.tensor(keep), plain["advantages"], torch.zeros(8))
    assert torch.equal(batch["advantages"], expected)
    assert batch["metrics"]["pareto/front_fraction"] == sum(keep) / 8
    rows = {int(r) for step in strategy.plan(batch, 8, 2, torch.Generator()) for m in step for r in m["rows"]}
    assert rows == {i for i in range(8) if keep[i] and expected[i] != 0}


def test_pareto_selection_needs_two_weighted_rewards(policy):
    with pytest.raises(UserError, match="pareto_selection=batch needs at least two rewards"):
        DDPO(DDPOConfig(pareto_selection="batch"), policy, colour_and_size((1.0, 0.0)), SAMPLE)


def flat(grads) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("normalize", [True, False], ids=["unit", "raw"])
def test_gradient_balance_steps_along_the_min_norm_point_of_the_reward_gradients(policy, normalize):
    """Unit gradients (the default): two of them always meet at a = 1/2, the bisector, whatever their
    scales; raw gradients (classic MGDA): the shorter one gets the larger share."""
    two = {
        "colour": rewards.build("shapes_color_soft"),
        "sharp": rewards.build("shapes_color_soft", sigma=0.05),
    }
    weights = {"colour": 1.0, "sharp": 3.0}
    strategy = DRaFT(
        DRaFTConfig(k=1, loss_scale=0.5, gradient_balance=True, balance_normalize=normalize),
        policy,
        Combined(two, weights),
        SAMPLE,
    )
    batch = strategy.collect(PROMPTS[:2], torch.Generator().manual_seed(0))
    micro = strategy.plan(batch, 2, 2, torch.Generator())[0][0]
    params = policy.parameters()
    loss, metrics = strategy.loss(micro)
    ours = flat(torch.autograd.grad(loss, params)).double()

    def alone(name):  # the gradient of -0.5 * w * mean r of one reward, from a plain one-reward DRaFT
        one = DRaFT(
            DRaFTConfig(k=1, loss_scale=0.5),
            policy,
            Combined({name: two[name]}, {name: weights[name]}),
            SAMPLE,
        )
        return flat(torch.autograd.grad(one.loss(micro)[0], params)).double()

    u1, u2 = (g / g.norm() if normalize else g for g in (alone("colour"), alone("sharp")))
    a = ((u2 @ u2 - u1 @ u2) / (u1 - u2).square().sum()).clamp(0, 1)  # argmin_a |a u1 + (1 - a) u2|^2
    expected = a * u1 + (1 - a) * u2
    assert torch.allclose(ours, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())
    assert abs(metrics["balance/colour"] - a.item()) < 1e-6
    assert abs(metrics["balance/min_cosine"] - (u1 @ u2 / (u1.norm() * u2.norm())).item()) < 1e-5
    assert normalize == (abs(a.item() - 0.5) < 1e-6)
    # not the weighted sum's direction (what the step would be without balancing)
    summed = alone("colour") + alone("sharp")
    assert (ours @ summed / (ours.norm() * summed.norm())).item() < 1 - 1e-3


def test_gradient_balance_smooths_its_coefficients_and_resumes_them(policy):
    two = {
        "colour": rewards.build("shapes_color_soft"),
        "sharp": rewards.build("shapes_color_soft", sigma=0.05),
    }
    config = DRaFTConfig(k=1, gradient_balance=True, balance_normalize=False, balance_ema=0.5)
    strategy = DRaFT(config, policy, Combined(two), SAMPLE)
    batch = strategy.collect(PROMPTS, torch.Generator().manual_seed(0))
    first, second = strategy.plan(batch, 2, 2, torch.Generator())
    a1 = strategy.loss(first[0])[1]["balance/colour"]
    fresh = DRaFT(
        DRaFTConfig(k=1, gradient_balance=True, balance_normalize=False), policy, Combined(two), SAMPLE
    )
    raw = fresh.loss(second[0])[1]["balance/colour"]  # the second micro-batch's own solution
    resumed = DRaFT(config, policy, Combined(two), SAMPLE)
    resumed.load_state_dict(strategy.state_dict())
    a2 = resumed.loss(second[0])[1]["balance/colour"]
    assert abs(a2 - (0.5 * a1 + 0.5 * raw)) < 1e-6
    assert abs(raw - a1) > 1e-4  # the two micro-batches disagree, so the smoothing is visible


def test_gradient_balance_needs_two_weighted_rewards(policy):
    with pytest.raises(UserError, match="gradient_balance needs at least two rewards"):
        DRaFT(
            DRaFTConfig(gradient_balance=True),
            policy,
            Combined({"c": rewards.build("shapes_color_soft")}),
            SAMPLE,
        )
