"""Pareto fronts and min-norm gradient combinations against hand-solved cases and a brute-force search."""

import itertools

import torch

from diffusion_align.math.multi_objective import min_norm_coefficients, non_dominated, signed_objectives


def gram(*vectors):
    g = torch.tensor(vectors, dtype=torch.float64)
    return g @ g.T


def test_min_norm_two_gradients_hand_solved():
    # g1 = (1, 0), g2 = (0, 2): |a g1 + (1 - a) g2|^2 = a^2 + 4 (1 - a)^2, least at 2a = 8(1 - a): a = 0.8
    alpha = min_norm_coefficients(gram((1.0, 0.0), (0.0, 2.0)))
    assert torch.allclose(alpha, torch.tensor([0.8, 0.2], dtype=torch.float64))
    # the combined direction (0.8, 0.4) has the same inner product (0.8) with both gradients
    d = 0.8 * torch.tensor([1.0, 0.0]) + 0.2 * torch.tensor([0.0, 2.0])
    assert torch.allclose(d @ torch.tensor([1.0, 0.0]), d @ torch.tensor([0.0, 2.0]))


def test_min_norm_keeps_the_shorter_of_two_aligned_gradients():
    # g2 = 2 g1: every combination is (2 - a) g1, shortest at a = 1
    assert torch.allclose(
        min_norm_coefficients(gram((1.0, 0.0), (2.0, 0.0))), torch.tensor([1.0, 0.0]).double()
    )
    # opposite gradients: the zero vector at a = 2/3 for g1 = (1, 0), g2 = (-2, 0)
    assert torch.allclose(
        min_norm_coefficients(gram((1.0, 0.0), (-2.0, 0.0))), torch.tensor([2 / 3, 1 / 3]).double()
    )


def test_min_norm_three_gradients_matches_a_brute_force_search():
    vectors = torch.tensor([[1.0, 0.2, 0.0], [0.1, 1.5, -0.3], [-0.4, 0.6, 2.0]], dtype=torch.float64)
    alpha = min_norm_coefficients(vectors @ vectors.T)
    assert torch.all(alpha >= 0) and abs(alpha.sum().item() - 1) < 1e-9
    found = (alpha @ vectors).norm().item()
    steps = 200
    best = min(
        ((i / steps) * vectors[0] + (j / steps) * vectors[1] + ((steps - i - j) / steps) * vectors[2])
        .norm()
        .item()
        for i, j in itertools.product(range(steps + 1), repeat=2)
        if i + j <= steps
    )
    assert found <= best + 1e-6


def test_non_dominated_on_a_hand_made_batch():
    scores = torch.tensor([[1, 1], [2, 0], [0, 2], [0.5, 0.5], [1, 0], [1, 1]], dtype=torch.float32)
    # (0.5, 0.5) and (1, 0) are beaten by (1, 1); the two equal (1, 1) rows do not beat each other
    assert non_dominated(scores).tolist() == [True, True, True, False, False, True]
    # a front per group: in the second group (0.5, 0.5), (1, 0), (1, 1) only (1, 1) survives
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    assert non_dominated(scores, groups).tolist() == [True, True, True, False, False, True]
    groups = torch.tensor([0, 1, 1, 0, 0, 1])
    # group 0: (1, 1), (0.5, 0.5), (1, 0) -> only (1, 1); group 1: (2, 0), (0, 2), (1, 1) -> all three
    assert non_dominated(scores, groups).tolist() == [True, True, True, False, False, True]
    groups = torch.tensor([0, 1, 1, 2, 2, 1])
    # group 2 alone: (0.5, 0.5) vs (1, 0) are incomparable, both kept
    assert non_dominated(scores, groups).tolist() == [True, True, True, True, True, True]


def test_signed_objectives_flip_negative_weights_and_drop_log_only_ones():
    scores = torch.tensor([[1.0, 5.0, 9.0], [1.0, 3.0, 0.0]])
    signed = signed_objectives(scores, torch.tensor([1.0, -2.0, 0.0]))
    assert signed.tolist() == [[1.0, -10.0], [1.0, -6.0]]
    # the smaller second score wins once its weight is negative; the log-only third column is ignored
    assert non_dominated(signed).tolist() == [False, True]
