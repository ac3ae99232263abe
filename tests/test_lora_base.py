"""A LoRA used on another base model is a one-line error naming both models, never a raw traceback."""

from __future__ import annotations

import json

import pytest
import torch

from diffusion_align.cli import main
from diffusion_align.engine.lora_files import BASE_FILE, check_lora_fits, record_base
from diffusion_align.errors import UserError


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory):
    """A LoRA trained (perturbed) on tiny-sd, saved as `train` saves it."""
    from diffusion_align.engine.backbones import StableDiffusionBackbone
    from diffusion_align.engine.policy import Policy
    from diffusion_align.testing import tiny_sd

    policy = Policy(StableDiffusionBackbone(tiny_sd()), None)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return policy.save_lora(tmp_path_factory.mktemp("lora") / "lora")


def _sample_error(capsys, tmp_path, model: str, lora) -> str:
    out = tmp_path / "out"
    argv = ["sample", "--model", model, "--prompt", "a", "--num-steps", "1", "--lora", str(lora)]
    assert main([*argv, "--out", str(out)]) == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    (err,) = [line for line in stderr.splitlines() if line.startswith("diffusion-align sample: error:")]
    assert not (out / "images").exists()
    return err


def test_lora_of_another_architecture_names_the_mismatch(tiny_lora, tmp_path, capsys):
    err = _sample_error(capsys, tmp_path, "shapes", tiny_lora)  # nothing recorded: judged by shapes
    assert "does not fit shapes" in err and "width" in err


def test_recorded_base_model_is_compared_by_name(tiny_lora, tmp_path, capsys):
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "pytorch_lora_weights.safetensors").write_bytes(
        (tiny_lora / "pytorch_lora_weights.safetensors").read_bytes()
    )
    record_base(lora, "some-org/other-model")  # same shapes as tiny-sd: only the record can tell
    assert json.loads((lora / BASE_FILE).read_text()) == {"pretrained": "some-org/other-model"}
    err = _sample_error(capsys, tmp_path, "tiny-sd", lora)
    assert "trained on some-org/other-model, not on tiny-sd" in err
    record_base(lora, "tiny-sd")
    assert main(["sample", "--model", "tiny-sd", "--prompt", "a", "--num-steps", "1", "--lora", str(lora),
                 "--out", str(tmp_path / "ok")]) == 0  # fmt: skip


def test_policy_load_lora_of_another_model_is_a_user_error(tiny_lora):
    from diffusion_align.config import load_config
    from diffusion_align.config.registry import build_backbone, build_policy

    config = load_config({}, ["model.pretrained=shapes"])
    policy = build_policy(build_backbone(config.model), config.sample, config.lora)
    with pytest.raises(UserError, match="does not fit this model"):
        policy.load_lora(tiny_lora)
    with pytest.raises(UserError, match="does not fit shapes"):
        check_lora_fits(tiny_lora, policy.backbone.unet, "shapes")


def test_save_lora_records_the_base_model_it_was_given(tmp_path):
    from diffusion_align.engine.backbones import StableDiffusionBackbone
    from diffusion_align.engine.policy import Policy
    from diffusion_align.testing import tiny_sd

    policy = Policy(StableDiffusionBackbone(tiny_sd()), None)
    saved = policy.save_lora(tmp_path / "lora", base_model="tiny-sd")
    assert json.loads((saved / BASE_FILE).read_text()) == {"pretrained": "tiny-sd"}
    with pytest.raises(UserError, match="not on other-org/model"):
        policy.load_lora(saved, "other-org/model")
