"""Run by torchrun in tests/test_fsdp.py (two CPU processes, gloo): every strategy whose processes can plan
different numbers of micro-batches trains twice on the bundled models, with the denoiser sharded and
replicated, in the same two processes. Rank 0 prints one JSON line: per case, the largest LoRA difference
between the two runs, the weight-0 filler micro-batches the sharded run added, and the largest trained
LoRA B entry (0 would mean nothing was learned to compare)."""

import json
import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist
import yaml
from PIL import Image
from safetensors.torch import load_file

from diffusion_align.builder import train
from diffusion_align.config import load_config

LORA = "pytorch_lora_weights.safetensors"
PROMPTS = Path(__file__).resolve().parents[1] / "configs" / "cpu"
SHAPES = {"pretrained": "shapes", "prompts": "shapes_green_on_black"}
FLOW = {"pretrained": "shapes-flow", "prompts": "shapes_red_triangle"}
# (name, model, strategy, reward): the hard colour reward ties often, so decisive pairs, pairs per group,
# non-zero advantages and spread groups differ between the processes. Every step of a chain is trained
# (timestep_fraction 1), so a one-process run trains the same transitions (tests/test_fsdp.py compares).
CASES = [
    ("d3po", SHAPES, {"name": "d3po", "timestep_fraction": 1.0}, "shapes_color"),
    ("prdp", SHAPES, {"name": "prdp", "group_size": 2}, "shapes_color"),
    # a second update on the batch: cached and re-computed log-probs (see test_fsdp for its tolerance)
    ("prdp_two_updates", SHAPES, {"name": "prdp", "group_size": 2, "num_inner_epochs": 2}, "shapes_color"),
    ("ddpo_filtered", SHAPES, {"name": "ddpo", "group_size": 2, "filter_zero_advantages": True},
     "shapes_color"),
    ("dpo_online", SHAPES, {"name": "diffusion_dpo", "pairs": "online", "group_size": 2}, "shapes_color"),
    ("dpo_offline", SHAPES, {"name": "diffusion_dpo", "pairs": "offline", "beta": 500.0},
     "shapes_color_soft"),
    ("reward_sft", SHAPES, {"name": "reward_sft", "group_size": 2}, "shapes_color_soft"),
    ("alignprop_random_cut", SHAPES, {"name": "alignprop", "truncation": "uniform", "truncation_high": 4},
     "shapes_color_soft"),
    ("flow_grpo", FLOW, {"name": "flow_grpo", "group_size": 2, "timestep_fraction": 1.0}, "shapes_color"),
    ("diffusion_nft", FLOW, {"name": "diffusion_nft", "group_size": 2}, "shapes_color_soft"),
    # one extra backward per reward (torch.autograd.grad) through the sharded blocks
    ("draft_balanced", SHAPES, {"name": "draft", "k": 1, "gradient_balance": True},
     [{"name": "shapes_color_soft"}, {"name": "shapes_color_soft", "weight": 3.0, "args": {"sigma": 0.05}}]),
]  # fmt: skip


def offline_pairs(folder: Path) -> Path:
    """8 pairs of flat-colour images (winner green); every other pair's loser is a corrupt file, so the
    processes keep different numbers of pairs."""
    rows = []
    for k in range(8):
        win, lose = folder / f"w{k}.png", folder / f"l{k}.png"
        Image.fromarray(np.full((64, 64, 3), (0, 200, 0), np.uint8)).save(win)
        if k % 2:
            lose.write_bytes(b"not a png")
        else:
            Image.fromarray(np.full((64, 64, 3), (200, 0, 0), np.uint8)).save(lose)
        rows.append(
            {
                "prompt": "one large green circle on a black background",
                "image_w": str(win),
                "image_l": str(lose),
            }
        )
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config_file(folder: Path, model: dict, strategy: dict, reward: str | list) -> Path:
    eta = 0.0 if strategy["name"] == "diffusion_nft" else 1.0
    if strategy.get("pairs") == "offline":
        strategy = {**strategy, "data": str(offline_pairs(folder))}
    config = {
        "model": {"pretrained": model["pretrained"], "device": "cpu"},
        "strategy": strategy,
        "sample": {"num_steps": 4, "batch_size": 4, "eta": eta, "guidance_scale": 1.0},
        "rewards": [{"name": reward}] if isinstance(reward, str) else reward,
        "prompts": {
            "train": str(PROMPTS / f"{model['prompts']}_train.txt"),
            "eval": str(PROMPTS / f"{model['prompts']}_heldout.txt"),
            "eval_count": 2,  # evaluation runs the sharded denoiser on every process
        },
        "train": {"epochs": 2, "samples_per_epoch": 8, "batch_size": 8, "micro_batch_size": 2,
                  "learning_rate": 3e-3},
        "checkpoint": {"every": 1},
        "logging": {"eval_every": 0, "progress": False, "tensorboard": False},
    }  # fmt: skip
    path = folder / "config.yaml"
    if dist.get_rank() == 0:
        path.write_text(yaml.safe_dump(config))
    dist.barrier()
    return path


def fillers(run: Path) -> float:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return sum(json.loads(line).get("shard/filler_micro_batches", 0.0) for line in lines)


def compare(root: Path, name: str, model: dict, strategy: dict, reward: str | list) -> dict:
    folder = root / name
    if dist.get_rank() == 0:
        folder.mkdir(parents=True)
    dist.barrier()
    path = config_file(folder, model, strategy, reward)
    spread = []  # how far the processes' LoRAs ended apart
    for shard in ("none", "fsdp"):
        summary = train(load_config(path, [f"output_dir={folder / shard}", f"model.shard={shard}"]))
        spread.append(summary["lora_max_rank_difference"])
    if dist.get_rank():
        return {}
    replicated, sharded = (
        load_file(folder / "none" / "lora" / LORA),
        load_file(folder / "fsdp" / "lora" / LORA),
    )
    return {
        "diff": max((replicated[k] - sharded[k]).abs().max().item() for k in replicated),
        "fillers": fillers(folder / "fsdp"),
        "rank_spread": max(spread),
        "trained": max(v.abs().max().item() for k, v in sharded.items() if "lora.up" in k or "lora_B" in k),
    }


if __name__ == "__main__":
    dist.init_process_group("gloo")
    root, names = Path(sys.argv[1]), sys.argv[2:]
    result = {name: compare(root, name, *rest) for name, *rest in CASES if not names or name in names}
    if dist.get_rank() == 0:
        print(json.dumps(result))
    dist.destroy_process_group()
