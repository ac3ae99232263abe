"""Flow rollout wall time against a bare loop of the same transformer calls, measured in the same run.

"bare" is the lower bound: the SD3 transformer called on the guidance-doubled batch once per step, the
guidance combination and an Euler update, nothing else. "rollout" is `diffusion_align.engine.rollout.rollout`
with `FlowMatchSampler` at Flow-GRPO's noise level 0.7 (SDE steps, per-step noise draws, log-probs, latent
storage; decode off). ratio = rollout / bare (target <= 1.10). Calls alternate; the median is reported.

    python benchmarks/bench_flow_rollout.py                 # tiny SD3 (CPU, seconds)
    python benchmarks/bench_flow_rollout.py --only sd35m    # SD3.5-Medium transformer, random weights (GPU)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion_align.engine.backbones import PromptEmbeds  # noqa: E402
from diffusion_align.engine.backbones.sd3 import SD3Backbone  # noqa: E402
from diffusion_align.engine.rollout import rollout  # noqa: E402
from diffusion_align.math.flow_samplers import FlowMatchSampler  # noqa: E402
from diffusion_align.testing_flow import tiny_sd3  # noqa: E402

# stabilityai/stable-diffusion-3.5-medium transformer/config.json
SD35M = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
    pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)  # fmt: skip


def build(kind: str, device: str, dtype: torch.dtype):
    pipe = tiny_sd3()
    if kind == "sd35m":
        from diffusers import SD3Transformer2DModel

        torch.manual_seed(0)
        pipe.register_modules(transformer=SD3Transformer2DModel(**SD35M).eval())
    return SD3Backbone(pipe).to(device=device, dtype=dtype)


def measure(kind: str, latent: int, batch: int, steps: int, repeats: int, device: str, dtype) -> dict:
    backbone = build(kind, device, dtype)
    config = backbone.unet.config
    g = torch.Generator().manual_seed(0)
    text = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    embeds = PromptEmbeds(
        cond=text(batch, 77, config.joint_attention_dim),
        uncond=text(batch, 77, config.joint_attention_dim),
        pooled=text(batch, config.pooled_projection_dim),
        uncond_pooled=text(batch, config.pooled_projection_dim),
    )
    x_T = text(batch, config.in_channels, latent, latent)
    sampler = FlowMatchSampler(backbone.scheduler, 0.7)
    timesteps = sampler.timesteps(steps, device)
    generator = torch.Generator(device).manual_seed(0)

    def ours():
        rollout(backbone, sampler, embeds, x_T, steps, 4.5, generator=generator, decode=False)

    def bare():
        hidden = torch.cat([embeds.uncond, embeds.cond])
        pooled = torch.cat([embeds.uncond_pooled, embeds.pooled])
        x = x_T
        for t in timesteps:
            out = backbone.unet(
                hidden_states=torch.cat([x, x]), timestep=t.expand(2 * batch), encoder_hidden_states=hidden,
                pooled_projections=pooled, return_dict=False,
            )[0]  # fmt: skip
            uncond, cond = out.chunk(2)
            x = x - 0.01 * (uncond + 4.5 * (cond - uncond))

    times = {"rollout": [], "bare": []}
    with torch.no_grad():
        ours(), bare()  # warm-up
        for _ in range(repeats):
            for name, fn in (("rollout", ours), ("bare", bare)):
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
    r, b = statistics.median(times["rollout"]), statistics.median(times["bare"])
    return {"model": kind, "latent": latent, "batch": batch, "steps": steps, "rollout_s": r, "bare_s": b}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["tiny", "sd35m"], nargs="*", default=["tiny"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    settings = {"tiny": (16, 4), "sd35m": (32, 2)}  # (latent side, batch)
    print(f"{'model':6} {'latent':>6} {'batch':>5} {'steps':>5} {'rollout s':>10} {'bare s':>8} {'ratio':>6}")
    for kind in args.only:
        m = measure(kind, *settings[kind], args.steps, args.repeats, device, dtype)
        print(
            f"{m['model']:6} {m['latent']:>6} {m['batch']:>5} {m['steps']:>5} "
            f"{m['rollout_s']:>10.4f} {m['bare_s']:>8.4f} {m['rollout_s'] / m['bare_s']:>6.3f}"
        )


if __name__ == "__main__":
    main()
