"""Fine-tuning strategies: one small file per paper. No base class; every strategy has this shape:

    class <Name>Config:                      # dataclass: the paper's hyper-parameters, one comment each
    class <Name>:
        def __init__(self, config, policy, reward, sample: SampleSettings, group=LocalGroup()): ...
        num_inner_epochs: int                # passes over one collected batch (DDPO); 1 for the others
        def collect(self, prompts: list[str], generator) -> dict:
            '''No-grad work before the update: rollouts, rewards, advantages / preferences. `generator`: one
            torch.Generator per prompt (what the trainer passes; noise never depends on batching) or a single
            generator (split into per-sample seeds). Returns tensors with batch dim first plus "prompts" and
            "reward" (B,) and "metrics" (dict of floats). D3PO uses prompts[0::2] (pairs), PRDP
            prompts[0::group_size] (groups): len(prompts) must be even / a multiple of group_size.'''
        def plan(self, batch: dict, batch_size: int, micro_batch_size: int, generator) -> list[list[dict]]:
            '''The optimizer steps for one inner epoch: outer list = optimizer steps, inner = micro-batches,
            each with "weight" (its share of the step's objective: the weights of one step sum to 1), so
            micro-batch x accumulation gives the same update as one big batch. Sizes count images; D3PO
            rounds to whole pairs and PRDP to whole groups (at least one). Every process plans the same
            number of steps.'''
        def loss(self, micro: dict) -> tuple[Tensor, dict[str, float]]:
            '''Scalar loss averaged over the micro-batch, with gradient in the LoRA weights, and metrics.
            Call it for every micro-batch of the plan in order, with one optimizer step after each step's
            last one. A micro-batch with nothing to learn returns a zero that still has a graph, so
            `backward` works on every process.'''
        def filler(self, micro: dict) -> dict:
            '''Padding for a sharded denoiser (`training.across_processes.equal_micro_counts`): given a
            micro-batch of a step (possibly one without rows), a micro-batch of real rows that calls the
            denoiser exactly as a training one does (the same forwards, with and without gradient). The
            trainer gives it weight 0 and drops its metrics. Without this method a strategy cannot shard.'''
        def state_dict(self) -> dict         # what a resume needs (tracker, label cursor, ...); {} if nothing
        def load_state_dict(self, state: dict) -> None

The reward is a `rewards.Combined`: `reward.score(images (B,3,H,W) in [0,1], prompts) -> (total (B,) float32,
components dict[name, (B,)])`, its signed `weights` {name: weight} and `non_differentiable` names (AlignProp /
DRaFT refuse a reward with any).
Shared math lives in `diffusion_align/math/losses.py` (pure functions); the sampling glue (groups, shared
noise, per-sample generators, step plans, stored transitions) in `strategies/sampling.py`; no strategy imports
another.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from diffusion_align.errors import UserError

# name -> (config class, strategy class), as "module:attr" references imported on first use, so reading a
# config imports only the strategy it names.
STRATEGIES: dict[str, tuple[str, str]] = {
    "ddpo": (
        "diffusion_align.methods.strategies.ddpo:DDPOConfig",
        "diffusion_align.methods.strategies.ddpo:DDPO",
    ),
    "flow_grpo": (
        "diffusion_align.methods.strategies.ddpo:FlowGRPOConfig",
        "diffusion_align.methods.strategies.ddpo:DDPO",
    ),
    "diffusion_nft": (
        "diffusion_align.methods.strategies.nft:NFTConfig",
        "diffusion_align.methods.strategies.nft:NFT",
    ),
    "d3po": (
        "diffusion_align.methods.strategies.d3po:D3POConfig",
        "diffusion_align.methods.strategies.d3po:D3PO",
    ),
    "alignprop": (
        "diffusion_align.methods.strategies.reward_backprop:AlignPropConfig",
        "diffusion_align.methods.strategies.reward_backprop:AlignProp",
    ),
    "draft": (
        "diffusion_align.methods.strategies.reward_backprop:DRaFTConfig",
        "diffusion_align.methods.strategies.reward_backprop:DRaFT",
    ),
    "diffusion_dpo": (
        "diffusion_align.methods.strategies.dpo:DiffusionDPOConfig",
        "diffusion_align.methods.strategies.dpo:DiffusionDPO",
    ),
    "reward_sft": (
        "diffusion_align.methods.strategies.sft:RewardSFTConfig",
        "diffusion_align.methods.strategies.sft:RewardSFT",
    ),
    "prdp": (
        "diffusion_align.methods.strategies.prdp:PRDPConfig",
        "diffusion_align.methods.strategies.prdp:PRDP",
    ),
}


class _ConfigColumn(Mapping):
    """name -> config reference, a live view of STRATEGIES (what the config reader's VARIANTS takes)."""

    def __getitem__(self, name: str) -> str:
        return STRATEGIES[name][0]

    def __iter__(self) -> Iterator[str]:
        return iter(STRATEGIES)

    def __len__(self) -> int:
        return len(STRATEGIES)


STRATEGY_CONFIGS: Mapping[str, str] = _ConfigColumn()


def strategy_class(config) -> type:
    """The strategy class of a config object: its STRATEGIES entry, or for a config given as
    `package.module:ConfigClass` (not in the table) the class of the same name without `Config` next to it."""
    ref = f"{type(config).__module__}:{type(config).__qualname__}"
    for config_ref, class_ref in STRATEGIES.values():
        if config_ref == ref:
            return _load(class_ref)
    module = importlib.import_module(type(config).__module__)
    name = type(config).__name__.removesuffix("Config")
    cls = getattr(module, name, None)
    if cls is None:
        raise UserError(
            f"strategy config {type(config).__name__} has no strategy class {name} next to it in "
            f"{module.__name__}"
        )
    return cls


def _load(ref: str):
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)
