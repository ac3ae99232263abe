"""Flow rollout wall time against a bare loop of the same transformer calls, measured in the same run.

"bare" is the lower bound, the pipeline's own loop with nothing else: for SD3 the transformer on the
guidance-doubled batch, the guidance combination and an Euler update; for FLUX (guidance-distilled) one call
per step on packed latents with img_ids/txt_ids, the guidance embedding and timestep/1000, and an Euler update
on the packed latents. "rollout" is `diffusion_align.engine.rollout.rollout` with `FlowMatchSampler` at
Flow-GRPO's noise level 0.7 (SDE steps, per-step noise draws, log-probs, latent storage; decode off; for
FLUX the backbone's pack/unpack and ids every step). ratio = rollout / bare (target <= 1.10). Calls
alternate; the median is reported.

The full-size configs use random weights. FLUX.1-dev's 12B parameters do not fit a small machine, so
`--flux-blocks DOUBLE SINGLE` keeps its width with fewer blocks. The ratio at reduced depth is an upper
bound on the full model's: the rollout's extra time per step O (sampler math, noise, log-probs, packing)
does not depend on depth while the transformer call T grows with it, so (T + O) / T falls as blocks are added.

    python benchmarks/bench_flow_rollout.py                 # tiny SD3 (CPU, seconds)
    python benchmarks/bench_flow_rollout.py --only sd35m    # SD3.5-Medium transformer, random weights (GPU)
    python benchmarks/bench_flow_rollout.py --only flux     # FLUX.1-dev transformer, random weights (GPU)
    python benchmarks/bench_flow_rollout.py --only sd35m flux --flux-blocks 2 4 --latent 8 --batch 1 \
        --text-tokens 16 --steps 3 --repeats 3              # CPU-sized
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_rollout import median_times  # noqa: E402  (a sibling script: benchmarks/ is sys.path[0])

from diffusion_align.engine.backbones import PromptEmbeds  # noqa: E402
from diffusion_align.engine.backbones.flux import FluxBackbone  # noqa: E402
from diffusion_align.engine.backbones.sd3 import SD3Backbone  # noqa: E402
from diffusion_align.engine.rollout import rollout  # noqa: E402
from diffusion_align.math.flow_samplers import FlowMatchSampler  # noqa: E402
from diffusion_align.testing_flow import tiny_flux, tiny_sd3  # noqa: E402

# stabilityai/stable-diffusion-3.5-medium transformer/config.json
SD35M = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
    pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)  # fmt: skip
# black-forest-labs/FLUX.1-dev transformer/config.json (num_layers / num_single_layers from --flux-blocks)
FLUX_DEV = dict(
    patch_size=1, in_channels=64, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
    pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)  # fmt: skip
# GPU defaults: (latent side, batch, text tokens, guidance scale); FLUX: its 512 T5 tokens, dev's guidance 3.5
SETTINGS = {"tiny": (16, 4, 77, 4.5), "sd35m": (32, 2, 77, 4.5), "flux": (32, 2, 512, 3.5)}


def build(kind: str, flux_blocks: tuple[int, int], device: str, dtype: torch.dtype):
    if kind == "flux":
        pipe = tiny_flux()
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(
            **FLUX_DEV, num_layers=flux_blocks[0], num_single_layers=flux_blocks[1]
        )
        pipe.register_modules(transformer=transformer.eval())
        return FluxBackbone(pipe).to(device=device, dtype=dtype)
    pipe = tiny_sd3()
    if kind == "sd35m":
        torch.manual_seed(0)
        pipe.register_modules(transformer=SD3Transformer2DModel(**SD35M).eval())
    return SD3Backbone(pipe).to(device=device, dtype=dtype)


def bare_sd3(transformer, embeds: PromptEmbeds, x_T, timesteps, sigmas, guidance: float):
    """StableDiffusion3Pipeline's loop: one call on [uncond, cond], CFG, Euler."""
    hidden = torch.cat([embeds.uncond, embeds.cond])
    pooled = torch.cat([embeds.uncond_pooled, embeds.pooled])
    x = x_T
    for t, dt in zip(timesteps, sigmas.diff(), strict=True):
        out = transformer(
            hidden_states=torch.cat([x, x]), timestep=t.expand(2 * len(x)), encoder_hidden_states=hidden,
            pooled_projections=pooled, return_dict=False,
        )[0]  # fmt: skip
        uncond, cond = out.chunk(2)
        x = x + dt * (uncond + guidance * (cond - uncond))
    return x


def bare_flux(transformer, embeds: PromptEmbeds, x_T, timesteps, sigmas, guidance: float, vae_scale: int):
    """FluxPipeline's loop: latents packed once, ids once, one call per step with the guidance embedding
    and timestep / 1000, Euler on the packed latents, unpacked at the end."""
    b, c, h, w = x_T.shape
    x = FluxPipeline._pack_latents(x_T, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
    txt_ids = torch.zeros(embeds.cond.shape[1], 3, device=x.device, dtype=x.dtype)
    scale = torch.full((b,), guidance, device=x.device, dtype=torch.float32)
    for t, dt in zip(timesteps, sigmas.diff(), strict=True):
        v = transformer(
            hidden_states=x, timestep=t.expand(b).to(x.dtype) / 1000, guidance=scale,
            pooled_projections=embeds.pooled, encoder_hidden_states=embeds.cond, txt_ids=txt_ids,
            img_ids=img_ids, return_dict=False,
        )[0]  # fmt: skip
        x = x + dt * v
    return FluxPipeline._unpack_latents(x, h * vae_scale, w * vae_scale, vae_scale)


def setup(kind, latent, batch, tokens, guidance, flux_blocks, device, dtype, eta=0.7):
    """The backbone, its prompt embeddings, x_T, a sampler at noise `eta`, and the bare loop as a closure."""
    backbone = build(kind, flux_blocks, device, dtype)
    config = backbone.unet.config
    g = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    cond, pooled = (
        randn(batch, tokens, config.joint_attention_dim),
        randn(batch, config.pooled_projection_dim),
    )
    channels = config.in_channels // 4 if kind == "flux" else config.in_channels  # FLUX packs 2x2 patches
    x_T = randn(batch, channels, latent, latent)
    size = (latent * backbone.vae_scale_factor,) * 2
    sampler = FlowMatchSampler.for_backbone(backbone, eta, size=size)
    if kind == "flux":
        embeds = PromptEmbeds(cond=cond, pooled=pooled)
        bare = lambda ts, sig: bare_flux(  # noqa: E731
            backbone.unet, embeds, x_T, ts, sig, guidance, backbone.pipe.vae_scale_factor
        )
    else:
        uncond, uncond_pooled = randn(*cond.shape), randn(*pooled.shape)
        embeds = PromptEmbeds(cond=cond, uncond=uncond, pooled=pooled, uncond_pooled=uncond_pooled)
        bare = lambda ts, sig: bare_sd3(backbone.unet, embeds, x_T, ts, sig, guidance)  # noqa: E731
    return backbone, embeds, x_T, sampler, bare


def measure(kind, latent, batch, tokens, guidance, steps, repeats, flux_blocks, device, dtype) -> dict:
    backbone, embeds, x_T, sampler, bare = setup(
        kind, latent, batch, tokens, guidance, flux_blocks, device, dtype
    )
    timesteps = sampler.timesteps(steps, device)
    sigmas = sampler.scheduler.sigmas.to(device, torch.float32)
    generator = torch.Generator(device).manual_seed(0)
    fns = {
        "rollout": lambda: rollout(
            backbone, sampler, embeds, x_T, steps, guidance, generator=generator, decode=False
        ),
        "bare": lambda: bare(timesteps, sigmas),
    }
    return median_times(fns, repeats, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(SETTINGS), nargs="*", default=["tiny"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--latent", type=int, help="latent side (default per model, see SETTINGS)")
    parser.add_argument("--batch", type=int, help="prompts per call (default per model)")
    parser.add_argument("--text-tokens", type=int, help="prompt tokens (default per model)")
    parser.add_argument("--flux-blocks", type=int, nargs=2, default=(19, 38), metavar=("DOUBLE", "SINGLE"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(
        f"{'model':11} {'latent':>6} {'batch':>5} {'tokens':>6} {'steps':>5} "
        f"{'rollout s':>10} {'bare s':>8} {'ratio':>6}"
    )
    for kind in args.only:
        latent, batch, tokens, guidance = SETTINGS[kind]
        latent, batch, tokens = args.latent or latent, args.batch or batch, args.text_tokens or tokens
        t = measure(
            kind, latent, batch, tokens, guidance, args.steps, args.repeats, args.flux_blocks, device, dtype
        )
        name = f"flux {args.flux_blocks[0]}+{args.flux_blocks[1]}" if kind == "flux" else kind
        print(
            f"{name:11} {latent:>6} {batch:>5} {tokens:>6} {args.steps:>5} "
            f"{t['rollout']:>10.4f} {t['bare']:>8.4f} {t['rollout'] / t['bare']:>6.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
