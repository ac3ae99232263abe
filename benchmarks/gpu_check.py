"""One prepared GPU check: DDPO, DRaFT-K and Flow-GRPO iterations per second and peak memory on SD 1.5-size
and SDXL-size UNets and an SD3.5-Medium-size transformer with random weights, as one Markdown table.

    bash benchmarks/gpu_check.sh           # on a GPU: full-size models, <= 8 minutes (see --budget)
    bash benchmarks/gpu_check.sh --tiny    # anywhere: the tiny test models on CPU (CI runs this)

Models: the denoisers are built from the published configs in tests/full_size/ (the ones `plan` is tested
on), the VAEs and text encoders from the same architectures' widths (T5-XXL included for SD3.5), all with
random weights: nothing is downloaded. One iteration is what the trainer runs per optimizer step, through the
real strategies (`builder.build_strategy`, via bench_strategies' `iteration`): collect a batch of samples
(no grad), then every micro-batch's loss and backward, then the AdamW step; bf16 or fp16 autocast over fp32
LoRA weights as `train.mixed_precision` does. Settings: dtype x attention (SDPA; xformers too when
importable) x gradient checkpointing off/on (DDPO: the denoiser's per-block checkpointing; DRaFT-K: the
strategy's per-call checkpointing and the denoiser's). Settings left when --budget seconds have passed are
listed as skipped rather than run, so the check ends in time on a slower GPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_strategies import PRESETS, captions, iteration, sync  # noqa: E402

FULL = Path(__file__).resolve().parents[1] / "tests" / "full_size"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# model -> strategies, image side in px, samples per iteration, micro-batch, sampling steps (full size);
# SD 1.5 at ddpo-pytorch's 512 px / sample batch 8 / train batch 4, SDXL at 1024 px, SD3.5-M at Flow-GRPO's
# 512 px
MODELS = {
    "SD1.5 UNet": (("ddpo", "draft"), 512, 8, 4, 10),
    "SDXL UNet": (("ddpo", "draft"), 1024, 4, 2, 10),
    "SD3.5-M transformer": (("flow_grpo",), 512, 8, 4, 10),
}
TINY = {"SD1.5 UNet": "tiny-sd", "SDXL UNet": "tiny-sdxl", "SD3.5-M transformer": "tiny-sd3"}
STRATEGY_SETTINGS = {
    "ddpo": {"name": "ddpo"},
    "draft": {"name": "draft", "k": 1},  # DRaFT-K at the paper's K = 1
    "flow_grpo": PRESETS["flow_grpo"],
}
LABELS = {"ddpo": "DDPO", "draft": "DRaFT-K (K=1)", "flow_grpo": "Flow-GRPO"}


def _json(name: str) -> dict:
    return json.loads((FULL / name).read_text())


def _clip(hidden: int, layers: int, projection: int | None = None, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    base = {
        k: v for k, v in _json("sd15_text_encoder.json").items() if k not in ("architectures", "model_type")
    }
    if hidden != 768:  # OpenCLIP ViT-bigG/14's text tower (SDXL and SD3 text_encoder_2)
        base.update(hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=hidden // 64,
                    num_hidden_layers=layers, hidden_act="gelu")  # fmt: skip
    config = CLIPTextConfig(**{**base, "projection_dim": projection or base["projection_dim"]})
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def full_size_pipeline(name: str):
    """A diffusers pipeline of full-size architecture with random weights (build it under the device)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    from diffusion_align.testing import SD_SCHEDULER_CONFIG
    from diffusion_align.testing_flow import SD3_SCHEDULER_CONFIG, t5_tokenizer
    from rewards.tokenizers import clip_tokenizer

    vae_config = _json("sd15_vae.json")
    if name == "SD1.5 UNet":
        return StableDiffusionPipeline(
            unet=UNet2DConditionModel.from_config(_json("sd15_unet.json")),
            vae=AutoencoderKL.from_config(vae_config),
            text_encoder=_clip(768, 12),
            tokenizer=clip_tokenizer(),
            scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if name == "SDXL UNet":
        return StableDiffusionXLPipeline(
            unet=UNet2DConditionModel.from_config(_json("sdxl_unet.json")),
            vae=AutoencoderKL.from_config(vae_config),
            text_encoder=_clip(768, 12),
            text_encoder_2=_clip(1280, 32, projection=1280, with_projection=True),
            tokenizer=clip_tokenizer(),
            tokenizer_2=clip_tokenizer(),
            scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG),
        )
    from transformers import T5Config, T5EncoderModel

    t5 = T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
                  feed_forward_proj="gated-gelu")  # T5 v1.1 XXL, SD3's text_encoder_3  # fmt: skip
    vae = AutoencoderKL.from_config(
        {
            **vae_config,
            "latent_channels": 16,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
            "shift_factor": 0.0609,
            "scaling_factor": 1.5305,
        }  # SD3's VAE  # fmt: skip
    )
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel.from_config(_json("sd35_medium_transformer.json")),
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=_clip(768, 12, with_projection=True),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_clip(1280, 32, projection=1280, with_projection=True),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=T5EncoderModel(t5),
        tokenizer_3=t5_tokenizer(),
    )


def build(
    model: str, strategy: str, args, dtype, attention: str, checkpointing: bool, size: int, samples: int
):
    from diffusion_align.builder import build_strategy
    from diffusion_align.config import load_config
    from diffusion_align.config.registry import build_policy, build_reward
    from diffusion_align.engine.backbones import SUPPORTED_PIPELINES, load_backbone

    torch.manual_seed(0)
    if args.tiny:
        backbone = load_backbone(TINY[model], "float32", args.device).to(dtype=dtype)
        size = None
    else:
        with torch.device(args.device):
            pipe = full_size_pipeline(model)
        backbone = SUPPORTED_PIPELINES[type(pipe).__name__](pipe).to(device=args.device, dtype=dtype)
        if hasattr(backbone, "max_sequence_length"):
            backbone.max_sequence_length = 128  # T5 tokens: Flow-GRPO's setting for SD3.5
    backbone.enable_memory_options(gradient_checkpointing=checkpointing, attention=attention)
    s_cfg = dict(STRATEGY_SETTINGS[strategy])
    if strategy == "draft":
        s_cfg["gradient_checkpointing"] = checkpointing
    sample = {"num_steps": args.steps, "batch_size": samples, "guidance_scale": 4.5}
    if size:
        sample.update(height=size, width=size)
    config = load_config({"strategy": s_cfg, "sample": sample, "rewards": [{"name": "shapes_color_soft"}]})
    policy = build_policy(backbone, config.sample, config.lora)
    strategy_obj = build_strategy(config, policy, build_reward(config.rewards, backbone.device))
    return backbone, policy, strategy_obj


def run_setting(model, strategy, args, dtype_name, attention, checkpointing) -> dict:
    _, size, samples, micro, steps = MODELS[model]
    if args.tiny:
        samples, micro = 2, 1
    dtype = DTYPES[dtype_name]
    backbone, policy, strategy_obj = build(
        model, strategy, args, dtype, attention, checkpointing, size, samples
    )
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    prompts = captions(samples)
    device_type = torch.device(args.device).type
    cuda = device_type == "cuda"

    one = functools.partial(
        timed_iteration, policy, strategy_obj, prompts, optimizer, micro, device_type, dtype
    )
    one(0)  # warm-up (kernels, allocator)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for r in range(args.repeats):
        sync(args.device)
        t0 = time.perf_counter()
        one(1 + r)
        sync(args.device)
        times.append(time.perf_counter() - t0)
    row = {
        "model": model if not args.tiny else f"{TINY[model]} (for {model})",
        "strategy": LABELS[strategy],
        "dtype": dtype_name,
        "attention": attention,
        "checkpointing": "on" if checkpointing else "off",
        "size": f"{size}px" if not args.tiny else "32px",
        "samples/micro": f"{samples}/{micro}",
        "steps": args.steps,
        "s/it": round(min(times), 3),
        "it/s": round(1 / min(times), 3),
        "peak GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else "- (CPU)",
    }
    return row


def timed_iteration(policy, strategy, prompts, optimizer, micro, device_type, dtype, seed) -> None:
    with torch.autocast(device_type, dtype=dtype):  # as accelerate's mixed precision runs the trainer
        iteration(policy, strategy, prompts, optimizer, micro, seed)


def settings(args):
    attentions = ["sdpa"]
    try:
        import xformers  # noqa: F401

        attentions.append("xformers")
    except ImportError:
        pass
    for model, (strategies, *_rest) in MODELS.items():
        for strategy in strategies:
            for dtype in args.dtypes:
                for attention in attentions:
                    for checkpointing in (False, True):
                        yield model, strategy, dtype, attention, checkpointing


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny test models on CPU (CI)")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    parser.add_argument(
        "--dtypes", nargs="+", choices=sorted(DTYPES), help="default bf16 fp16; tiny: bf16 (CPU autocast)"
    )
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 10; tiny 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed iterations (default 2; tiny 1)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; later settings are skipped")
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    args.steps = args.steps or (2 if args.tiny else 10)
    args.repeats = args.repeats or (1 if args.tiny else 2)
    args.dtypes = args.dtypes or (["bf16"] if args.tiny else ["bf16", "fp16"])  # fp16 backward: GPU only
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --tiny for the CPU check", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    start, rows, skipped = time.perf_counter(), [], []
    for setting in settings(args):
        if time.perf_counter() - start > args.budget:
            skipped.append(setting)
            continue
        try:
            rows.append(run_setting(*setting[:2], args, *setting[2:]))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception as e:  # OOM or an unsupported combination: one row says so, the others still run
            if args.tiny:  # CI: the CPU path must work, a failure is a failure
                raise
            model, strategy, dtype, attention, ckpt = setting
            error = "OOM" if isinstance(e, torch.cuda.OutOfMemoryError) else f"{type(e).__name__}: {e}"[:120]
            cell = error.replace("|", "/")
            rows.append({"model": model, "strategy": LABELS[strategy], "dtype": dtype, "attention": attention,
                         "checkpointing": "on" if ckpt else "off", "s/it": cell})  # fmt: skip
            torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"\n{name}, torch {torch.__version__}, {time.perf_counter() - start:.0f} s; random weights\n")
    print(table(rows))
    for s in skipped:
        print(f"skipped (budget): {s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
