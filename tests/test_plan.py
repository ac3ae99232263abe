"""`diffusion-align plan`: parameter counts from models built on the meta device equal the real models' (tiny
ones built offline, full-size ones against published counts), the byte accounting, the activation profile's
provenance, and the SD 1.5 DDPO total against ddpo-pytorch's published "< 10 GB"."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion_align.engine.memory.activations import PROFILES, saved_activation_bytes
from diffusion_align.engine.memory.meta_models import build_meta_pipeline
from diffusion_align.engine.memory.plan import GIB, PlanInputs, parse_bytes, plan_memory
from diffusion_align.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
FULL = Path(__file__).with_name("full_size")
# Published parameter counts of the full-size denoisers whose configs are in tests/full_size/ (each JSON holds
# the values of the model's published config.json on the Hugging Face hub):
# - SD 1.5 UNet 859,520,964 (also text encoder 123,060,480, VAE 83,653,863): sum of the checkpoint's
#   parameters, https://forums.fast.ai/t/stable-diffusion-parameter-budget-allocation/101515
# - SDXL base UNet 2,567,463,684: the parameters in sd_xl_base_1.0.safetensors (1680 tensors), as counted in
#   several public repositories; SDXL paper (arXiv 2307.01952): "2.6B parameters in the UNet"
# - FLUX.1-dev transformer 11,901,408,320: flux1-dev.safetensors counted in public training code; Black Forest
#   Labs' model card: "a 12 billion parameter rectified flow transformer"
# - SD3.5 Medium MMDiT-X: Stability AI's model card says "2.5 billion parameters" (a rounded figure that we
#   could not match to the digit from a citable count), so only the range is checked
PUBLISHED = {
    "sd15_unet.json": ("StableDiffusionPipeline", "unet", 859_520_964, 0),
    "sdxl_unet.json": ("StableDiffusionXLPipeline", "unet", 2_567_463_684, 0),
    "flux1_dev_transformer.json": ("FluxPipeline", "transformer", 11_901_408_320, 0),
    "sd35_medium_transformer.json": ("StableDiffusion3Pipeline", "transformer", 2.35e9, 0.15e9),
}


def real_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_count(module, targets, rank) -> int:
    """r x (in + out) per targeted Linear, counted on the module's own layers (independent of peft)."""
    return sum(
        rank * (m.in_features + m.out_features)
        for name, m in module.named_modules()
        if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)
    )


def folder_with(tmp_path: Path, pipeline: str, components: dict[str, tuple[str, str, Path]]) -> Path:
    """A pipeline folder of config files only: model_index.json and each component's config.json."""
    index = {"_class_name": pipeline, "_diffusers_version": "0.42.1"}
    for name, (library, cls, config) in components.items():
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "config.json").write_text(config.read_text())
        index[name] = [library, cls]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    return tmp_path


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux"])
def test_meta_models_from_a_saved_tiny_pipeline_count_like_the_real_ones(name, tmp_path):
    from diffusion_align.engine.backbones import load_backbone

    backbone = load_backbone(name, "float32", "cpu")
    backbone.pipe.save_pretrained(tmp_path)
    meta = build_meta_pipeline(str(tmp_path))
    assert all(p.is_meta for p in meta.denoiser.parameters())
    assert real_count(meta.denoiser) == real_count(backbone.unet)
    for key, encoder in meta.text_encoders.items():
        assert real_count(encoder) == real_count(getattr(backbone.pipe, key)), key
    assert real_count(meta.vae) == real_count(backbone.vae)
    plan = plan_memory(PlanInputs(str(tmp_path)), meta)
    assert plan.lora_params == lora_count(backbone.unet, backbone.lora_targets, 4)


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-wan"])
def test_the_plans_vae_bytes_are_what_loading_at_bfloat16_holds(name, tmp_path):
    """Wan keeps its VAE in float32 at a half-precision model.dtype; the plan counts it so."""
    from diffusion_align.engine.backbones import load_backbone

    load_backbone(name, "float32", "cpu").pipe.save_pretrained(tmp_path)
    held = load_backbone(str(tmp_path), "bfloat16", "cpu").vae.parameters()
    rows = plan_memory(PlanInputs(str(tmp_path), dtype="bfloat16"), build_meta_pipeline(str(tmp_path))).rows
    assert [b for label, b in rows if label.startswith("VAE")] == [sum(p.nbytes for p in held)]


@pytest.mark.parametrize("name", ["shapes", "shapes-flow"])
def test_bundled_models_resolve_as_training_does(name):
    from diffusion_align.engine.backbones import load_backbone

    backbone = load_backbone(name, "float32", "cpu")
    meta = build_meta_pipeline(name)
    assert real_count(meta.denoiser) == real_count(backbone.unet)
    assert sorted(meta.text_encoders) == sorted(
        k for k in ("text_encoder", "text_encoder_2", "text_encoder_3") if getattr(backbone.pipe, k, None)
    )


@pytest.mark.parametrize("config", sorted(PUBLISHED))
def test_full_size_denoisers_on_the_meta_device_have_the_published_counts(config, tmp_path):
    pipeline, slot, expected, tolerance = PUBLISHED[config]
    cls = json.loads((FULL / config).read_text())["_class_name"]
    plan = plan_memory(
        PlanInputs(str(folder_with(tmp_path, pipeline, {slot: ("diffusers", cls, FULL / config)})))
    )
    assert abs(plan.counts[f"denoiser {cls}"] - expected) <= tolerance


@pytest.fixture
def sd15_folder(tmp_path):
    return folder_with(
        tmp_path / "sd15",
        "StableDiffusionPipeline",
        {
            "unet": ("diffusers", "UNet2DConditionModel", FULL / "sd15_unet.json"),
            "text_encoder": ("transformers", "CLIPTextModel", FULL / "sd15_text_encoder.json"),
            "vae": ("diffusers", "AutoencoderKL", FULL / "sd15_vae.json"),
        },
    )


def sd15_ddpo_plan(folder, *overrides, gpus=1, sharding="none"):
    from diffusion_align.commands.plan import plan_inputs
    from diffusion_align.config import load_config

    config = load_config(
        ROOT / "configs" / "ddpo_sd15_aesthetic.yaml", [f"model.pretrained={folder}", *overrides]
    )
    return plan_memory(plan_inputs(config, gpus, 80 * GIB, sharding))


def test_sd15_ddpo_lora_plan_is_consistent_with_ddpo_pytorchs_under_10gb(sd15_folder):
    """ddpo-pytorch README: LoRA, fp16, train batch 1 on SD 1.5 at 512 px uses "< 10 GB" of GPU memory."""
    plan = sd15_ddpo_plan(sd15_folder, "train.micro_batch_size=1")
    assert plan.counts == {
        "denoiser UNet2DConditionModel": 859_520_964,
        "text_encoder": 123_060_480,
        "vae": 83_653_863,
    }
    assert plan.lora_params == 797_184  # rank 4 on to_q/k/v/out.0: 4 x (in + out) summed by hand below
    weights = (859_520_964 + 123_060_480 + 83_653_863) * 2  # fp16
    assert plan.total - plan.activation == weights + 797_184 * 4 * 4  # LoRA, its grads, 2 Adam moments
    assert plan.activation > 0 and plan.total < 10e9


def test_sd15_lora_count_by_hand():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(json.loads((FULL / "sd15_unet.json").read_text()))
    assert lora_count(unet, ("to_q", "to_k", "to_v", "to_out.0"), 4) == 797_184


def test_fsdp_divides_only_the_frozen_denoiser(sd15_folder):
    one = dict(sd15_ddpo_plan(sd15_folder).rows)
    four = dict(sd15_ddpo_plan(sd15_folder, gpus=4, sharding="fsdp").rows)
    assert four["frozen denoiser (float16, 1/4 per rank)"] == math.ceil(859_520_964 * 2 / 4)
    assert one["frozen denoiser (float16)"] == 859_520_964 * 2
    same = [k for k in one if not k.startswith("frozen denoiser")]
    assert [one[k] for k in same] == [four[k] for k in same]


def test_offloaded_text_encoders_are_not_resident(sd15_folder):
    rows = dict(sd15_ddpo_plan(sd15_folder, "model.offload_text_encoders=true").rows)
    assert rows["text encoders (float16, offloaded to CPU, on the GPU only while encoding)"] == 0


def test_saved_activation_bytes_counts_saved_tensors_once_and_no_parameters():
    w = torch.nn.Parameter(torch.randn(100))
    x = torch.randn(100)
    # mul saves x (w's gradient needs it; w itself is a parameter), sin saves its input x * w: 2 x 400 bytes
    assert saved_activation_bytes(lambda: (x * w).sin(), [w]) == 800


def test_the_profile_file_is_what_its_command_measures():
    """The stored tiny-sd factor is reproduced by the measuring script's own code (and names that command)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from measure_activations import COMMAND, measure

    stored = json.loads(PROFILES.read_text())
    assert stored["command"] == COMMAND
    saved, shape = measure("tiny-sd", stored["micro_batch"], checkpointing=False)
    assert saved == stored["families"]["unet"]["saved_bytes"]
    assert stored["families"]["unet"]["factor"] == pytest.approx(saved / (stored["micro_batch"] * shape.size))


def test_gpu_memory_sizes():
    assert parse_bytes("24GB") == parse_bytes("24 GiB") == 24 * 2**30
    assert parse_bytes("40960MB") == 40 * 2**30
    with pytest.raises(UserError, match="--gpu-memory"):
        parse_bytes("lots")


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "diffusion_align", "plan", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin"},
    )


def test_plan_quickstart_prints_a_labelled_estimate_and_a_verdict():
    result = run_cli("configs/quickstart.yaml", "--gpu-memory", "1GB")
    assert result.returncode == 0, result.stderr
    assert "activations (estimate)" in result.stdout and "measure_activations.py" in result.stdout
    assert "fits in 1 GiB per GPU" in result.stdout
    sharded = run_cli("configs/quickstart.yaml", "model.shard=fsdp", "--gpus", "2")  # the config's sharding
    assert sharded.returncode == 0, sharded.stderr
    assert "sharding fsdp" in sharded.stdout and "1/2 per rank" in sharded.stdout


def test_unreadable_model_folder_is_one_line_error_saying_where_it_looked(tmp_path):
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]})
    )
    for folder, hint in ((tmp_path / "none", "no folder"), (tmp_path, "subfolder unet/")):
        result = run_cli("configs/quickstart.yaml", f"model.pretrained={folder}")
        assert result.returncode == 2
        message = result.stderr.strip()
        assert "\n" not in message and str(folder) in message and hint in message, message
