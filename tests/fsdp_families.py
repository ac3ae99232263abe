"""Run by torchrun in tests/test_fsdp.py (two CPU processes, gloo): for each tiny model family, the
denoiser's output and LoRA gradient through two calls (one with the adapter off, as the reference policy)
computed with the full weights, then again after `shard_denoiser`; rank 0 prints one JSON line of the
differences and of the frozen bytes this process holds before and after."""

import json
import sys

import torch
import torch.distributed as dist

from diffusion_align.config.registry import build_backbone, build_policy
from diffusion_align.config.settings import LoraSettings, ModelSettings, SampleSettings
from diffusion_align.engine.sharding import resident_bytes, shard_denoiser


def output_and_grad(policy, x, t, embeds):
    b = policy.backbone
    for p in policy.parameters():
        p.grad = None
    y = b.predict(x, t, embeds, 1.0)
    with policy.reference():
        ref = b.predict(x, t, embeds, 1.0)
    ((y - ref.detach()) ** 2 + y).mean().backward()
    return y.detach(), torch.cat([p.grad.flatten() for p in policy.parameters()])


def check(name: str) -> dict:
    torch.manual_seed(0)
    backbone = build_backbone(ModelSettings(pretrained=name, device="cpu"))
    policy = build_policy(backbone, SampleSettings(num_steps=2, guidance_scale=1.0), LoraSettings())
    with torch.no_grad():  # B = 0 at start would leave the adapter out of the output
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(backbone.latent_shape(2), generator=g)
    t = policy.sampler.timesteps(2, device="cpu")[:1].expand(2)
    embeds = backbone.encode_prompts(["a red circle", "a blue square"], None, guidance=False)
    full_out, full_grad = output_and_grad(policy, x, t, embeds)
    before = resident_bytes(backbone.unet)
    shard_denoiser(backbone.unet, policy.parameters(), "cpu")
    out, grad = output_and_grad(policy, x, t, embeds)
    return {
        "output": (out - full_out).abs().max().item(),
        "grad": (grad - full_grad).abs().max().item(),
        "grad_scale": full_grad.abs().max().item(),
        "bytes": [before, resident_bytes(backbone.unet)],
    }


if __name__ == "__main__":
    dist.init_process_group("gloo")
    result = {name: check(name) for name in sys.argv[1:]}
    if dist.get_rank() == 0:
        print(json.dumps(result))
    dist.destroy_process_group()
