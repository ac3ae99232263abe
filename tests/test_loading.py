"""Model loading by built-in name, local folder and (offline) hub id, with one-line errors."""

import pytest
import torch

from diffusion_align.engine.backbones import load_backbone
from diffusion_align.errors import UserError
from diffusion_align.testing import tiny_sd


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl", "shapes"])
def test_builtin_names_load(name):
    backbone = load_backbone(name, device="cpu")
    assert backbone.device.type == "cpu" and backbone.dtype == torch.float32
    assert backbone.is_xl == (name == "tiny-sdxl")


def test_local_save_pretrained_folder_loads_with_dtype(tmp_path):
    tiny_sd().save_pretrained(tmp_path / "pipe")
    backbone = load_backbone(str(tmp_path / "pipe"), dtype="bfloat16", device="cpu")
    assert backbone.dtype == torch.bfloat16
    reference = tiny_sd()
    assert torch.equal(backbone.unet.conv_in.weight, reference.unet.conv_in.weight.to(torch.bfloat16)), (
        "the folder's weights, not fresh ones"
    )


def test_sdxl_fp16_vae_upcast_runs_in_float32_under_autocast():
    """SDXL's fp16 VAE decodes and encodes a float32 copy (force_upcast); mixed-precision autocast must not
    run that copy in half precision again: the same output with and without it."""
    backbone = load_backbone("tiny-sdxl", dtype="float16", device="cpu")
    assert backbone.vae.config.force_upcast
    latents = torch.randn(
        1, backbone.vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0)
    )
    images = backbone.decode(latents.half())
    encoded = backbone.encode(images, torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.float16):
        assert torch.equal(backbone.decode(latents.half()), images)
        assert torch.equal(backbone.encode(images, torch.Generator().manual_seed(0)), encoded)
    assert backbone.vae.dtype == torch.float16  # the copy is put back


def test_missing_model_is_one_line_error_that_says_what_to_do(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(UserError) as e:
        load_backbone(str(missing), device="cpu")
    message = str(e.value)
    assert "\n" not in message
    for hint in (str(missing), "HF_HOME", "HF_HUB_OFFLINE", "model.pretrained=/path/to/pipeline"):
        assert hint in message


def test_unsupported_pipeline_class_is_named(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(UserError, match="KandinskyPipeline; supported pipelines"):
        load_backbone(str(tmp_path), device="cpu")


def test_unknown_dtype_lists_choices():
    with pytest.raises(UserError, match="float32, float16, bfloat16"):
        load_backbone("tiny-sd", dtype="fp8")


def test_video_settings_reach_the_backbone_and_are_refused_for_images():
    from diffusion_align.config import load_config
    from diffusion_align.config.registry import build_backbone

    config = load_config(
        {"model": {"pretrained": "tiny-animatediff", "num_frames": 3, "grad_decode_frames": 1}}
    )
    backbone = build_backbone(config.model)
    assert backbone.initial_noise(1).shape[2] == 3 and backbone.grad_decode_frames == 1
    with pytest.raises(UserError, match="apply to video models"):
        build_backbone(load_config({"model": {"pretrained": "tiny-sd", "num_frames": 3}}).model)
