"""Activation memory of a denoiser's forward+backward: measured on a small model, scaled to a large one.

Measured: the bytes autograd saves for backward during one forward at a micro-batch (torch's saved-tensor
hooks see every tensor saved; parameters and repeats of one storage are not counted). Scaled: a family's
activations grow with tokens x width x depth, so the measured bytes per (sample, token, channel, layer) of a
tiny model of that family times the large model's tokens, width and depth is the estimate. It is an estimate:
it assumes the small model's mix of layers and no attention matrix held for backward (SDPA on GPU keeps none;
the CPU measurement uses torch's flash kernel, which keeps none either).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusion_align.engine.backbones import FluxBackbone, SD3Backbone, StableDiffusionBackbone

PROFILES = Path(__file__).with_name("activation_profiles.json")
# exact backbone class -> the profile measured on a tiny model of that family; joint: text tokens run
# through every block beside the image tokens (MMDiT), so they count as tokens
FAMILIES = {StableDiffusionBackbone: "unet", SD3Backbone: "sd3", FluxBackbone: "flux"}
JOINT_ATTENTION = {"sd3", "flux"}


@dataclass(frozen=True)
class ActivationShape:
    tokens: int  # denoiser input tokens per sample: latent pixels (UNet) or patches (+ text tokens, MMDiT)
    width: int  # UNet: the first level's channels; transformers: heads x head dim
    depth: float  # layers; a UNet's counted at their share of the top level's tokens x channels

    @property
    def size(self) -> float:
        return self.tokens * self.width * self.depth


def family_of(backbone_class) -> str | None:
    return FAMILIES.get(backbone_class)


def activation_shape(family: str, denoiser, latent_hw: tuple[int, int], text_tokens: int) -> ActivationShape:
    """tokens, width and depth of `denoiser` (meta or real) for latents of `latent_hw` (height, width)."""
    h, w = latent_hw
    config = denoiser.config
    if family == "unet":
        channels = list(config.block_out_channels)
        return ActivationShape(h * w, channels[0], _unet_depth(denoiser, channels))
    patch = 2 if family == "flux" else config.patch_size  # FLUX packs 2x2 latents into one token
    tokens = (h // patch) * (w // patch) + (text_tokens if family in JOINT_ATTENTION else 0)
    blocks = len(denoiser.transformer_blocks) + len(getattr(denoiser, "single_transformer_blocks", []))
    return ActivationShape(tokens, config.num_attention_heads * config.attention_head_dim, blocks)


def _unet_depth(unet, channels: list[int]) -> float:
    """ResNet and transformer layers, each weighted by (its level's channels / the first's) / 4**level:
    a layer one level down sees a quarter of the tokens."""
    levels = len(channels)
    placed = [(i, b) for i, b in enumerate(unet.down_blocks)] + [(levels - 1, unet.mid_block)]
    placed += [(levels - 1 - i, b) for i, b in enumerate(unet.up_blocks)]
    depth = 0.0
    for level, block in placed:
        if block is None:
            continue
        layers = len(getattr(block, "resnets", [])) + sum(
            len(getattr(a, "transformer_blocks", [])) for a in getattr(block, "attentions", None) or []
        )
        depth += layers * channels[level] / channels[0] / 4**level
    return depth


def saved_activation_bytes(forward: Callable[[], torch.Tensor], parameters) -> int:
    """Bytes autograd holds for backward after `forward()` (then backward runs on its output's sum):
    each saved storage once, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in parameters}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    out.float().sum().backward()
    return sum(seen.values())


def load_profiles() -> dict:
    return json.loads(PROFILES.read_text())


def estimate_bytes(family: str, shape: ActivationShape, samples: int, element_bytes: int,
                   checkpointing: bool, profiles: dict | None = None) -> int | None:  # fmt: skip
    """Activation bytes of one forward+backward of `samples` through a model of `shape`; None when no
    profile was measured for `family`. The profile is in bytes per (sample, token, channel, layer) at 4-byte
    floats; `element_bytes` rescales it to the compute precision."""
    entry = (profiles or load_profiles())["families"].get(family)
    if entry is None:
        return None
    factor = entry["factor_checkpointing" if checkpointing else "factor"]
    return int(factor * samples * shape.size * element_bytes / 4)
