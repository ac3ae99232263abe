"""Config sections shared by every command: what model, how to sample, what LoRA.

Each field's comment is its documentation (it is what users read in the YAML recipes). Strategy and
training sections live next to the code that uses them and are gathered by the root config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from diffusion_align.policy import DEFAULT_TARGET_MODULES


@dataclass
class ModelSettings:
    pretrained: str = "tiny-sd"  # built-in name (tiny-sd, tiny-sdxl, shapes), local diffusers folder or hub id
    revision: str | None = None  # hub revision (branch, tag or commit)
    variant: str | None = None  # weight-file variant on the hub, e.g. "fp16"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # frozen base weights; LoRA trains in fp32
    device: str = "auto"  # "auto" = cuda when available, else cpu (accelerate overrides it when launched)
    gradient_checkpointing: bool = False  # recompute UNet activations in backward (reward backprop memory)
    vae_slicing: bool = False  # decode one image at a time
    vae_tiling: bool = False  # decode in tiles (large resolutions)
    attention: Literal["sdpa", "xformers"] = "sdpa"  # xformers needs the [xformers] extra


@dataclass
class SampleSettings:
    num_steps: int = 50  # DDIM steps (DDPO/AlignProp papers: 50)
    eta: float = 1.0  # DDIM eta; 1.0 = DDPM-like; policy-gradient methods need eta > 0
    guidance_scale: float = 5.0  # classifier-free guidance (DDPO: 5.0); <= 1 disables it
    negative_prompt: str | None = None  # None = the pipeline default ("" for SD, zeros for SDXL)
    height: int | None = None  # None = the model's native size
    width: int | None = None
    batch_size: int = 4  # images per rollout call (per process)
    seed: int = 0


@dataclass
class LoraSettings:
    rank: int = 4  # LoRA rank (DDPO: 4)
    alpha: float | None = None  # LoRA alpha; None = rank (scale 1)
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))


@dataclass
class RewardSettings:
    name: str = "jpeg_compressibility"  # a registered reward (see `rewards.REWARDS`) or "package.module:attr"
    weight: float = 1.0  # weight in the combined reward
    normalize: bool = False  # standardise by running mean/std before weighting
    args: dict = field(default_factory=dict)  # passed to the reward's from_pretrained, e.g. {pretrained: /path}
