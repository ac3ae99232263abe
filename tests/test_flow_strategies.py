"""Flow-GRPO, DiffusionNFT and reward backprop on a flow backbone (tiny SD3, CPU): the on-policy ratio is
exactly 1, micro-batches accumulate to the big batch, the old policy of NFT moves as published, and the
strategies train only the LoRA."""

import pytest
import torch
from test_strategies import accumulated_grads, assert_same_grads

import rewards
from diffusion_align.config.registry import build_sampler
from diffusion_align.config.settings import SampleSettings
from diffusion_align.engine.backbones import load_backbone
from diffusion_align.engine.policy import Policy
from diffusion_align.errors import UserError
from diffusion_align.math.samplers import DDIMSampler
from diffusion_align.methods.strategies.ddpo import DDPO, FlowGRPOConfig
from diffusion_align.methods.strategies.nft import NFT, NFTConfig
from diffusion_align.methods.strategies.reward_backprop import DRaFT, DRaFTConfig
from rewards.combine import Combined

PROMPTS = [
    "two small red circles on the left on a black background",
    "one large blue square at the bottom on a gray background",
]
SDE = SampleSettings(num_steps=4, eta=0.7, guidance_scale=3.0, batch_size=4)
ODE = SampleSettings(num_steps=4, eta=0.0, guidance_scale=1.0, batch_size=4)


def soft():
    return Combined({"soft": rewards.build("shapes_color_soft")})


def make_policy(sample, seed=0):
    backbone = load_backbone("tiny-sd3")
    policy = Policy(backbone, build_sampler(backbone, sample), rank=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a non-zero adapter, so every LoRA weight gets gradient
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return policy


def gens(n, offset=0):
    return [torch.Generator().manual_seed(offset + i) for i in range(n)]


@pytest.fixture(scope="module")
def grpo():
    policy = make_policy(SDE)
    strategy = DDPO(FlowGRPOConfig(group_size=2, beta=0.01), policy, soft(), SDE)
    return strategy, strategy.collect(PROMPTS * 2, gens(4))


def test_flow_grpo_ratio_is_exactly_one_on_policy(grpo):
    strategy, batch = grpo
    assert batch["log_probs"].shape == (4, 4)
    for micro in strategy.plan(batch, 4, 2, torch.Generator().manual_seed(1))[0]:
        _, metrics = strategy.loss(micro)
        assert metrics["ratio_max_deviation"] < 1e-6 and metrics["clip_fraction"] == 0.0


def test_flow_grpo_micro_batches_accumulate_to_the_big_batch(grpo):
    strategy, batch = grpo
    one = strategy.plan(batch, 4, 4, torch.Generator().manual_seed(2))[0]
    many = strategy.plan(batch, 4, 1, torch.Generator().manual_seed(2))[0]
    assert_same_grads(accumulated_grads(strategy, one), accumulated_grads(strategy, many))


def test_flow_grpo_gradient_reaches_only_the_lora(grpo):
    strategy, batch = grpo
    accumulated_grads(strategy, strategy.plan(batch, 4, 4, torch.Generator().manual_seed(3))[0])
    transformer = strategy.policy.backbone.unet
    with_grad = {n for n, p in transformer.named_parameters() if p.grad is not None}
    assert with_grad and all("lora" in n for n in with_grad)
    for p in strategy.policy.parameters():
        p.grad = None


@pytest.fixture(scope="module")
def nft():
    policy = make_policy(ODE, seed=1)
    strategy = NFT(NFTConfig(group_size=2, decay_rate=0.25, decay_max=0.5), policy, soft(), ODE)
    return strategy, strategy.collect(PROMPTS * 2, gens(4, 10))


def test_nft_keeps_only_x0_and_accumulates(nft):
    strategy, batch = nft
    assert batch["latents"].shape[1] == 1 and "log_probs" not in batch
    one = strategy.plan(batch, 4, 4, torch.Generator().manual_seed(4))[0]
    many = strategy.plan(batch, 4, 1, torch.Generator().manual_seed(4))[0]
    assert_same_grads(accumulated_grads(strategy, one), accumulated_grads(strategy, many))


def test_nft_old_policy_moves_by_the_published_decay(nft):
    strategy, _ = nft
    policy = strategy.policy
    old = [o.clone() for o in strategy.old]
    state = strategy.state_dict()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.1)
    strategy.steps = 1  # d = min(0.25 * 1, 0.5)
    strategy.move_old_policy()
    expected = [0.25 * o + 0.75 * p.detach() for o, p in zip(old, policy.parameters(), strict=True)]
    assert all(torch.allclose(a, b) for a, b in zip(strategy.old, expected, strict=True))
    strategy.load_state_dict(state)
    assert strategy.steps == state["steps"] and all(
        torch.equal(a, b) for a, b in zip(strategy.old, old, strict=True)
    )
    with torch.no_grad():
        for p in policy.parameters():
            p.sub_(0.1)


def test_nft_refuses_an_epsilon_prediction_model():
    backbone = load_backbone("tiny-sd")
    policy = Policy(backbone, DDIMSampler.from_scheduler(backbone.scheduler, eta=0.0))
    with pytest.raises(UserError, match="flow model"):
        NFT(NFTConfig(), policy, soft(), ODE)


def test_draft_backpropagates_through_the_flow_ode():
    policy = make_policy(ODE, seed=2)
    strategy = DRaFT(DRaFTConfig(k=2), policy, soft(), ODE)
    batch = strategy.collect(PROMPTS * 2, gens(4, 20))
    grads = accumulated_grads(strategy, strategy.plan(batch, 4, 2, torch.Generator().manual_seed(5))[0])
    assert max(g.abs().max().item() for g in grads) > 0


def test_reno_and_search_generate_as_the_flow_pipeline_does():
    """The few-step generator on a flow backbone is the pipeline's Euler ODE: seed s gives pipe's image."""
    from diffusion_align.engine.few_step import draw_noise, make_generator
    from diffusion_align.methods.search import best_of_n

    backbone = load_backbone("tiny-sd3")
    expected = backbone.pipe(
        PROMPTS[0], num_inference_steps=2, guidance_scale=1.0, output_type="pt",
        generator=torch.Generator("cpu").manual_seed(3),
    ).images  # fmt: skip
    embeds = backbone.encode_prompts([PROMPTS[0]], guidance=False)
    with torch.no_grad():
        ours = make_generator(backbone, 2, 1.0)(draw_noise(backbone, [3]), embeds, [3])
    assert (ours - expected).abs().max() <= 1e-4
    result = best_of_n(backbone, soft(), PROMPTS[0], 2, num_steps=2, seed=3, progress=False)
    assert result.reward_calls == 2 and result.best_seed in (3, 4)


@pytest.mark.parametrize("form", ["sde", "dance", "cps"])
def test_the_configured_sde_form_reaches_the_flow_sampler(form):
    sampler = build_sampler(load_backbone("tiny-sd3"), SampleSettings(num_steps=4, eta=0.5, sde=form))
    assert (sampler.kind, sampler.eta) == (form, 0.5)
