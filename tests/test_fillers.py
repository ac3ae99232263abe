"""The weight-0 filler micro-batches that keep a sharded denoiser's processes in step
(`across_processes.equal_micro_counts`): for every strategy a filler calls the denoiser exactly as a
training micro-batch does (the same forwards, with and without gradient, in the same order), its loss is
finite, and at weight 0 it leaves no gradient. Counted by a hook on the denoiser, on one process."""

import copy

import pytest
import torch
from test_diffusion_dpo import color_reward, write_pairs
from test_strategies import SAMPLE, make_policy

from diffusion_align.config.settings import SampleSettings
from diffusion_align.methods.distributed import LocalGroup
from diffusion_align.methods.strategies.d3po import D3PO, D3POConfig
from diffusion_align.methods.strategies.ddpo import DDPO, DDPOConfig, FlowGRPOConfig
from diffusion_align.methods.strategies.dpo import DiffusionDPO, DiffusionDPOConfig
from diffusion_align.methods.strategies.nft import NFT, NFTConfig
from diffusion_align.methods.strategies.prdp import PRDP, PRDPConfig
from diffusion_align.methods.strategies.reward_backprop import AlignProp, AlignPropConfig, DRaFT, DRaFTConfig
from diffusion_align.methods.strategies.sft import RewardSFT, RewardSFTConfig
from diffusion_align.training.across_processes import equal_micro_counts

PROMPTS = [
    "two small red circles on the left on a black background",
    "one large blue square at the bottom on a gray background",
] * 2
SDE = SampleSettings(num_steps=4, eta=0.7, guidance_scale=3.0, batch_size=4)
ODE = SampleSettings(num_steps=4, eta=0.0, guidance_scale=1.0, batch_size=4)


def flow_policy(sample):
    from test_flow_strategies import make_policy as make_flow_policy

    return make_flow_policy(sample)


def build(name, tmp_path):
    """(strategy, its collected batch) of a small run."""
    reward = color_reward()
    if name == "ddpo":
        strategy = DDPO(DDPOConfig(beta=0.01), make_policy(), reward, SAMPLE)
    elif name == "flow_grpo_fast":
        strategy = DDPO(FlowGRPOConfig(group_size=2, sde_window=2), flow_policy(SDE), reward, SDE)
    elif name == "nft":
        strategy = NFT(NFTConfig(group_size=2, kl_beta=0.1), flow_policy(ODE), reward, ODE)
    elif name == "d3po":
        strategy = D3PO(D3POConfig(kl_beta=0.1), make_policy(), reward, SAMPLE)
    elif name == "prdp":
        strategy = PRDP(PRDPConfig(group_size=2), make_policy(), reward, SAMPLE)
    elif name == "draft":
        strategy = DRaFT(DRaFTConfig(k=1), make_policy(), reward, SAMPLE)
    elif name == "alignprop":
        config = AlignPropConfig(truncation="uniform", truncation_high=2)
        strategy = AlignProp(config, make_policy(), reward, SAMPLE)
    elif name == "sft":
        strategy = RewardSFT(RewardSFTConfig(group_size=2), make_policy(), reward, SAMPLE)
    elif name == "dpo_online":
        strategy = DiffusionDPO(
            DiffusionDPOConfig(pairs="online", group_size=2), make_policy(), reward, SAMPLE
        )
    else:  # dpo_offline
        config = DiffusionDPOConfig(data=str(write_pairs(tmp_path, 2)), ref_update_every=1)
        strategy = DiffusionDPO(config, make_policy(), reward, SAMPLE)
    return strategy, strategy.collect(
        PROMPTS, [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    )


def denoiser_calls(strategy, micro) -> tuple[list[bool], torch.Tensor]:
    """(whether gradient was on, for each denoiser forward, in order; the loss) of one micro-batch."""
    calls = []
    hook = strategy.policy.backbone.unet.register_forward_pre_hook(
        lambda *_: calls.append(torch.is_grad_enabled())
    )
    try:
        loss, _ = strategy.loss(micro)
    finally:
        hook.remove()
    return calls, loss


NAMES = [
    "ddpo",
    "flow_grpo_fast",
    "nft",
    "d3po",
    "prdp",
    "draft",
    "alignprop",
    "sft",
    "dpo_online",
    "dpo_offline",
]


@pytest.mark.parametrize("name", NAMES)
def test_a_filler_calls_the_denoiser_as_a_training_micro_batch_does_and_adds_no_gradient(name, tmp_path):
    strategy, batch = build(name, tmp_path)
    step = strategy.plan(batch, len(PROMPTS), 2, torch.Generator().manual_seed(3))[0]
    real = next(m for m in step if m["weight"] > 0)
    (filler,), added = equal_micro_counts([{**step[0], "weight": 0.0}], strategy, LocalGroup(), "cpu")
    assert added == 1 and filler["weight"] == 0.0 and filler["filler"]
    # each on its own copy of the batch, so both meet the same state (PRDP fills log-prob caches on first use)
    real_calls, _ = denoiser_calls(strategy, {**real, "batch": copy.deepcopy(batch)})
    filler_calls, loss = denoiser_calls(strategy, {**filler, "batch": copy.deepcopy(filler["batch"])})
    assert filler_calls == real_calls and True in real_calls
    assert torch.isfinite(loss)
    params = strategy.policy.parameters()
    for p in params:
        p.grad = None
    (loss * filler["weight"]).backward()
    assert all(p.grad is None or not p.grad.any() for p in params)


def test_dpo_pads_a_process_without_pairs_with_a_blank_pair(tmp_path):
    """All of this process's offline rows failed to decode: the filler is a zero-latent pair under "", and
    it still runs the reference and the policy."""
    strategy, batch = build("dpo_offline", tmp_path)
    empty = {
        **batch,
        "x0": batch["x0"][:0],
        "t": batch["t"][:0],
        "noise_seeds": [],
        "embeds": batch["embeds"][:0],
    }
    filler = strategy.filler({"batch": empty, "pairs": torch.zeros(0, dtype=torch.long), "weight": 0.0})
    calls, loss = denoiser_calls(strategy, filler)
    assert calls == [False, True] and torch.isfinite(loss)
    assert not filler["batch"]["x0"].any()
