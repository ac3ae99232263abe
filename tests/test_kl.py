"""KL to the reference (the base model, adapter off) on DRaFT/AlignProp's window, D3PO and PRDP: 0 at
initialisation (LoRA B = 0), positive after an update, added to the loss as kl_beta * kl, absent with
kl_beta = 0 (the published objectives; tests/test_behaviour_preserved.py pins their outputs)."""

import dataclasses

import pytest
import torch
from test_strategies import PROMPTS, SAMPLE, combined, make_policy, one_step

from diffusion_align.methods.strategies.d3po import D3PO, D3POConfig
from diffusion_align.methods.strategies.prdp import PRDP, PRDPConfig
from diffusion_align.methods.strategies.reward_backprop import AlignProp, AlignPropConfig, DRaFT, DRaFTConfig

CASES = {
    "draft": (DRaFT, DRaFTConfig(k=2, kl_beta=0.5), SAMPLE),
    "draft-eta0": (DRaFT, DRaFTConfig(k=1, kl_beta=0.5), dataclasses.replace(SAMPLE, eta=0.0)),
    "draft-lv": (DRaFT, DRaFTConfig(k=1, lv_draws=2, kl_beta=0.5), SAMPLE),
    "alignprop": (AlignProp, AlignPropConfig(truncation="fixed", truncation_fixed=1, kl_beta=0.5), SAMPLE),
    "d3po": (D3PO, D3POConfig(kl_beta=0.5), SAMPLE),
    "prdp": (PRDP, PRDPConfig(group_size=2, beta=0.1, kl_beta=0.5), SAMPLE),
}


def first_micro(strategy):
    batch = strategy.collect(PROMPTS, torch.Generator().manual_seed(0))
    return one_step(strategy, batch, 4)[0]


@pytest.mark.parametrize("name", list(CASES))
def test_kl_is_zero_at_init_positive_after_a_step_and_weighted_into_the_loss(name):
    cls, config, sample = CASES[name]
    policy = make_policy(perturb=False)  # B = 0: the policy is the base model
    strategy = cls(config, policy, combined("shapes_color_soft"), sample)
    micro = first_micro(strategy)
    loss, metrics = strategy.loss(micro)
    assert metrics["kl"] == 0.0
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    loss.backward()
    optimizer.step()
    loss, metrics = strategy.loss(micro)
    assert metrics["kl"] > 0
    strategy.config = dataclasses.replace(config, kl_beta=0.0)
    without, plain = strategy.loss(micro)
    assert "kl" not in plain
    assert loss.item() - without.item() == pytest.approx(config.kl_beta * metrics["kl"], rel=1e-4, abs=1e-9)


def test_window_kl_is_the_gaussian_kl_of_the_two_models_means_by_hand():
    """DRaFT-1 on a perturbed policy: the logged KL is mean((mu_theta - mu_ref)^2 / (2 std^2)) at the re-run
    window's input latent (the stored latent at the cut), with the DDIM step's std at eta 1."""
    policy = make_policy(seed=3)
    strategy = DRaFT(DRaFTConfig(k=1, kl_beta=1.0), policy, combined("shapes_color_soft"), SAMPLE)
    micro = first_micro(strategy)
    _, metrics = strategy.loss(micro)
    batch, rows = micro["batch"], micro["rows"]
    x_t, t = batch["latents"][rows, SAMPLE.num_steps - 1], batch["timesteps"][-1]
    embeds = batch["embeds"][rows]
    with torch.no_grad():
        mean, std = policy.transition(x_t, t, embeds, SAMPLE.guidance_scale, SAMPLE.num_steps)
        with policy.reference():
            ref, _ = policy.transition(x_t, t, embeds, SAMPLE.guidance_scale, SAMPLE.num_steps)
    by_hand = ((mean - ref) ** 2 / (2 * std**2)).mean().item()
    assert by_hand > 0 and metrics["kl"] == pytest.approx(by_hand, rel=1e-5)
