"""The fine-tuning objectives as pure tensor math (no models): each returns per-element losses and the
statistics worth logging. Log-probs follow the DDPO convention (mean over latent dims, see samplers.py).

Formulas (anchors §2):
- PPO-clip (DDPO): ratio = exp(logp - logp_old); loss = max(-A * ratio, -A * clip(ratio, 1 - e, 1 + e)).
- D3PO: r_k = clamp(exp(logp_k - logp_ref_k), 1 - e, 1 + e) *inside* the sigmoid (clamped steps get no
  gradient); loss = -log sigmoid(beta * log r_win - beta * log r_lose).
- PRDP: per-step log-ratios h_t = logp_theta - logp_ref, proximally clipped to h_old_t +- e; trajectory value
  h = mean_t h_t; pair loss = max((h_a - h_b - (r_a - r_b) / beta)^2, same with clipped h).
- Diffusion-DPO: d = (|e_ref_w|^2 - |e_ref_l|^2) - (|e_w|^2 - |e_l|^2) of the denoising errors (mean over
  latent dims) at a shared noise and t; sigmoid loss = -log sigmoid(beta * s * d) (`diffusion_dpo_loss`: s),
  optionally + sft_weight * beta * s * |e_w|^2 (RPO-style: the winner's denoising loss).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from diffusion_align.math.multi_objective import dominates, signed_objectives


def clip_advantages(advantages: Tensor, max_abs: float) -> Tensor:
    """Advantages clamped to [-max_abs, max_abs] (DDPO adv_clip_max = 5)."""
    return advantages.clamp(-max_abs, max_abs)


def ppo_clip_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float):
    """PPO clipped surrogate per sample.

    log_prob: (B,) under the current policy (with gradient); old_log_prob, advantages: (B,) detached.
    Returns (loss (B,), ratio (B,), approx_kl (scalar) = 0.5 * mean(dlogp^2), clip_fraction (scalar)).
    """
    delta = log_prob - old_log_prob.detach()
    ratio = torch.exp(delta)
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped)
    approx_kl = 0.5 * (delta.detach() ** 2).mean()
    clip_fraction = ((ratio.detach() - 1.0).abs() > clip_range).float().mean()
    return loss, ratio, approx_kl, clip_fraction


def d3po_loss(
    log_prob_win: Tensor,
    ref_log_prob_win: Tensor,
    log_prob_lose: Tensor,
    ref_log_prob_lose: Tensor,
    beta: float,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """D3PO loss per pair at one denoising step (all inputs (P,)); the reference log-probs are detached.

    Returns (loss (P,), implicit accuracy (P,) = 1 where the winner's clamped log-ratio exceeds the loser's).
    """
    # clamp(ratio, 1 - eps, 1 + eps) taken in log space: the same values and gradients, but a far-off ratio
    # cannot overflow exp() into inf, whose clamp gradient is 0 * inf = NaN
    lo, hi = math.log(1.0 - eps), math.log(1.0 + eps)
    log_ratio_w = (log_prob_win - ref_log_prob_win.detach()).clamp(lo, hi)
    log_ratio_l = (log_prob_lose - ref_log_prob_lose.detach()).clamp(lo, hi)
    inside = beta * log_ratio_w - beta * log_ratio_l
    return -torch.nn.functional.logsigmoid(inside), (inside.detach() > 0).float()


def preference_pairs(rewards: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Pareto preference between pair members. rewards: (P, 2, K) (K reward components); weights: (K,) the
    components' signed weights in the total (None: all 1).

    A component counts as weight * value: a negatively weighted one is preferred smaller, a zero-weight
    (log-only) one is ignored. Returns (winner index (P,) in {0, 1} as int64, decisive (P,) bool). A member
    wins if it is >= on every counted component and > on at least one; ties and incomparable pairs are not
    decisive (D3PO drops them), and so is every pair when no component counts.
    """
    rewards = signed_objectives(rewards, weights)
    a, b = rewards[:, 0], rewards[:, 1]
    a_dominates, b_dominates = dominates(a, b), dominates(b, a)
    return b_dominates.long(), a_dominates | b_dominates


def prdp_loss(
    log_ratio: Tensor,
    old_log_ratio: Tensor,
    rewards: Tensor,
    first: Tensor,
    second: Tensor,
    beta: float,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """PRDP reward-difference regression with proximal clipping, per pair.

    log_ratio: (N, T) per-step log(pi_theta / pi_ref) of N trajectories (with gradient); old_log_ratio: (N, T)
    the same under theta_old (detached); rewards: (N,); first, second: (P,) int64 indices of the pairs.
    Returns (loss (P,), clipped (N, T) bool: where h_t left h_old_t +- eps).
    """
    old = old_log_ratio.detach()
    clipped_ratio = torch.maximum(torch.minimum(log_ratio, old + eps), old - eps)
    h = log_ratio.mean(-1)
    h_clipped = clipped_ratio.mean(-1)
    target = (rewards[first] - rewards[second]).detach() / beta
    unclipped = (h[first] - h[second] - target) ** 2
    clipped = (h_clipped[first] - h_clipped[second] - target) ** 2
    return torch.maximum(unclipped, clipped), (log_ratio.detach() - old).abs() > eps


def group_pairs(group_ids: Tensor, rewards: Tensor) -> tuple[Tensor, Tensor]:
    """All pairs i < j within each group whose rewards differ, oriented winner first (PRDP's mask
    `reward_diffs > 0`: ties carry no signal). group_ids, rewards: (N,). Returns (first (P,), second (P,))."""
    n = group_ids.numel()
    i, j = torch.triu_indices(n, n, offset=1, device=group_ids.device)
    keep = (group_ids[i] == group_ids[j]) & (rewards[i] != rewards[j])
    i, j = i[keep], j[keep]
    swap = rewards[j] > rewards[i]
    return torch.where(swap, j, i), torch.where(swap, i, j)


def sample_truncation(
    num_steps: int,
    kind: str = "gaussian",
    mean: float = 42.0,
    std: float = 5.0,
    low: int = 0,
    high: int = 50,
    fixed: int = 49,
    generator: torch.Generator | None = None,
) -> int:
    """AlignProp's backprop cut (official sd_pipeline): one index `cut`; steps cut..num_steps-1 (a contiguous
    tail, ~num_steps - cut steps) keep gradient, earlier denoiser outputs are detached.

    gaussian: int(N(mean, std)); uniform: an integer in [low, high); fixed: `fixed`. Redrawn until it lies in
    [1, num_steps) (the official rejection loop). Defaults are the published 50-step values.
    """
    if num_steps < 2:
        raise ValueError("AlignProp truncation needs at least 2 denoising steps")
    if kind == "fixed":
        if not 1 <= fixed < num_steps:
            raise ValueError(f"fixed truncation {fixed} is outside [1, {num_steps})")
        return int(fixed)
    for _ in range(10_000):
        if kind == "gaussian":
            cut = int(mean + std * torch.randn((), generator=generator).item())
        elif kind == "uniform":
            cut = int(torch.randint(low, high, (), generator=generator).item())
        else:
            raise ValueError(f"unknown truncation kind {kind!r}: gaussian, uniform or fixed")
        if 1 <= cut < num_steps:
            return cut
    raise ValueError(
        f"truncation {kind} (mean={mean}, std={std}, low={low}, high={high}) never lands in [1, {num_steps})"
    )


def nft_reward_weight(advantages: Tensor, adv_clip_max: float) -> Tensor:
    """DiffusionNFT's optimality probability r in [0, 1]: clip(A, +-A_max) / A_max / 2 + 1/2."""
    return (advantages.clamp(-adv_clip_max, adv_clip_max) / adv_clip_max / 2 + 0.5).clamp(0, 1)


def nft_loss(v: Tensor, v_old: Tensor, x_t: Tensor, x0: Tensor, t: Tensor, r: Tensor, beta: float) -> Tensor:
    """DiffusionNFT's forward-process loss per sample (NVlabs `train_nft_sd3.py`), before the A_max scale.

    v: the trained velocity (with gradient); v_old: the old policy's (detached); x_t = (1 - t) x0 + t noise;
    t: (B,) in [0, 1]; r: (B,) from `nft_reward_weight`. Implicit policies v+ = beta v + (1 - beta) v_old and
    v- = (1 + beta) v_old - beta v; their x0 predictions x_t - t v+- are pulled to x0, each squared error
    divided by its own detached mean absolute error (adaptive weighting, floored at 1e-5):
    (r |x0+ - x0|^2 / w+ + (1 - r) |x0- - x0|^2 / w-) / beta, means over the latent dims. Returns (B,).
    """
    dims = tuple(range(1, x0.ndim))
    t = t.view(-1, *([1] * (x0.ndim - 1)))
    v_old = v_old.detach()
    losses = []
    for implicit in (beta * v + (1 - beta) * v_old, (1 + beta) * v_old - beta * v):
        x0_hat = x_t - t * implicit
        with torch.no_grad():
            weight = (x0_hat.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clamp(min=1e-5)
        losses.append(((x0_hat - x0) ** 2 / weight).mean(dim=dims))
    positive, negative = losses
    return (r * positive + (1 - r) * negative) / beta


# Diffusion-DPO's two published beta forms, as the factor s in beta * s * d: the paper's code (Salesforce
# train.py) writes -0.5 * beta * (model_diff - ref_diff) with beta 5000, diffusers' research example
# beta * (ref_diff - model_diff) with default beta 2500: beta 5000 in the first is beta 2500 in the second.
# (The example's ipo branch reads an undefined `args.beta`; ours uses the configured beta.)
DPO_BETA_SCALE = {"salesforce": 0.5, "diffusers": 1.0}


def diffusion_dpo_loss(
    error_w: Tensor,
    error_l: Tensor,
    ref_error_w: Tensor,
    ref_error_l: Tensor,
    beta: float,
    loss_type: Literal["sigmoid", "hinge", "ipo"] = "sigmoid",
    beta_form: Literal["salesforce", "diffusers"] = "salesforce",
    sft_weight: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Diffusion-DPO per pair (Wallace et al. 2024; anchors 2.6). All inputs (P,): the mean squared denoising
    errors of winner and loser (same noise, same t) under the policy (with gradient) and the reference.

    h = s * ((ref_error_w - error_w) - (ref_error_l - error_l)), s from DPO_BETA_SCALE[beta_form];
    sigmoid: -log sigmoid(beta h); hinge: relu(1 - beta h); ipo: (h - 1 / (2 beta))^2 (diffusers' example).
    sft_weight > 0 adds sft_weight * beta * s * error_w, the winner's own denoising loss (as RPO adds the
    chosen answer's NLL to DPO): DPO alone may raise both errors, the loser's faster ("likelihood
    displacement"); this keeps the winner's error pulled down. In the sigmoid loss's units: at its start
    (sigmoid slope 1/2) weight 1 pulls error_w twice as hard as the DPO term does.
    Returns (loss (P,), implicit reward of the winner beta * s * (ref_error_w - error_w) (P,), of the loser
    (P,)), the rewards detached: their difference is the margin, its sign the implicit accuracy.
    """
    if beta_form not in DPO_BETA_SCALE:
        raise ValueError(f"unknown beta_form {beta_form!r}: {' or '.join(DPO_BETA_SCALE)}")
    s = DPO_BETA_SCALE[beta_form]
    gain_w = ref_error_w.detach() - error_w
    gain_l = ref_error_l.detach() - error_l
    h = s * (gain_w - gain_l)
    if loss_type == "sigmoid":
        loss = -torch.nn.functional.logsigmoid(beta * h)
    elif loss_type == "hinge":
        loss = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown Diffusion-DPO loss_type {loss_type!r}: sigmoid, hinge or ipo")
    if sft_weight:
        loss = loss + sft_weight * beta * s * error_w
    return loss, beta * s * gain_w.detach(), beta * s * gain_l.detach()
