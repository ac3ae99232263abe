"""ReNO: time per iteration against a bare forward+backward, and ReNO against best-of-N at equal reward calls.

1. Speed. "bare" is the lower bound of one ReNO iteration: the UNet called directly, the scheduler's step,
   the VAE decode, the reward and one backward to z, nothing else. "reno" is
   `diffusion_align.methods.reno.reno` (the generator wrappers, regulariser, clipping, optimiser step,
   history and best-image bookkeeping), timed over
   `--iters` iterations including its set-up, divided by the iterations. ratio = reno / bare (target <= 1.10).
   Calls alternate so background load hits both alike; the median of the repeats is reported.
   Models: tiny-sd (1 Euler-ancestral step, trailing), the bundled shapes model (2 DDIM steps, CFG 3) and,
   with --only turbo, an SD-Turbo-size UNet (SD 2.1 architecture, random weights) at a small latent.
2. Quality. On the bundled shapes model (2 DDIM steps, trailing spacing, CFG 3), ReNO with N iterations
   against best-of-N and FK steering (N/2 particles, max potential, lambda 10, resampling at both steps;
   same start seeds 0, N, 2N, ...; N reward calls each), over held-out prompts x seeds: mean best
   differentiable reward, and the
   detector-based shapes_match / shapes_color of the chosen images (not optimised, so it shows transfer).
3. Steps (--only steps). Mean reward of single samples of the shapes model at 1, 2, 4, 10 steps through the
   ReNO/search generator ("auto": DDIM with trailing spacing) against the model's own scheduler ("native":
   DDIM with the "leading" spacing it ships, one step at t=1; what "auto" did before trailing spacing).

    python benchmarks/bench_reno.py                       # speed (tiny, shapes) + quality
    python benchmarks/bench_reno.py --only turbo          # SD-Turbo-size UNet on CPU (a few minutes)
    python benchmarks/bench_reno.py --only steps --guidance 0 --prompts 16 --seeds 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_rollout import SD15_UNET  # noqa: E402  (a sibling script: benchmarks/ is sys.path[0])

import rewards  # noqa: E402
from diffusion_align.engine.backbones import StableDiffusionBackbone, load_backbone  # noqa: E402
from diffusion_align.engine.few_step import draw_noise, generation_scheduler, make_generator  # noqa: E402
from diffusion_align.methods.reno import reno  # noqa: E402
from diffusion_align.methods.search import best_of_n, fk_steering  # noqa: E402
from diffusion_align.zoo.shapes_data import heldout_prompts  # noqa: E402

PROMPT = "one large red circle on a white background"
# The UNet of SD-Turbo (= SD 2.1 base, stabilityai/sd-turbo unet/config.json), random weights.
SD_TURBO_UNET = {
    **SD15_UNET,  # same layout as SD 1.5, with SD 2.x's OpenCLIP-H text width and linear projections
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
}


def build(kind: str):
    """(backbone, steps, guidance) for a speed case."""
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler

    if kind == "shapes":
        return load_backbone("shapes", device="cpu"), 2, 3.0
    from diffusion_align.testing import tiny_sd

    pipe = tiny_sd()
    if kind == "turbo":
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        torch.manual_seed(0)
        pipe.register_modules(unet=UNet2DConditionModel(**{**SD_TURBO_UNET, "sample_size": 8}).eval())
        text = pipe.text_encoder.config.to_dict()
        text.update(hidden_size=1024, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=8)
        pipe.register_modules(text_encoder=CLIPTextModel(CLIPTextConfig(**text)).eval())
    config = DDIMScheduler.from_config(pipe.scheduler.config).config
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(config, timestep_spacing="trailing")
    return StableDiffusionBackbone(pipe), 1, 0.0


def bare_iteration(backbone, scheduler, hidden, z, steps: int, guidance: float, reward, prompts):
    """One forward+backward through UNet, scheduler step, VAE decode and reward, and nothing else."""
    z = z.detach().requires_grad_()
    scheduler.set_timesteps(steps)
    x = z * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        if guidance > 1:
            out = backbone.unet(torch.cat([x_in, x_in]), t, encoder_hidden_states=hidden, return_dict=False)[
                0
            ]
            uncond, cond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
        else:
            out = backbone.unet(x_in, t, encoder_hidden_states=hidden, return_dict=False)[0]
        x = scheduler.step(out, t, x, generator=torch.Generator().manual_seed(0), return_dict=False)[0]
    images = (
        backbone.vae.decode(x / backbone.vae.config.scaling_factor, return_dict=False)[0] / 2 + 0.5
    ).clamp(0, 1)
    reward(images, prompts).sum().backward()
    return z.grad


def speed(kind: str, iters: int, repeats: int) -> dict:
    backbone, steps, guidance = build(kind)
    reward = rewards.build("shapes_color_soft")
    if steps > 1:  # the DDIM path: the same scheduler math and spacing as ReNO's, with diffusers' own step
        scheduler = generation_scheduler(backbone.scheduler)
    else:
        scheduler = type(backbone.scheduler).from_config(backbone.scheduler.config)
    embeds = backbone.encode_prompts([PROMPT], guidance=guidance > 1)
    hidden = torch.cat([embeds.uncond, embeds.cond]) if guidance > 1 else embeds.cond
    z = draw_noise(backbone, [0])

    def ours():
        reno(
            backbone,
            reward,
            PROMPT,
            iterations=iters,
            num_steps=steps,
            guidance_scale=guidance,
            progress=False,
        )

    def bare():
        for _ in range(iters):
            bare_iteration(backbone, scheduler, hidden, z, steps, guidance, reward, [PROMPT])

    times = {"reno": [], "bare": []}
    ours(), bare()  # warm-up
    for _ in range(repeats):
        for name, fn in (("reno", ours), ("bare", bare)):
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) / iters)
    r, b = statistics.median(times["reno"]), statistics.median(times["bare"])
    latent = z.shape[-1]
    return {"model": kind, "latent": latent, "steps": steps, "reno_s": r, "bare_s": b, "ratio": r / b}


def quality(n_prompts: int, seeds: int, budget: int, reward_name: str) -> dict:
    backbone = load_backbone("shapes", device="cpu")
    if reward_name == "clip":
        from diffusion_align.zoo import bundled_path

        reward = {"clip": rewards.build("clip", pretrained=str(bundled_path("shapes-clip")))}
    else:
        reward = {reward_name: rewards.build(reward_name)}
    judges = {"shapes_match": rewards.build("shapes_match"), "shapes_color": rewards.build("shapes_color")}
    rows = {"initial": [], "reno": [], "best_of_n": [], "fk": []}
    judged = {k: {j: [] for j in judges} for k in rows}
    common = dict(num_steps=2, guidance_scale=3.0, progress=False)
    for prompt in heldout_prompts(n_prompts):
        for seed in range(seeds):
            # seeds s, s+1, ... for best-of-N: its first candidate is ReNO's starting image
            s = seed * budget
            r = reno(backbone, reward, prompt, iterations=budget, seed=s, **common)
            b = best_of_n(backbone, reward, prompt, r.reward_calls, seed=s, **common)
            # FK on the same 2-step chain: budget/2 particles scored at both steps = the same reward calls
            f = fk_steering(backbone, reward, prompt, num_particles=budget // 2, seed=s, **common)
            assert f.reward_calls == r.reward_calls == b.reward_calls
            first = r.strip[0]
            for key, value, image in (
                ("initial", r.initial_reward, first),
                ("reno", r.best_reward, r.best_image),
                ("best_of_n", b.best_reward, b.best_image),
                ("fk", f.best_reward, f.best_image),
            ):
                rows[key].append(value)
                for j, judge in judges.items():
                    judged[key][j].append(float(judge(image[None], [prompt])))
    return {
        k: {"reward": statistics.mean(v), **{j: statistics.mean(judged[k][j]) for j in judges}}
        for k, v in rows.items()
    }


@torch.no_grad()
def steps_table(n_prompts: int, seeds: int, guidance: float) -> dict:
    """{(scheduler, steps): {reward: mean over prompts x seeds}} of single samples of the shapes model."""
    backbone = load_backbone("shapes", device="cpu")
    judges = {n: rewards.build(n) for n in ("shapes_color_soft", "shapes_color", "shapes_match")}
    seed_list = list(range(seeds))
    table = {}
    for scheduler in ("native", "auto"):
        for steps in (1, 2, 4, 10):
            generate = make_generator(backbone, steps, guidance, scheduler)
            scores = {n: [] for n in judges}
            for prompt in heldout_prompts(n_prompts):
                embeds = backbone.encode_prompts([prompt], guidance=guidance > 1).repeat_interleave(seeds)
                images = generate(draw_noise(backbone, seed_list), embeds, seed_list)
                for n, judge in judges.items():
                    scores[n].extend(judge(images, [prompt] * seeds).float().tolist())
            table[scheduler, steps] = {n: statistics.mean(v) for n, v in scores.items()}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["tiny", "shapes", "turbo", "quality", "steps"], nargs="*",
                        default=["tiny", "shapes", "quality"])  # fmt: skip
    parser.add_argument("--iters", type=int, default=10, help="ReNO iterations per timed call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=6, help="held-out prompts in the quality comparison")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--budget", type=int, default=20, help="reward calls per method (ReNO iterations = N)"
    )
    parser.add_argument(
        "--reward", default="shapes_color_soft", help="shapes_color_soft or clip (shapes-clip)"
    )
    parser.add_argument("--guidance", type=float, default=3.0, help="CFG scale of the steps table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    speeds = [k for k in args.only if k not in ("quality", "steps")]
    if speeds:
        print(f"{'model':7} {'latent':>6} {'steps':>5} {'reno s/it':>10} {'bare s/it':>10} {'ratio':>6}")
    for kind in speeds:
        repeats = 2 if kind == "turbo" else args.repeats
        m = speed(kind, 2 if kind == "turbo" else args.iters, repeats)
        print(
            f"{m['model']:7} {m['latent']:>6} {m['steps']:>5} {m['reno_s']:>10.4f} {m['bare_s']:>10.4f} "
            f"{m['ratio']:>6.3f}"
        )
    if "quality" in args.only:
        q = quality(args.prompts, args.seeds, args.budget, args.reward)
        n = args.prompts * args.seeds
        print(
            f"\nshapes model, 2 DDIM steps, CFG 3; {args.reward}; {n} prompt x seed runs; N = {args.budget}"
        )
        print(f"{'method':18} {'mean best reward':>17} {'shapes_match':>13} {'shapes_color':>13}")
        labels = {"initial": "single sample", "best_of_n": f"best-of-{args.budget}",
                  "fk": f"FK {args.budget // 2} particles", "reno": f"ReNO {args.budget} it"}  # fmt: skip
        for name, label in labels.items():
            row = q[name]
            print(
                f"{label:18} {row['reward']:>17.4f} {row['shapes_match']:>13.4f} {row['shapes_color']:>13.4f}"
            )

    if "steps" in args.only:
        table = steps_table(args.prompts, args.seeds, args.guidance)
        print(f"\nshapes model single samples, CFG {args.guidance}; {args.prompts} held-out prompts x seeds "
              f"0..{args.seeds - 1}")  # fmt: skip
        print(
            f"{'spacing':8} {'steps':>5} {'shapes_color_soft':>18} {'shapes_color':>13} {'shapes_match':>13}"
        )
        for (scheduler, steps), row in table.items():
            spacing = "leading" if scheduler == "native" else "trailing"
            print(f"{spacing:8} {steps:>5} {row['shapes_color_soft']:>18.3f} {row['shapes_color']:>13.3f} "
                  f"{row['shapes_match']:>13.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
