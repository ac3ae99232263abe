"""Per-rank GPU bytes of a LoRA fine-tuning run, from the models built on the meta device.

Frozen weights at the model dtype (the denoiser divided over ranks when sharded with FSDP, the text encoders
and VAE whole); LoRA weights, their gradients and AdamW's two moments in fp32, whole on every rank; and an
activation estimate scaled from a measured profile (`activations`). Not counted: the CUDA context and
allocator slack, reward models, VAE decode activations of reward-backprop strategies, sampling buffers.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass, field

from accelerate import init_empty_weights

from diffusion_align.engine.backbones import DTYPES
from diffusion_align.engine.memory.activations import (
    activation_shape,
    estimate_bytes,
    family_of,
    load_profiles,
)
from diffusion_align.engine.memory.meta_models import MetaPipeline, build_meta_pipeline
from diffusion_align.engine.policy import add_lora, lora_config
from diffusion_align.errors import UserError

GIB = 2**30
UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
         "G": GIB, "GB": GIB, "GIB": GIB, "T": 2**40, "TB": 2**40, "TIB": 2**40}  # fmt: skip
FP32 = 4


@dataclass
class PlanInputs:
    """A training run's plain values (the `plan` command reads them from a config)."""

    pretrained: str
    revision: str | None = None
    dtype: str = "float32"
    mixed_precision: str = "no"
    lora_rank: int = 4
    lora_alpha: float | None = None
    lora_targets: list[str] | None = None
    gpus: int = 1
    sharding: str = "none"
    gpu_memory: int = 80 * GIB
    size: tuple[int, int] | None = None  # (height, width) in pixels; None = the model's native size
    micro_batch: int = 4
    cfg: bool = True  # the training forward runs [uncond, cond]: twice the samples
    kept_steps: int = 1  # denoiser calls whose activations are kept for one backward (DRaFT-K: k)
    gradient_checkpointing: bool = False
    offload_text_encoders: bool = False
    max_sequence_length: int | None = None


@dataclass
class MemoryPlan:
    inputs: PlanInputs
    class_name: str
    counts: dict[str, int]  # component -> parameters (the denoiser's without LoRA)
    lora_params: int
    rows: list[tuple[str, int]] = field(default_factory=list)
    activation: int | None = None
    activation_note: str = ""

    @property
    def total(self) -> int:
        return sum(b for _, b in self.rows) + (self.activation or 0)

    @property
    def fits(self) -> bool:
        return self.total <= self.inputs.gpu_memory


def parse_bytes(text: str) -> int:
    """'80GB', '24 GiB', '512MB', '1e9' -> bytes; GB and GiB both mean 2**30 (how GPU memory is quoted)."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match and match.group(2).upper()
    if not match or unit not in UNITS:
        raise UserError(f"--gpu-memory {text!r}: write a size such as 80GB, 24GiB or 40960MB")
    return int(float(match.group(1)) * UNITS[unit])


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def plan_memory(inputs: PlanInputs, pipeline: MetaPipeline | None = None) -> MemoryPlan:
    if inputs.sharding not in ("none", "fsdp"):
        raise UserError(f"--sharding {inputs.sharding}: choose none or fsdp")
    if inputs.gpus < 1:
        raise UserError(f"--gpus {inputs.gpus}: must be at least 1")
    pipe = pipeline or build_meta_pipeline(inputs.pretrained, inputs.revision)
    backbone = pipe.backbone_class
    base = count(pipe.denoiser)  # before the LoRA goes in
    counts = {f"denoiser {type(pipe.denoiser).__name__}": base}
    counts.update({name: count(m) for name, m in pipe.text_encoders.items()})
    if pipe.vae is not None:
        counts["vae"] = count(pipe.vae)
    targets = inputs.lora_targets or backbone.lora_targets
    with init_empty_weights():
        add_lora(pipe.denoiser, lora_config(inputs.lora_rank, inputs.lora_alpha, 0.0, targets))
    lora = sum(p.numel() for n, p in pipe.denoiser.named_parameters() if "lora_" in n)
    plan = MemoryPlan(inputs, pipe.class_name, counts, lora)

    weight = DTYPES[inputs.dtype].itemsize
    shards = inputs.gpus if inputs.sharding == "fsdp" else 1
    resident_encoders = 0 if inputs.offload_text_encoders else sum(counts[n] for n in pipe.text_encoders)
    where = "offloaded to CPU, on the GPU only while encoding" if inputs.offload_text_encoders else "resident"
    vae_dtype = "float32" if "vae" in backbone.float32_components else inputs.dtype
    plan.rows = [
        (f"frozen denoiser ({inputs.dtype}{f', 1/{shards} per rank' if shards > 1 else ''})",
         -(-base * weight // shards)),
        (f"text encoders ({inputs.dtype}, {where})", resident_encoders * weight),
        (f"VAE ({vae_dtype})", counts.get("vae", 0) * DTYPES[vae_dtype].itemsize),
        ("LoRA weights (fp32)", lora * FP32),
        ("gradients (LoRA, fp32)", lora * FP32),
        ("optimizer state (AdamW: 2 x fp32 per LoRA parameter)", 2 * lora * FP32),
    ]  # fmt: skip
    _estimate_activations(plan, pipe, weight)
    return plan


def _estimate_activations(plan: MemoryPlan, pipe: MetaPipeline, weight: int) -> None:
    inputs, backbone = plan.inputs, pipe.backbone_class
    family = family_of(backbone)
    if family is None:
        plan.activation_note = f"not estimated: no profile measured for {plan.class_name}"
        return
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1) if pipe.vae is not None else 8
    # the pipelines' default size: the denoiser's sample_size latents (FLUX: its pipeline's 128)
    native = (128 if family == "flux" else pipe.denoiser.config.sample_size) * factor
    height, width = inputs.size or (native, native)
    text = 0  # tokens of text that run through every block (MMDiT): T5's, and for SD3 CLIP's 77 beside
    if family in ("sd3", "flux"):
        bundled = _bundled_sequence_length(inputs.pretrained)
        text = inputs.max_sequence_length or bundled or backbone.max_sequence_length
        text += 77 if family == "sd3" else 0
    shape = activation_shape(family, pipe.denoiser, (height // factor, width // factor), text)
    cfg = inputs.cfg and family != "flux"  # FLUX.1 takes guidance as an embedding: no uncond batch
    samples = inputs.micro_batch * (2 if cfg else 1) * inputs.kept_steps
    element = 2 if inputs.mixed_precision in ("fp16", "bf16") else weight
    profiles = load_profiles()
    plan.activation = estimate_bytes(family, shape, samples, element, inputs.gradient_checkpointing, profiles)
    measured = profiles["families"][family]
    ckpt = inputs.gradient_checkpointing
    plan.activation_note = (
        f"ESTIMATE: {measured['factor_checkpointing' if ckpt else 'factor']} bytes per sample x token x "
        f"width x layer (fp32), measured on {measured['model']} on CPU with saved-tensor hooks "
        f"(`{profiles['command']}`), scaled to {height}x{width} px: {shape.tokens} tokens x width "
        f"{shape.width} x depth {shape.depth:g}, {samples} samples per backward (micro_batch "
        f"{inputs.micro_batch}{' x 2 for CFG' if cfg else ''}"
        f"{f' x {inputs.kept_steps} steps kept' if inputs.kept_steps > 1 else ''}), "
        f"{element}-byte activations, gradient checkpointing {'on' if ckpt else 'off'}"
    )


def _bundled_sequence_length(name: str) -> int | None:
    from diffusion_align.bundled import BUNDLED_MODEL_DEFAULTS

    return BUNDLED_MODEL_DEFAULTS.get(name, {}).get("max_sequence_length")


def human(n: int) -> str:
    return f"{n / GIB:8.2f} GiB" if n >= 2**28 else f"{n / 2**20:8.1f} MiB"


def format_plan(plan: MemoryPlan) -> str:
    i = plan.inputs
    lines = [
        f"model: {i.pretrained} ({plan.class_name}; built on the meta device from its config files)",
        "parameters: " + ", ".join(f"{name} {n:,}" for name, n in plan.counts.items())
        + f"; LoRA rank {i.lora_rank}: {plan.lora_params:,}",
        f"per rank, {i.gpus} GPU(s), sharding {i.sharding}:",
    ]  # fmt: skip
    lines += [f"  {label:<62}{human(b)}" for label, b in plan.rows]
    if plan.activation is None:
        lines.append(f"  {'activations':<62}    ?      ({plan.activation_note})")
    else:
        lines.append(f"  {'activations (estimate)':<62}{human(plan.activation)}")
        lines += textwrap.wrap(plan.activation_note, 106, initial_indent="    ", subsequent_indent="    ")
    lines.append(f"  {'total':<62}{human(plan.total)}")
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(
        f"{verdict} in {i.gpu_memory / GIB:g} GiB per GPU ({(i.gpu_memory - plan.total) / GIB:+.2f} GiB)"
    )
    lines.append(
        "not counted: CUDA context and allocator slack, reward models, VAE decode activations of\n"
        "  reward-backprop strategies, sampling buffers"
    )
    return "\n".join(lines)
