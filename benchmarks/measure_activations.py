"""Measure the per-token activation profile the memory planner (`diffusion-align plan`) scales.

    OMP_NUM_THREADS=1 python benchmarks/measure_activations.py            # rewrites the profile file
    OMP_NUM_THREADS=1 python benchmarks/measure_activations.py --dry-run  # prints it only

For each family's tiny model (CPU, float32, the policy's default LoRA on the denoiser): one conditional
denoiser forward at `--micro-batch` samples, then backward; saved-tensor hooks sum the bytes autograd keeps
for backward (`engine.memory.activations.saved_activation_bytes`), without and with gradient checkpointing.
The factor stored is bytes / (samples x tokens x width x depth), with tokens, width and depth computed by the
planner's own `activation_shape`, so the planner scales it to a large model of the same family.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

TINY = {"unet": "tiny-sd", "sd3": "tiny-sd3", "flux": "tiny-flux"}
COMMAND = "OMP_NUM_THREADS=1 python benchmarks/measure_activations.py"


def measure(model: str, micro_batch: int, checkpointing: bool) -> tuple[int, object]:
    from diffusion_align.engine.backbones import load_backbone
    from diffusion_align.engine.memory.activations import activation_shape, family_of, saved_activation_bytes
    from diffusion_align.engine.policy import Policy

    torch.manual_seed(0)
    backbone = load_backbone(model, "float32", "cpu")
    backbone.enable_memory_options(gradient_checkpointing=checkpointing)
    policy = Policy(backbone, sampler=None)
    embeds = backbone.encode_prompts(["a red circle"] * micro_batch, guidance=False)
    x = torch.randn(backbone.latent_shape(micro_batch))
    t = torch.full((micro_batch,), 500 if not hasattr(backbone, "schedule") else 0.5)
    family = family_of(type(backbone))
    shape = activation_shape(family, backbone.unet, tuple(x.shape[-2:]), embeds.cond.shape[1])
    backbone.unet.train(checkpointing)  # diffusers checkpoints only in training mode
    saved = saved_activation_bytes(lambda: policy.denoiser_output(x, t, embeds), backbone.unet.parameters())
    return saved, shape


def profiles(micro_batch: int) -> dict:
    families = {}
    for family, model in TINY.items():
        plain, shape = measure(model, micro_batch, checkpointing=False)
        ckpt, _ = measure(model, micro_batch, checkpointing=True)
        per = micro_batch * shape.size
        families[family] = {
            "model": model,
            "tokens": shape.tokens,
            "width": shape.width,
            "depth": round(shape.depth, 4),
            "saved_bytes": plain,
            "saved_bytes_checkpointing": ckpt,
            "factor": round(plain / per, 4),
            "factor_checkpointing": round(ckpt / per, 4),
        }
    return {
        "command": COMMAND,
        "torch": torch.__version__,
        "device": "cpu, float32",
        "micro_batch": micro_batch,
        "unit": "saved-for-backward bytes per (sample x token x width x depth), at 4-byte floats",
        "families": families,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--dry-run", action="store_true", help="print, do not rewrite the profile file")
    args = parser.parse_args()
    from diffusion_align.engine.memory.activations import PROFILES

    result = profiles(args.micro_batch)
    text = json.dumps(result, indent=2) + "\n"
    sys.stdout.write(text)
    if not args.dry_run:
        PROFILES.write_text(text)


if __name__ == "__main__":
    main()
