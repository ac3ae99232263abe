"""Flow-GRPO(-Fast) and DiffusionNFT through the trainer on tiny SD3: a run interrupted and resumed ends with
the same LoRA as the straight run (NFT's old policy and step count are checkpointed; Fast's window is drawn
from the samples' own derived generators; MixGRPO's sliding window keeps its clock in the checkpoint)."""

import pytest
from test_trainer import lora_of, max_diff, tiny_config

from diffusion_align.builder import train

FLOW = {
    "model.pretrained": "tiny-sd3",
    "sample.num_steps": 4,
    "sample.eta": 0.7,
    "sample.guidance_scale": 1.0,
}
RUN = {"train.epochs": 3, "train.batch_size": 4, "train.samples_per_epoch": 4, "checkpoint.every": 1}
STRATEGIES = {
    "flow_grpo": {"name": "flow_grpo", "group_size": 2, "beta": 0.01},
    "flow_grpo_fast": {"name": "flow_grpo", "group_size": 2, "sde_window": 1, "timestep_window": 0.5},
    "diffusion_nft": {"name": "diffusion_nft", "group_size": 2, "decay_rate": 0.3},
    "mixgrpo_sliding": {
        "name": "flow_grpo",
        "group_size": 2,
        "sde_window": 1,
        "timestep_window": 0.75,
        "sde_window_mode": "sliding",
    },
}


def config(out, strategy, **overrides):
    nft = strategy["name"] == "diffusion_nft"
    return tiny_config(out, strategy, **{**FLOW, **RUN, **({"sample.eta": 0.0} if nft else {}), **overrides})


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_flow_strategy_resumes_exactly(tmp_path, name):
    strategy = STRATEGIES[name]
    straight = train(config(tmp_path / "a", strategy))
    train(config(tmp_path / "b", strategy, **{"train.epochs": 2}))
    resumed = train(config(tmp_path / "b", strategy, **{"checkpoint.resume": "latest"}))
    assert resumed["optimizer_steps"] == straight["optimizer_steps"] > 0
    assert max_diff(lora_of(straight["lora_dir"]), lora_of(resumed["lora_dir"])) <= 1e-6
