"""The objectives on small tensors against values worked out by hand (in the comments); the stat tracker."""

import math

import pytest
import torch

from diffusion_align.math.losses import (
    clip_advantages,
    d3po_loss,
    group_pairs,
    ppo_clip_loss,
    prdp_loss,
    preference_pairs,
    sample_truncation,
)
from diffusion_align.math.stat_tracking import PerPromptStatTracker


def close(a, b, tol=1e-5):
    return torch.allclose(
        torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol
    )


def test_clip_advantages():
    assert clip_advantages(torch.tensor([-7.0, 3.0, 6.0]), 5.0).tolist() == [-5.0, 3.0, 5.0]


def test_ppo_clip_loss_by_hand():
    # ratios 1.2, 0.5, 1.0; A = 1, -2, 3; clip 0.1
    # s1: max(-1.2, -1 * 1.1) = -1.1   s2: max(2 * 0.5, 2 * 0.9) = 1.8   s3: -3
    log_prob = torch.tensor([math.log(1.2), math.log(0.5), 0.0], requires_grad=True)
    loss, ratio, approx_kl, clip_fraction = ppo_clip_loss(
        log_prob, torch.zeros(3), torch.tensor([1.0, -2.0, 3.0]), 0.1
    )
    assert close(loss, [-1.1, 1.8, -3.0])
    assert close(ratio, [1.2, 0.5, 1.0])
    # 0.5 * mean(ln(1.2)^2, ln(0.5)^2, 0) = 0.5 * (0.0332412 + 0.4804530) / 3 = 0.0856157
    assert close(approx_kl, 0.0856157)
    assert close(clip_fraction, 2 / 3)
    loss.sum().backward()
    # clipped branches have no gradient; s3: d(-3 * exp(x))/dx = -3
    assert close(log_prob.grad, [0.0, 0.0, -3.0])


def test_d3po_loss_clamps_inside_the_sigmoid():
    # winner ratio 1.05 (inside [0.9, 1.1]), loser ratio 0.8 -> clamped to 0.9
    # inside = 0.1 * ln 1.05 - 0.1 * ln 0.9 = 0.1 * (0.0487902 + 0.1053605) = 0.0154151
    # loss = ln(1 + exp(-0.0154151)) = 0.6854694
    lw = torch.tensor([math.log(1.05), 0.0], requires_grad=True)
    ll = torch.tensor([math.log(0.8), 0.0], requires_grad=True)
    loss, accuracy = d3po_loss(lw, torch.zeros(2), ll, torch.zeros(2), beta=0.1, eps=0.1)
    assert close(loss, [0.6854694, math.log(2)])  # second pair: both ratios 1 -> -log sigmoid(0) = ln 2
    assert accuracy.tolist() == [1.0, 0.0]
    loss.sum().backward()
    assert ll.grad[0] == 0  # clamped: no gradient
    # d/dx -log sigmoid(0.1 x) at x = ln 1.05... = -0.1 * sigmoid(-inside) = -0.1 * 0.4961463
    assert close(lw.grad[0], -0.04961463)
    # 0.8 -> 0.9 is the fixed clamp (d3po#4); the old 0.8-1.2 range would leave it unclamped
    loss_wide, _ = d3po_loss(lw.detach(), torch.zeros(2), ll.detach(), torch.zeros(2), beta=0.1, eps=0.2)
    assert not close(loss_wide[0], loss[0].detach())


def test_d3po_loss_stays_finite_for_far_off_ratios():
    """A late tiny-sigma step can move a log-prob by hundreds: exp() would overflow to inf and the clamp's
    zero gradient times inf is NaN (seen at lr 3e-3 on the shapes recipe). Clamped: simply no gradient."""
    lw = torch.tensor([800.0, -800.0], requires_grad=True)
    ll = torch.tensor([-800.0, 800.0], requires_grad=True)
    loss, _ = d3po_loss(lw, torch.zeros(2), ll, torch.zeros(2), beta=0.1, eps=0.1)
    loss.sum().backward()
    inside = 0.1 * (math.log(1.1) - math.log(0.9))
    assert close(loss, [math.log1p(math.exp(-inside)), math.log1p(math.exp(inside))])
    assert lw.grad.tolist() == [0.0, 0.0] and ll.grad.tolist() == [0.0, 0.0]


def test_pareto_preference():
    rewards = torch.tensor(
        [
            [[1.0, 2.0], [0.0, 2.0]],  # first dominates
            [[1.0, 0.0], [0.0, 1.0]],  # incomparable
            [[1.0, 1.0], [1.0, 1.0]],  # tie
            [[0.0, 1.0], [1.0, 1.0]],  # second dominates
        ]
    )
    winner, decisive = preference_pairs(rewards)
    assert decisive.tolist() == [True, False, False, True]
    assert winner[decisive].tolist() == [0, 1]
    winner, decisive = preference_pairs(torch.tensor([[[0.2], [0.7]]]))  # one component: larger total wins
    assert winner.tolist() == [1] and decisive.tolist() == [True]


def test_pareto_preference_uses_the_signed_weights():
    rewards = torch.tensor(
        [
            [[1.0, 2.0], [0.0, 2.0]],  # unweighted: first dominates
            [[1.0, 2.0], [1.0, 0.0]],  # unweighted: first dominates
            [[0.0, 1.0], [1.0, 0.0]],  # unweighted: incomparable
        ]
    )
    # weights (-1, 1), component 0 a cost: (-1, 2) vs (0, 2) -> second; (-1, 2) vs (-1, 0) -> first;
    # (0, 1) vs (-1, 0) -> first
    winner, decisive = preference_pairs(rewards, torch.tensor([-1.0, 1.0]))
    assert decisive.tolist() == [True, True, True] and winner.tolist() == [1, 0, 0]
    # weights (1, 0), component 1 log-only: 1 vs 0 -> first; 1 vs 1 tie; 0 vs 1 -> second
    winner, decisive = preference_pairs(rewards, torch.tensor([1.0, 0.0]))
    assert decisive.tolist() == [True, False, True] and winner[decisive].tolist() == [0, 1]
    # positive weights of any size: the unweighted Pareto order
    winner, decisive = preference_pairs(rewards, torch.tensor([2.0, 0.5]))
    assert decisive.tolist() == [True, True, False] and winner[decisive].tolist() == [0, 0]
    _, decisive = preference_pairs(rewards, torch.tensor([0.0, 0.0]))  # nothing counts: nothing decisive
    assert decisive.tolist() == [False, False, False]


def test_prdp_loss_by_hand():
    # h_t: sample 0 [0.3, 0.1], sample 1 [0.0, 0.2]; old = 0; eps = 0.15; rewards 1.0, 0.5; beta 1
    # h = [0.2, 0.1]; target 0.5; unclipped (0.2 - 0.1 - 0.5)^2 = 0.16
    # clipped h_t: [0.15, 0.1], [0.0, 0.15] -> h = [0.125, 0.075]; (0.05 - 0.5)^2 = 0.2025; max = 0.2025
    log_ratio = torch.tensor([[0.3, 0.1], [0.0, 0.2]], requires_grad=True)
    loss, clipped = prdp_loss(
        log_ratio,
        torch.zeros(2, 2),
        torch.tensor([1.0, 0.5]),
        torch.tensor([0]),
        torch.tensor([1]),
        1.0,
        0.15,
    )
    assert close(loss, [0.2025])
    assert clipped.tolist() == [[True, False], [False, True]]
    loss.sum().backward()
    # the clipped branch is active: gradient only through the unclipped steps, 2 * (-0.45) * (+-1/2)
    assert close(log_ratio.grad, [[0.0, -0.45], [0.45, 0.0]])
    # with a wide clip the unclipped loss is the larger: 0.16
    loss, _ = prdp_loss(
        log_ratio, torch.zeros(2, 2), torch.tensor([1.0, 0.5]), torch.tensor([0]), torch.tensor([1]), 1.0, 1.0
    )
    assert close(loss, [0.16])


def test_group_pairs_within_groups_winner_first_without_ties():
    # group 0: rewards 1, 2, 2 -> (1, 0), (2, 0); (1, 2) tie dropped.  group 1: 5, 3 -> (3, 4)
    first, second = group_pairs(torch.tensor([0, 0, 0, 1, 1]), torch.tensor([1.0, 2.0, 2.0, 5.0, 3.0]))
    assert sorted(zip(first.tolist(), second.tolist(), strict=True)) == [(1, 0), (2, 0), (3, 4)]


def test_alignprop_truncation_distribution():
    g = torch.Generator().manual_seed(0)
    cuts = torch.tensor([sample_truncation(50, "gaussian", generator=g) for _ in range(4000)]).float()
    assert cuts.min() >= 1 and cuts.max() <= 49
    # N(42, 5) redrawn above 50: truncated-normal mean 42 - 5 * phi(1.6) / Phi(1.6) = 42 - 5 * 0.11735
    # = 41.41, std 5 * sqrt(1 - 1.6 * 0.11735 - 0.11735^2) = 4.47; int() floors: mean - 0.5 = 40.91
    # (standard error 0.07)
    assert 40.7 < cuts.mean() < 41.1 and 4.25 < cuts.std() < 4.7
    assert 6 < (50 - cuts).mean() < 10  # ~8 trained steps: a contiguous tail cut..49
    uniform = torch.tensor([sample_truncation(50, "uniform", generator=g) for _ in range(3000)])
    assert uniform.min() == 1 and uniform.max() == 49  # [0, 50) with 0 rejected
    assert sample_truncation(50, "fixed") == 49  # K = 1
    short = [sample_truncation(4, "gaussian", mean=2.0, std=5.0, generator=g) for _ in range(200)]
    assert set(short) <= {1, 2, 3}  # redrawn until in [1, steps)
    with pytest.raises(ValueError, match="outside"):
        sample_truncation(10, "fixed", fixed=49)


def test_stat_tracker_per_prompt_and_fallback():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    adv, per_prompt = tracker.update(["a", "a", "b"], [1.0, 3.0, 5.0])
    # a: 2 rewards >= min_count -> own mean 2, std 1 -> -1, 1
    # b: 1 reward -> batch mean 3, std sqrt(8/3) = 1.632993 -> 2 / 1.632993 = 1.224745
    assert close(adv, [-1.0, 1.0, 1.224745])
    assert per_prompt == pytest.approx(2 / 3)
    adv, _ = tracker.update(["b"], [7.0])  # b: [5, 7] -> mean 6, std 1
    assert close(adv, [1.0])
    adv, _ = tracker.update(["a"] * 3, [10.0] * 3)  # a keeps the last 4: [3, 10, 10, 10]
    # mean 8.25, std sqrt((5.25^2 + 3 * 1.75^2) / 4) = 3.031089 -> 1.75 / 3.031089 = 0.577350
    assert close(adv, [0.57735] * 3)
    restored = PerPromptStatTracker(4, 2)
    restored.load_state_dict(tracker.state_dict())
    assert restored.state_dict() == tracker.state_dict()
    assert close(restored.update(["b"], [6.0])[0], tracker.update(["b"], [6.0])[0])
