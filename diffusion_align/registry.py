"""The one place where config sections become objects. Everything built here takes plain arguments."""

from __future__ import annotations

from diffusion_align.backbones import load_backbone
from diffusion_align.policy import Policy
from diffusion_align.samplers import DDIMSampler
from diffusion_align.settings import LoraSettings, ModelSettings, SampleSettings


def build_backbone(model: ModelSettings):
    backbone = load_backbone(model.pretrained, model.dtype, model.device, model.revision, model.variant)
    backbone.enable_memory_options(
        gradient_checkpointing=model.gradient_checkpointing,
        vae_slicing=model.vae_slicing,
        vae_tiling=model.vae_tiling,
        attention=model.attention,
    )
    return backbone


def build_sampler(backbone, sample: SampleSettings) -> DDIMSampler:
    return DDIMSampler.from_scheduler(backbone.scheduler, eta=sample.eta)


def build_policy(backbone, sample: SampleSettings, lora: LoraSettings) -> Policy:
    sampler = build_sampler(backbone, sample)
    return Policy(backbone, sampler, lora.rank, lora.alpha, lora.dropout, tuple(lora.target_modules))
