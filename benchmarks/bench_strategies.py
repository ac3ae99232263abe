"""Per-iteration cost of each strategy against a bare-compute lower bound, and reward-backprop memory.

    python benchmarks/bench_strategies.py                      # tiny-sd, CPU, every strategy
    python benchmarks/bench_strategies.py --model shapes --steps 10 --samples 8
    python benchmarks/bench_strategies.py --no-checkpointing   # AlignProp/DRaFT keep the window's activations
    python benchmarks/bench_strategies.py --memory             # AlignProp/DRaFT peak memory vs window
    python benchmarks/bench_strategies.py --model tiny-sd3 --strategies flow_grpo,flow_grpo_fast,diffusion_nft

Time: one iteration = collect + plan + every micro-batch's loss/backward + optimizer step, through the real
trainer-facing interface. The lower bound replays exactly the denoiser calls that iteration made (recorded by
forward hooks: same input shapes, same grad/no-grad, a backward for each grad call) and VAE-decoder calls in a
plain loop, on the same model in the same process. Ratio = strategy / bound (target <= 1.15; the rest is the
reward, log-prob math, the optimizer and bookkeeping).

Memory: peak RSS (resource.getrusage maxrss) of a fresh subprocess per setting on CPU (tracemalloc does not
see torch's allocator), torch.cuda.max_memory_allocated on GPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time

import torch
from torch.utils.checkpoint import checkpoint as grad_checkpoint

STRATEGIES = ["ddpo", "d3po", "prdp", "alignprop", "draft"]
# benchmark name -> strategy settings (flow models: `--model tiny-sd3`); Fast: a 2-step SDE window in the
# first half of the chain, the cost per epoch to compare with full Flow-GRPO
PRESETS = {
    "flow_grpo": {"name": "flow_grpo", "group_size": 2, "beta": 0.0},
    "flow_grpo_fast": {
        "name": "flow_grpo",
        "group_size": 2,
        "beta": 0.0,
        "sde_window": 2,
        "timestep_window": 0.5,
    },
    "diffusion_nft": {"name": "diffusion_nft", "group_size": 2, "kl_beta": 0.0},
}


def build(model: str, strategy: str, steps: int, samples: int, device: str, extra: dict | None = None):
    from diffusion_align.builder import build_strategy
    from diffusion_align.config import load_config
    from diffusion_align.config.registry import build_backbone, build_policy, build_reward

    reward = "shapes_color_soft" if strategy in ("alignprop", "draft") else "jpeg_compressibility"
    s_cfg = {**PRESETS.get(strategy, {"name": strategy}), **(extra or {})}
    if strategy == "prdp":
        s_cfg.setdefault("group_size", 2)
    if strategy == "alignprop":  # a cut scaled to the short chain: the last ~steps/5 steps (paper: 8 of 50)
        s_cfg.setdefault("truncation", "fixed")
        s_cfg.setdefault("truncation_fixed", max(0, steps - max(1, steps // 5)))
    config = load_config(
        {
            "model": {"pretrained": model, "device": device},
            "strategy": s_cfg,
            "sample": {"num_steps": steps, "batch_size": samples, "guidance_scale": 1.0},
            "rewards": [{"name": reward}],
        }
    )
    backbone = build_backbone(config.model)
    policy = build_policy(backbone, config.sample, config.lora)
    reward_fn = build_reward(config.rewards, backbone.device)
    strategy_obj = build_strategy(config, policy, reward_fn)
    return backbone, policy, strategy_obj


def captions(n: int) -> list[str]:
    from diffusion_align.prompts import load_prompts

    return load_prompts("shapes_train")[:n]


def iteration(policy, strategy, prompts, optimizer, micro: int, seed: int) -> None:
    gens = [torch.Generator(policy.backbone.device).manual_seed(seed + i) for i in range(len(prompts))]
    with torch.no_grad():
        batch = strategy.collect(prompts, gens)
    for _ in range(getattr(strategy, "num_inner_epochs", 1)):
        for micros in strategy.plan(batch, len(prompts), micro, torch.Generator().manual_seed(seed)):
            optimizer.zero_grad(set_to_none=True)
            for m in micros:
                loss, _ = strategy.loss(m)
                (loss * m["weight"]).backward()
            optimizer.step()


def record_calls(unet, decoder):
    """Record every denoiser and VAE-decoder call: (kind, its arguments, grad enabled). Tensors are kept as
    (shape, dtype) and other values as they are, so any family's denoiser (UNet, SD3/FLUX transformer) can be
    replayed with fresh tensors of the same shapes."""
    calls = []

    def spec(value):
        return ("tensor", tuple(value.shape), value.dtype) if torch.is_tensor(value) else ("value", value)

    def hook(kind):
        def record(module, args, kwargs, out):
            arguments = ([spec(a) for a in args], {k: spec(v) for k, v in kwargs.items()})
            calls.append((kind, arguments, torch.is_grad_enabled()))

        return record

    handles = [
        unet.register_forward_hook(hook("unet"), with_kwargs=True),
        decoder.register_forward_hook(hook("decoder"), with_kwargs=True),
    ]
    return calls, handles


def bare(backbone, calls, device, dtype, checkpointing: bool = False) -> None:
    """The recorded denoiser and decoder calls, nothing else: forward, and a backward for those with gradient
    (the decoder's backward is part of reward backprop: pixels -> latents). `checkpointing`: the denoiser
    calls with gradient are recomputed in backward, as the strategy does when it checkpoints (that recompute
    is the price of its memory saving, not overhead). Timesteps are 500 (any valid one costs the same)."""

    def make(spec, grad, name=None):
        if spec[0] == "value":
            return spec[1]
        shape, tensor_dtype = spec[1], spec[2]
        if name in ("timestep", "t") or not tensor_dtype.is_floating_point:
            return torch.full(shape, 500, device=device, dtype=tensor_dtype)
        return torch.randn(shape, device=device, dtype=tensor_dtype, requires_grad=grad)

    for kind, (args, kwargs), grad in calls:
        module = backbone.unet if kind == "unet" else backbone.vae.decoder
        inputs = [make(a, grad and i == 0, "t" if i == 1 else None) for i, a in enumerate(args)]
        named = {k: make(v, False, k) for k, v in kwargs.items()}
        with torch.set_grad_enabled(grad):
            if kind == "unet" and grad and checkpointing:
                out = grad_checkpoint(functools.partial(module, **named), *inputs, use_reentrant=False)
            else:
                out = module(*inputs, **named)
            out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
        if grad:
            out.float().mean().backward()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_strategy(args, name: str) -> dict:
    extra = (
        {"gradient_checkpointing": False} if args.no_checkpointing and name in ("alignprop", "draft") else {}
    )
    backbone, policy, strategy = build(args.model, name, args.steps, args.samples, args.device, extra)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    prompts = captions(args.samples)
    iteration(policy, strategy, prompts, optimizer, args.micro, 0)  # warm-up
    calls, handles = record_calls(backbone.unet, backbone.vae.decoder)
    iteration(policy, strategy, prompts, optimizer, args.micro, 1)
    for handle in handles:
        handle.remove()
    recorded = list(calls)
    checkpointing = getattr(strategy.config, "gradient_checkpointing", False)
    bare(backbone, recorded, backbone.device, backbone.dtype, checkpointing)  # warm-up
    strategy_s, bare_s = [], []
    for r in range(args.repeats):  # interleaved so load changes hit both alike
        sync(args.device)
        t0 = time.perf_counter()
        iteration(policy, strategy, prompts, optimizer, args.micro, 2 + r)
        sync(args.device)
        t1 = time.perf_counter()
        bare(backbone, recorded, backbone.device, backbone.dtype, checkpointing)
        sync(args.device)
        t2 = time.perf_counter()
        strategy_s.append(t1 - t0)
        bare_s.append(t2 - t1)
    s, b = min(strategy_s), min(bare_s)
    return {
        "strategy": name,
        "denoiser_calls": sum(c[0] == "unet" for c in recorded),
        "decoder_calls": sum(c[0] == "decoder" for c in recorded),
        "grad_calls": sum(c[2] for c in recorded),
        "checkpointing": checkpointing,
        "iteration_s": round(s, 4),
        "bare_s": round(b, 4),
        "ratio": round(s / b, 3),
    }


def memory_child(args) -> None:
    """One setting in this process; prints {"peak_mb": ...}."""
    import resource

    extra = json.loads(args.child)
    name = extra.pop("name")
    backbone, policy, strategy = build(args.model, name, args.steps, args.samples, args.device, extra)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    iteration(policy, strategy, captions(args.samples), optimizer, args.micro, 0)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"peak_mb": round(peak, 1)}))


def memory_sweep(args) -> list[dict]:
    rows = []
    windows = sorted({1, 2, max(1, args.steps // 2), args.steps})
    for k in windows:
        for ckpt in (False, True):
            setting = {"name": "draft", "k": k if k < args.steps else 0, "gradient_checkpointing": ckpt}
            child = [sys.executable, __file__, "--child", json.dumps(setting), "--model", args.model,
                     "--steps", str(args.steps), "--samples", str(args.samples), "--micro", str(args.micro),
                     "--device", args.device]  # fmt: skip
            out = subprocess.run(child, capture_output=True, text=True)
            if out.returncode != 0:
                rows.append(
                    {"window": k, "checkpointing": ckpt, "error": out.stderr.strip().splitlines()[-1]}
                )
                continue
            rows.append(
                {"window": k, "checkpointing": ckpt, **json.loads(out.stdout.strip().splitlines()[-1])}
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-sd")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument(
        "--no-checkpointing", action="store_true", help="AlignProp/DRaFT without gradient checkpointing"
    )
    parser.add_argument(
        "--memory", action="store_true", help="reward-backprop memory vs window (subprocesses)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return memory_child(args)
    torch.manual_seed(0)
    print(
        f"model={args.model} steps={args.steps} samples={args.samples} micro={args.micro} "
        f"device={args.device}"
    )
    if args.memory:
        memory_sweep(args)
        return
    for name in args.strategies.split(","):
        try:
            print(json.dumps(time_strategy(args, name)), flush=True)
        except Exception as e:  # one broken strategy should not hide the others' numbers
            print(json.dumps({"strategy": name, "error": f"{type(e).__name__}: {e}"[:300]}), flush=True)


if __name__ == "__main__":
    main()
