"""Fine-tuning strategies: one small file per paper. No base class; every strategy has this shape:

    class <Name>Config:                      # dataclass: the paper's hyper-parameters, one comment each
    class <Name>:
        def __init__(self, config, policy, reward, sample: SampleSettings): ...
        num_inner_epochs: int                # passes over one collected batch (DDPO); 1 for the others
        def collect(self, prompts: list[str], generator: torch.Generator) -> dict:
            '''No-grad work before the update: rollouts, rewards, advantages / preferences. Returns tensors
            with batch dim first plus "prompts" and "reward" (B,) and "metrics" (dict of floats).'''
        def plan(self, batch: dict, batch_size: int, micro_batch_size: int, generator) -> list[list[dict]]:
            '''The optimizer steps for one inner epoch: outer list = optimizer steps, inner = micro-batches,
            each with "weight" (its share of the step's objective: the weights of one step sum to 1), so
            micro-batch x accumulation gives the same update as one big batch.'''
        def loss(self, micro: dict) -> tuple[Tensor, dict[str, float]]:
            '''Scalar loss averaged over the micro-batch, with gradient in the LoRA weights, and metrics.'''

`reward(images (B,3,H,W) in [0,1], prompts) -> (total (B,) float32, components dict[name, (B,)])`.
Shared math lives in `diffusion_align/losses.py` (pure functions), glue is duplicated on purpose.
"""

# name -> "module:Config" (lazy, so importing one strategy does not import all)
STRATEGY_CONFIGS = {
    "ddpo": "diffusion_align.strategies.ddpo:DDPOConfig",
    "d3po": "diffusion_align.strategies.d3po:D3POConfig",
    "alignprop": "diffusion_align.strategies.reward_backprop:AlignPropConfig",
    "draft": "diffusion_align.strategies.reward_backprop:DRaFTConfig",
    "prdp": "diffusion_align.strategies.prdp:PRDPConfig",
}
