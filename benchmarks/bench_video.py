"""Memory and time of one VADER-style reward-backprop step on a video model, against frames, gradient window
and decoded frames, with a bare lower bound measured in the same run.

One step = DDIM-eta rollout of `--steps` steps with gradient through the last K denoiser calls, VAE decode of
all T frames or of one random frame (VADER's default `decode_frame=-1`), a differentiable pixel reward, and
backward into the LoRA. "ours" goes through `rollout` + `VideoBackbone.decode` + `Policy`; "bare" is the lower
bound: the same UNet/VAE calls written inline (scheduler.step for the update, no log-probs, no trajectory
storage). Memory: each (implementation, setting) runs one step in its own subprocess, so the peak RSS
(ru_maxrss) is its own; `model MB` is the RSS after building the model, `step MB` the extra peak of the step.
Time: a third subprocess alternates ours and bare (so background load hits both alike) and reports medians
of the repeats after a warm-up; ratio = ours / bare.

    python benchmarks/bench_video.py                       # "small" AnimateDiff, T in 4 8 16, K in 1 2
    python benchmarks/bench_video.py --model tiny --frames 4 8 --windows 1
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build_small():
    """AnimateDiff with a wider UNet and an SD-shaped 4-level VAE (f=8): 128x128 frames, 16x16 latents,
    so the VAE decode costs what it costs in VADER relative to the UNet (the tiny test VAE is nearly free)."""
    from diffusers import (
        AnimateDiffPipeline,
        AutoencoderKL,
        DDIMScheduler,
        MotionAdapter,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    from diffusion_align.testing import _text_config
    from diffusion_align.testing_video import ANIMATEDIFF_SCHEDULER_CONFIG
    from rewards.tokenizers import clip_tokenizer

    torch.manual_seed(0)
    channels = (32, 64, 64)
    unet = UNet2DConditionModel(
        block_out_channels=channels,
        layers_per_block=1,
        sample_size=16,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    adapter = MotionAdapter(
        block_out_channels=channels,
        motion_layers_per_block=1,
        motion_norm_num_groups=8,
        motion_num_attention_heads=2,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 128, 128),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=128,
    )
    return AnimateDiffPipeline(
        unet=unet,
        vae=vae,
        text_encoder=CLIPTextModel(_text_config(32)),
        tokenizer=clip_tokenizer(),
        motion_adapter=adapter,
        scheduler=DDIMScheduler(**ANIMATEDIFF_SCHEDULER_CONFIG),
    )


def child(impl: str, model: str, frames: int, window: int, subset: bool, steps: int, repeats: int) -> dict:
    from diffusion_align.engine.backbones import VideoBackbone
    from diffusion_align.engine.policy import Policy
    from diffusion_align.engine.rollout import rollout
    from diffusion_align.math.samplers import DDIMSampler
    from diffusion_align.testing_video import tiny_animatediff
    from rewards.video import select_frames

    pipe = build_small() if model == "small" else tiny_animatediff()
    pipe.set_progress_bar_config(disable=True)
    backbone = VideoBackbone(pipe, num_frames=frames)
    sampler = DDIMSampler.from_scheduler(backbone.scheduler, eta=1.0)
    policy = Policy(backbone, sampler, rank=4)
    embeds = backbone.encode_prompts(["a red circle on a black background"])
    gen = torch.Generator().manual_seed(0)
    unet, vae, scheduler = backbone.unet, backbone.vae, backbone.scheduler
    scheduler.set_timesteps(steps)
    hidden = torch.cat([embeds.uncond, embeds.cond]).repeat_interleave(frames, dim=0)

    def frame_index():
        return select_frames(1, frames, "random", 1, gen) if subset else None

    def ours():
        x_T = backbone.initial_noise(1, gen)
        traj = rollout(
            backbone,
            sampler,
            embeds,
            x_T,
            steps,
            5.0,
            grad_steps=range(-window, 0),
            generator=gen,
            decode=False,
        )
        video = backbone.decode(traj.x0, frames=frame_index())
        (-video.mean()).backward()

    def bare():
        x = torch.randn(1, 4, frames, 16, 16, generator=gen)
        for i, t in enumerate(scheduler.timesteps):
            with torch.set_grad_enabled(i >= steps - window):
                uncond, cond = unet(torch.cat([x, x]), t, encoder_hidden_states=hidden, return_dict=False)[
                    0
                ].chunk(2)
            x = scheduler.step(uncond + 5.0 * (cond - uncond), t, x, eta=1.0, generator=gen).prev_sample
        lat = x.transpose(1, 2)[0]  # (T, C, h, w)
        idx = frame_index()
        lat = lat if idx is None else lat[idx[0]]
        image = vae.decode(lat / vae.config.scaling_factor, return_dict=False)[0]
        (-(image / 2 + 0.5).clamp(0, 1).mean()).backward()

    model_mb = _rss_mb()
    if impl != "time":
        (ours if impl == "ours" else bare)()
        return {"model_mb": model_mb, "step_mb": _rss_mb() - model_mb}
    times = {"ours": [], "bare": []}
    for _ in range(repeats + 1):  # the first round is a warm-up
        for name, fn in (("ours", ours), ("bare", bare)):
            policy.backbone.unet.zero_grad(set_to_none=True)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def run_child(args, impl, frames, window, subset) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        impl,
        "--model",
        args.model,
        "--steps",
        str(args.steps),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
        "--frames",
        str(frames),
        "--windows",
        str(window),
    ] + (["--subset"] if subset else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "small"], default="small")
    parser.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=["ours", "bare", "time"], help=argparse.SUPPRESS)
    parser.add_argument("--subset", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        result = child(
            args.child, args.model, args.frames[0], args.windows[0], args.subset, args.steps, args.repeats
        )
        print(json.dumps(result))
        return
    print(f"model={args.model} steps={args.steps} threads={args.threads} batch=1 CFG=5 (UNet batch 2)")
    print(
        f"{'T':>3} {'K':>2} {'decode':>6} {'model MB':>9} {'step MB':>8} {'bare MB':>8} {'ours s':>7} "
        f"{'bare s':>7} {'ratio':>6}"
    )
    for frames in args.frames:
        for window in args.windows:
            for subset in (False, True):
                ours = run_child(args, "ours", frames, window, subset)
                bare = run_child(args, "bare", frames, window, subset)
                t = run_child(args, "time", frames, window, subset)
                print(
                    f"{frames:>3} {window:>2} {'1 frm' if subset else 'all':>6} {ours['model_mb']:>9.0f} "
                    f"{ours['step_mb']:>8.0f} {bare['step_mb']:>8.0f} {t['ours']:>7.3f} "
                    f"{t['bare']:>7.3f} {t['ours'] / t['bare']:>6.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
