"""Rollout wall time against a bare loop of the same denoiser calls, measured in the same run.

"bare" is the lower bound: the UNet called on the guidance-doubled batch once per step, with the guidance
combination and a plain Euler-like update, and nothing else. "rollout" is
`diffusion_align.engine.rollout.rollout` with DDIM-eta transitions, per-step noise draws, log-probs and
latent storage (decode off, so both sides run the same network calls). ratio = rollout / bare (target
<= 1.10). Calls alternate so background load hits both alike; the median of the repeats is reported.

    python benchmarks/bench_rollout.py   # tiny SD + SD1.5-size UNet (random weights, 16x16 latent)
    python benchmarks/bench_rollout.py --only tiny --steps 20 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion_align.engine.backbones import PromptEmbeds, StableDiffusionBackbone  # noqa: E402
from diffusion_align.engine.rollout import rollout  # noqa: E402
from diffusion_align.math.samplers import DDIMSampler  # noqa: E402
from diffusion_align.testing import tiny_sd  # noqa: E402

# The UNet of SD 1.5 (runwayml/stable-diffusion-v1-5 unet/config.json), random weights.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)


def build(kind: str, latent: int, batch: int) -> tuple[StableDiffusionBackbone, PromptEmbeds, torch.Tensor]:
    pipe = tiny_sd()
    if kind == "sd15":
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        pipe.register_modules(unet=UNet2DConditionModel(**SD15_UNET).eval())
    backbone = StableDiffusionBackbone(pipe)
    width = backbone.unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(0)
    embeds = PromptEmbeds(
        cond=torch.randn(batch, 77, width, generator=g), uncond=torch.randn(batch, 77, width, generator=g)
    )
    x_T = torch.randn(batch, 4, latent, latent, generator=g)
    return backbone, embeds, x_T


def bare_loop(backbone, embeds, x_T, steps: int, guidance: float) -> torch.Tensor:
    unet, hidden = backbone.unet, torch.cat([embeds.uncond, embeds.cond])
    x = x_T
    for t in backbone.scheduler.timesteps[:steps]:
        uncond, cond = unet(torch.cat([x, x]), t, encoder_hidden_states=hidden, return_dict=False)[0].chunk(2)
        x = x - 0.01 * (uncond + guidance * (cond - uncond))
    return x


def median_times(fns: dict, repeats: int, device: str) -> dict[str, float]:
    """Median wall seconds of each function, calls alternating after one warm-up each."""
    times = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def measure(kind: str, latent: int, batch: int, steps: int, repeats: int) -> dict:
    backbone, embeds, x_T = build(kind, latent, batch)
    sampler = DDIMSampler.from_scheduler(backbone.scheduler, eta=1.0)
    backbone.scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(0)

    def ours():
        rollout(backbone, sampler, embeds, x_T, steps, 5.0, generator=generator, decode=False)

    def bare():
        bare_loop(backbone, embeds, x_T, steps, 5.0)

    device = str(backbone.device)
    times = median_times({"rollout": ours, "bare": bare}, repeats, device)
    r, b = times["rollout"], times["bare"]
    return {
        "model": kind,
        "latent": latent,
        "batch": batch,
        "steps": steps,
        "rollout_s": r,
        "bare_s": b,
        "ratio": r / b,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["tiny", "sd15"], nargs="*", default=["tiny", "sd15"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = {"tiny": (16, 4), "sd15": (16, 1)}  # (latent side, batch)
    print(f"{'model':6} {'latent':>6} {'batch':>5} {'steps':>5} {'rollout s':>10} {'bare s':>8} {'ratio':>6}")
    for kind in args.only:
        m = measure(kind, *settings[kind], args.steps, args.repeats)
        print(
            f"{m['model']:6} {m['latent']:>6} {m['batch']:>5} {m['steps']:>5} "
            f"{m['rollout_s']:>10.4f} {m['bare_s']:>8.4f} {m['ratio']:>6.3f}"
        )


if __name__ == "__main__":
    main()
