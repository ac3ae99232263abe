"""Policy LoRA: diffusers-format save/load, reference() is the base model, only LoRA trains."""

import pytest
import torch

from diffusion_align.engine.backbones import StableDiffusionBackbone
from diffusion_align.engine.policy import Policy
from diffusion_align.engine.rollout import rollout
from diffusion_align.math.samplers import DDIMSampler
from diffusion_align.testing import tiny_sd, tiny_sdxl

BUILD = {"sd": tiny_sd, "sdxl": tiny_sdxl}


def _perturb(policy: Policy, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def _images(backbone, seed: int = 0) -> torch.Tensor:
    sampler = DDIMSampler.from_scheduler(backbone.scheduler, eta=0.0)
    embeds = backbone.encode_prompts(["a red circle", "two blue squares"], guidance=True)
    x_T = backbone.initial_noise(2, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return rollout(backbone, sampler, embeds, x_T, 3, 4.0).images


def _pipe_images(pipe) -> torch.Tensor:
    out = pipe(
        ["a red circle", "two blue squares"],
        num_inference_steps=3,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    )
    return out.images


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_saved_lora_loads_in_diffusers_and_changes_output(family, tmp_path):
    backbone = StableDiffusionBackbone(BUILD[family]())
    policy = Policy(backbone, DDIMSampler.from_scheduler(backbone.scheduler, eta=0.0))
    _perturb(policy)
    ours = _images(backbone)
    policy.save_lora(tmp_path / "lora")

    plain = BUILD[family]()  # the same seeded base weights, no adapter
    before = _pipe_images(plain)
    plain.load_lora_weights(str(tmp_path / "lora"))
    after = _pipe_images(plain)
    assert (after - before).abs().max() > 1e-2, "the loaded LoRA must change diffusers' output"
    assert (after - ours).abs().max() < 1e-4, "diffusers with our LoRA must reproduce our trained policy"


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_reference_equals_output_before_lora(family):
    backbone = StableDiffusionBackbone(BUILD[family]())
    base = _images(backbone)
    policy = Policy(backbone, DDIMSampler.from_scheduler(backbone.scheduler, eta=0.0))
    assert torch.equal(_images(backbone), base), "a fresh LoRA (B = 0) must not change the model"
    _perturb(policy)
    assert (_images(backbone) - base).abs().max() > 1e-2
    with policy.reference():
        assert torch.equal(_images(backbone), base)
    assert (_images(backbone) - base).abs().max() > 1e-2, "reference() must re-enable the adapter on exit"


def test_save_then_load_restores_weights(tmp_path):
    source = Policy(StableDiffusionBackbone(tiny_sd()), None, rank=2)
    _perturb(source, seed=1)
    source.save_lora(tmp_path / "lora")
    target = Policy(StableDiffusionBackbone(tiny_sd()), None, rank=2)
    target.load_lora(tmp_path / "lora")
    a, b = source.lora_state_dict(), target.lora_state_dict()
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(p.dtype == torch.float32 for p in target.parameters())


def test_only_lora_parameters_train():
    backbone = StableDiffusionBackbone(tiny_sd())
    policy = Policy(backbone, None)
    trainable = {id(p) for p in policy.parameters()}
    named = dict(backbone.unet.named_parameters())
    assert trainable and all("lora_" in n for n, p in named.items() if id(p) in trainable)
    for module in backbone.frozen_modules():
        for name, p in module.named_parameters():
            assert p.requires_grad == (id(p) in trainable), name


def test_load_lora_from_wrong_folder_is_one_line_error(tmp_path):
    from diffusion_align.errors import UserError

    policy = Policy(StableDiffusionBackbone(tiny_sd()), None)
    with pytest.raises(UserError, match="no LoRA at") as e:
        policy.load_lora(tmp_path)
    assert "\n" not in str(e.value)
