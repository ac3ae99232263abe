"""`diffusion-align pairs CONFIG --out DIR [--count N] [key=value ...]`: preference pairs labelled by
a reward (AI feedback, as Salesforce's train.py `--choice_model`), in the JSONL layout `diffusion_dpo` reads.

Pair k: prompt k of prompts.train (cycled), two images of the base model (no LoRA) with the config's sample
settings, each from its own seed (derived from sample.seed, k and the side), scored by the config's rewards;
label_0 = 1 when image 0 scores higher, 0 when image 1 does, 0.5 on a tie (which training drops).
`--shared-noise`: D3PO's pairs instead, one x_T and two step-noise draws from the row's `seed`
(`d3po.render_pairs`), so the same file, relabelled by people, is D3PO's `human_labels` (sample.eta > 0).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffusion_align.errors import UserError

HELP = (
    "Make preference pairs: two base-model images per prompt, labelled by the config's reward (JSONL + PNG)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a YAML config: model, sample, rewards and prompts.train are used")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--out", required=True, help="folder for pairs.jsonl and the images (must not exist)")
    parser.add_argument("--count", type=int, default=256, help="number of pairs (default 256)")
    parser.add_argument(
        "--shared-noise",
        action="store_true",
        help="D3PO's pairs: one x_T per pair, regenerable from the row's seed (for human labels)",
    )


def run(args) -> int:
    from diffusion_align.config import load_config

    config = load_config(args.config, args.overrides)
    summary = make_pairs(config, Path(args.out), args.count, args.shared_noise)
    print(json.dumps(summary))
    return 0


def make_pairs(config, out: Path, count: int, shared_noise: bool = False) -> dict:
    """Write out/pairs.jsonl and out/images/*.png; returns counts of pairs and ties."""
    import torch

    from diffusion_align.config.registry import build_backbone, build_policy, build_reward
    from diffusion_align.images import save_images
    from diffusion_align.methods.strategies.d3po import render_pairs
    from diffusion_align.methods.strategies.sampling import sample_batch
    from diffusion_align.prompts import load_prompts
    from diffusion_align.training.epoch_draws import derive_seed

    if count < 1:
        raise UserError(f"--count {count} must be at least 1")
    if shared_noise and config.sample.eta <= 0:
        raise UserError(
            "pairs --shared-noise: the two images differ only through step noise; set sample.eta > 0"
        )
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty: give a new --out folder")
    prompts = load_prompts(config.prompts.train)
    backbone = build_backbone(config.model)
    policy = build_policy(backbone, config.sample, config.lora)  # a zero LoRA: the base model
    reward = build_reward(config.rewards, backbone.device)
    (out / "images").mkdir(parents=True, exist_ok=True)
    chunk, ties = max(1, config.sample.batch_size // 2), 0
    with (out / "pairs.jsonl").open("w") as file:
        for start in range(0, count, chunk):
            pairs = range(start, min(count, start + chunk))
            texts = [prompts[k % len(prompts)] for k in pairs for _ in (0, 1)]
            if shared_noise:
                seeds = [derive_seed(config.sample.seed, k) for k in pairs]
                batch = render_pairs(
                    policy, reward, config.sample, list(zip(texts[0::2], seeds, strict=True))
                )
            else:
                gens = [
                    torch.Generator(backbone.device).manual_seed(derive_seed(config.sample.seed, k, side))
                    for k in pairs
                    for side in (0, 1)
                ]
                with policy.reference():
                    batch = sample_batch(policy, reward, config.sample, texts, gens, keep_images=True)
            names = [f"images/{k:06d}_{side}" for k in pairs for side in (0, 1)]
            save_images(batch["images"], out, names)
            scores = batch["reward"].view(-1, 2).tolist()
            for i, (r0, r1) in enumerate(scores):
                label = 0.5 if r0 == r1 else float(r0 > r1)
                ties += label == 0.5
                row = {"prompt": texts[2 * i], "image_0": f"{names[2 * i]}.png"}
                row.update(
                    {"image_1": f"{names[2 * i + 1]}.png", "label_0": label, "reward_0": r0, "reward_1": r1}
                )
                if shared_noise:
                    row["seed"] = seeds[i]
                file.write(json.dumps(row) + "\n")
    return {"pairs": count, "ties": ties, "jsonl": str(out / "pairs.jsonl")}
