"""DiffusionNFT's loss against an independent float64 computation written from NVlabs `train_nft_sd3.py`."""

import numpy as np
import pytest
import torch

from diffusion_align.math.losses import nft_loss, nft_reward_weight


def by_hand(v, v_old, x_t, x0, t, r, beta):
    v, v_old, x_t, x0 = (a.double().numpy() for a in (v, v_old, x_t, x0))
    t, r = t.double().numpy()[:, None, None, None], r.double().numpy()
    out = []
    for b in range(len(r)):
        pos = beta * v[b] + (1 - beta) * v_old[b]
        neg = (1 + beta) * v_old[b] - beta * v[b]
        terms = []
        for implicit in (pos, neg):
            err = x_t[b] - t[b] * implicit - x0[b]
            terms.append((err**2).mean() / max(np.abs(err).mean(), 1e-5))
        out.append(r[b] * terms[0] / beta + (1 - r[b]) * terms[1] / beta)
    return np.array(out)


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_loss_by_hand(beta):
    g = torch.Generator().manual_seed(0)
    v, v_old, x0, noise = (torch.randn(3, 4, 5, 5, generator=g) for _ in range(4))
    t = torch.tensor([0.9, 0.5, 0.1])
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    r = nft_reward_weight(torch.tensor([7.0, 0.0, -2.5]), 5.0)
    assert torch.allclose(r, torch.tensor([1.0, 0.5, 0.25]))
    ours = nft_loss(v, v_old, x_t, x0, t, r, beta)
    assert np.allclose(ours.detach().numpy(), by_hand(v, v_old, x_t, x0, t, r, beta), rtol=1e-5)


def test_the_gradient_pulls_towards_the_positive_policy_when_r_is_one():
    """r = 1: only the positive implicit policy is trained; its gradient in v is beta * d/dv+ (so a step
    against it moves the x0 prediction of v+ towards x0)."""
    g = torch.Generator().manual_seed(1)
    v_old, x0, noise = (torch.randn(1, 2, 3, 3, generator=g) for _ in range(3))
    v = torch.randn(1, 2, 3, 3, generator=g, requires_grad=True)
    t = torch.tensor([0.5])
    x_t = 0.5 * x0 + 0.5 * noise
    loss = nft_loss(v, v_old, x_t, x0, t, torch.ones(1), 1.0).sum()
    loss.backward()
    with torch.no_grad():
        stepped = v - 1e-2 * v.grad
        before = ((x_t - 0.5 * v - x0) ** 2).mean()
        after = ((x_t - 0.5 * stepped - x0) ** 2).mean()
    assert after < before
