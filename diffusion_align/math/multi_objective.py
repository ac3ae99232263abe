"""Several rewards without fixed trade-offs: Pareto dominance (Parrot's batch-wise non-dominated selection,
D3PO's vector preferences) and the min-norm combination of per-reward gradients (MGDA, Sener & Koltun 2018,
as MARBLE balances reward gradients).

Scores are (..., K): one column per reward component, higher is better once `signed_objectives` has applied
the components' signed weights (a negatively weighted reward is preferred smaller, a zero-weight one is only
logged and takes no part).
"""

from __future__ import annotations

import torch
from torch import Tensor


def signed_objectives(scores: Tensor, weights: Tensor | None) -> Tensor:
    """(..., K) raw component scores -> (..., K') the counted components times their signed weights
    (K' = the number of non-zero weights; all K unchanged when `weights` is None)."""
    if weights is None:
        return scores
    weights = torch.as_tensor(weights, dtype=scores.dtype, device=scores.device)
    counted = weights != 0
    return scores[..., counted] * weights[counted]


def dominates(a: Tensor, b: Tensor) -> Tensor:
    """a (..., K) dominates b (..., K): >= on every objective and > on at least one -> (...,) bool."""
    return (a >= b).all(-1) & (a > b).any(-1)


def non_dominated(scores: Tensor, groups: Tensor | None = None) -> Tensor:
    """(N, K) objectives -> (N,) bool: the rows no other row dominates (the batch's Pareto front; equal rows
    are all kept). `groups` (N,) int: only rows of the same group compete (a front per prompt). With no
    objective (K = 0) nothing dominates, so every row is kept."""
    beaten = dominates(scores[:, None, :], scores[None, :, :])  # [j, i]: row j dominates row i
    if groups is not None:
        beaten &= groups[:, None] == groups[None, :]
    return ~beaten.any(0)


def min_norm_coefficients(gram: Tensor, iterations: int = 100, tol: float = 1e-10) -> Tensor:
    """The point of the simplex whose combination of K vectors has the smallest norm:
    argmin_{a >= 0, sum a = 1} |sum_k a_k g_k|^2, from their Gram matrix gram[k, l] = g_k . g_l (K, K).

    Two vectors: the closed form a_1 = clamp((g_2.g_2 - g_1.g_2) / |g_1 - g_2|^2, 0, 1). More: Frank-Wolfe
    with exact line search (Sener & Koltun's MGDA-UB solver). The combined direction has a non-negative
    inner product with every g_k (zero only at a Pareto-stationary point), so a step along it raises no
    reward's loss to first order."""
    gram = gram.double()
    k = gram.shape[0]
    if k == 1:
        return torch.ones(1, dtype=gram.dtype, device=gram.device)
    if k == 2:
        return _two_point(gram[0, 0], gram[0, 1], gram[1, 1])
    alpha = torch.full((k,), 1.0 / k, dtype=gram.dtype, device=gram.device)
    for _ in range(iterations):
        g_alpha = gram @ alpha
        t = int(torch.argmin(g_alpha))
        # line search between the current combination (v) and vector t: |(1 - s) v + s g_t|^2
        s = 1 - _two_point(alpha @ g_alpha, g_alpha[t], gram[t, t])[0]
        step = torch.zeros_like(alpha)
        step[t] = 1.0
        new = (1 - s) * alpha + s * step
        if (new - alpha).abs().sum() < tol:
            return new
        alpha = new
    return alpha


def _two_point(aa: Tensor, ab: Tensor, bb: Tensor) -> Tensor:
    """[w, 1 - w] minimising |w a + (1 - w) b|^2 for w in [0, 1], from a.a, a.b and b.b."""
    denom = aa + bb - 2 * ab
    w = ((bb - ab) / denom).clamp(0, 1) if denom > 0 else torch.tensor(0.5, dtype=aa.dtype, device=aa.device)
    return torch.stack([w, 1 - w])
