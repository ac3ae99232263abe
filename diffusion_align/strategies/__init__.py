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
        def state_dict(self) -> dict         # what a resume needs (tracker, label cursor, ...); {} if nothing
        def load_state_dict(self, state: dict) -> None

`reward(images (B,3,H,W) in [0,1], prompts) -> (total (B,) float32, components dict[name, (B,)])`, with a
`differentiable` attribute (AlignProp / DRaFT refuse a reward that is not).
Shared math lives in `diffusion_align/losses.py` (pure functions); the sampling glue (groups, shared
noise, per-sample generators, step plans, stored transitions) in `strategies/sampling.py`; no strategy imports
another.
"""

# name -> "module:Config" (lazy, so importing one strategy does not import all)
STRATEGY_CONFIGS = {
    "ddpo": "diffusion_align.strategies.ddpo:DDPOConfig",
    "d3po": "diffusion_align.strategies.d3po:D3POConfig",
    "alignprop": "diffusion_align.strategies.reward_backprop:AlignPropConfig",
    "draft": "diffusion_align.strategies.reward_backprop:DRaFTConfig",
    "prdp": "diffusion_align.strategies.prdp:PRDPConfig",
}
