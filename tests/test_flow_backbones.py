"""SD3 and FLUX.1 backbones on tiny real pipelines: our one loop with the flow ODE (noise level 0) gives the
pipelines' own images, a LoRA our policy saves loads into plain diffusers and gives our policy's images, the
LoRA sits only on the targeted modules, and the parts (text, noise, schedule) match the pipelines'."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_align.cli import main
from diffusion_align.engine.backbones import FluxBackbone, SD3Backbone, load_backbone
from diffusion_align.engine.few_step import draw_noise, make_generator
from diffusion_align.engine.policy import Policy
from diffusion_align.engine.rollout import rollout
from diffusion_align.errors import UserError
from diffusion_align.math.flow_samplers import FlowMatchSampler
from diffusion_align.testing_flow import tiny_flux, tiny_sd3

PROMPTS = ["two small red circles on the left", "one large blue square!"]
BUILDERS = {"tiny-sd3": tiny_sd3, "tiny-flux": tiny_flux}
TOLERANCE = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def _generators():
    return [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]


def _ours(backbone, steps, guidance, negative=None, size=(32, 32)):
    """Images of our rollout at noise level 0, seeded one generator per prompt as the pipeline call below."""
    sampler = FlowMatchSampler(backbone.scheduler, schedule=lambda n: backbone.schedule(n, size))
    embeds = backbone.encode_prompts(PROMPTS, negative, guidance=guidance > 1, size=size)
    x_T = backbone.initial_noise(len(PROMPTS), _generators(), size)
    with torch.no_grad():
        return rollout(backbone, sampler, embeds, x_T, steps, guidance, eta=0.0).images


def _pipeline(pipe, steps, guidance, negative=None, size=(32, 32)):
    extra = {} if negative is None else {"negative_prompt": negative}
    height, width = size
    return pipe(
        PROMPTS,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=height,
        width=width,
        generator=_generators(),
        output_type="pt",
        **extra,
    ).images


@pytest.mark.parametrize(
    "guidance,negative",
    [(1.0, None), (4.5, None), (4.5, "blurry, low quality")],
    ids=["no-cfg", "cfg", "neg"],
)
def test_sd3_rollout_reproduces_the_pipeline(guidance, negative):
    backbone = SD3Backbone(tiny_sd3())
    ours = _ours(backbone, 4, guidance, negative)
    theirs = _pipeline(tiny_sd3(), 4, guidance, negative)
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    assert (ours - theirs).abs().max() <= TOLERANCE


@pytest.mark.parametrize("size", [(32, 32), (48, 32)], ids=["square", "tall"])
@pytest.mark.parametrize("dev", [True, False], ids=["dev", "schnell"])
def test_flux_rollout_reproduces_the_pipeline(dev, size):
    """dev: guidance embedding and the resolution shift (mu differs between the sizes); schnell: neither."""
    backbone = FluxBackbone(tiny_flux(guidance_embeds=dev))
    ours = _ours(backbone, 4, 3.5, size=size)
    theirs = _pipeline(tiny_flux(guidance_embeds=dev), 4, 3.5, size=size)
    assert ours.shape == theirs.shape == (2, 3, *size)
    assert (ours - theirs).abs().max() <= TOLERANCE


def test_flux_guidance_scale_reaches_the_guidance_embedding():
    backbone = FluxBackbone(tiny_flux())
    assert (_ours(backbone, 2, 1.0) - _ours(backbone, 2, 5.0)).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(BUILDERS))
def test_saved_lora_loads_into_diffusers_and_reproduces_the_policy(name, tmp_path):
    backbone = load_backbone(name, device="cpu")
    policy = Policy(backbone, FlowMatchSampler(backbone.scheduler), rank=2)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: B != 0, so the LoRA changes the output
        for p in policy.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    guidance = 4.5 if name == "tiny-sd3" else 3.5
    ours = _ours(backbone, 3, guidance)
    with policy.reference():
        base = _ours(backbone, 3, guidance)
    policy.save_lora(tmp_path / "lora")

    pipe = BUILDERS[name]()
    pipe.load_lora_weights(str(tmp_path / "lora"))
    theirs = _pipeline(pipe, 3, guidance)
    assert (ours - base).abs().max() > 1e-2
    assert (ours - theirs).abs().max() <= TOLERANCE

    reloaded = Policy(load_backbone(name, device="cpu"), None, rank=2)
    reloaded.load_lora(tmp_path / "lora")
    for (n, a), (_, b) in zip(policy.named_parameters(), reloaded.named_parameters(), strict=True):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("name", list(BUILDERS))
def test_lora_only_on_targeted_modules_and_the_base_frozen(name):
    backbone = load_backbone(name, device="cpu")
    policy = Policy(backbone, None, rank=2)
    targets = backbone.lora_targets
    adapted = {re.sub(r"\.lora_[AB]\.default\.weight$", "", n) for n, _ in policy.named_parameters()}
    assert all(any(m == t or m.endswith("." + t) for t in targets) for m in adapted)
    plain = BUILDERS[name]().transformer  # the same model without an adapter
    linears = {
        n
        for n, m in plain.named_modules()
        if isinstance(m, torch.nn.Linear) and any(n.endswith("." + t) for t in targets)
    }
    assert adapted == linears and adapted
    assert any(m.endswith("attn.add_q_proj") for m in adapted)  # the text stream too
    trainable = {id(p) for p in policy.parameters()}
    for module in backbone.frozen_modules():
        for n, p in module.named_parameters():
            assert p.requires_grad == (id(p) in trainable), n
    encoders = [backbone.pipe.text_encoder, backbone.pipe.text_encoder_2, backbone.vae]
    assert not any(p.requires_grad for m in encoders for p in m.parameters())


def test_sd3_parts_match_the_pipeline():
    pipe = tiny_sd3()
    backbone = SD3Backbone(pipe)
    embeds = backbone.encode_prompts(PROMPTS, "blurry", guidance=True)
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
        PROMPTS, None, None, negative_prompt=["blurry"] * 2, do_classifier_free_guidance=True
    )
    for ours, theirs in [(embeds.cond, cond), (embeds.uncond, uncond), (embeds.pooled, pooled)]:
        assert torch.equal(ours, theirs)
    assert torch.equal(embeds.uncond_pooled, uncond_pooled)
    x_T = backbone.initial_noise(2, _generators(), (32, 32))
    drawn = pipe.prepare_latents(2, 4, 32, 32, torch.float32, "cpu", _generators())
    assert torch.equal(x_T, drawn)
    assert backbone.schedule(4) == {}  # SD3/SD3.5: static shift 3 inside the scheduler, no mu


def test_flux_parts_match_the_pipeline():
    pipe = tiny_flux()
    backbone = FluxBackbone(pipe)
    x_T = backbone.initial_noise(2, _generators(), (48, 32))
    packed, _ = pipe.prepare_latents(2, 4, 48, 32, torch.float32, "cpu", _generators())
    assert torch.equal(x_T, pipe._unpack_latents(packed, 48, 32, pipe.vae_scale_factor))
    # FLUX.1-dev's shift: mu linear in the token count, 0.5 at 256 tokens, 1.15 at 4096; 24 x 16 latents
    # pack to 12 x 8 = 96 tokens
    schedule = backbone.schedule(4, (48, 32))
    assert schedule["mu"] == pytest.approx(0.5 + (96 - 256) * (1.15 - 0.5) / (4096 - 256))
    assert list(schedule["sigmas"]) == pytest.approx([1.0, 0.75, 0.5, 0.25])
    with pytest.raises(UserError, match="no negative prompt"):
        backbone.encode_prompts(PROMPTS, "blurry")


@pytest.mark.parametrize("name", list(BUILDERS))
def test_sample_command_gives_the_pipeline_image(name, tmp_path, capsys):
    """`diffusion-align sample --model tiny-sd3/tiny-flux --eta 0`: the flow ODE on the pipeline's schedule
    at the model's default size (32 px), so the saved PNG is the pipeline's image up to uint8 rounding."""
    argv = ["--model", name, "--prompt", PROMPTS[0], "--num-steps", "3", "--eta", "0", "--guidance", "4.5"]
    assert main(["sample", *argv, "--out", str(tmp_path)]) == 0
    (written,) = (tmp_path / "images").glob("0000_*.png")
    ours = np.asarray(Image.open(written), "float32")
    theirs = BUILDERS[name]()(
        PROMPTS[0], num_inference_steps=3, guidance_scale=4.5, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert ours.shape == (32, 32, 3)
    assert np.abs(ours - np.asarray(theirs, "float32")).max() <= 1


def test_encode_normalises_latents_with_the_vae_shift_and_scale():
    """SD3/FLUX latents are (z - shift_factor) * scaling_factor (diffusers' SD3/FLUX training scripts)."""
    pipe = tiny_sd3()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ours = SD3Backbone(pipe).encode(images, torch.Generator().manual_seed(4))
    z = pipe.vae.encode(images * 2 - 1).latent_dist.sample(torch.Generator().manual_seed(4))
    assert torch.allclose(ours, (z - 0.0609) * 1.5305, atol=1e-6)


def test_lora_of_sd3_sampled_on_flux_is_a_one_line_error(tmp_path, capsys):
    policy = Policy(load_backbone("tiny-sd3", device="cpu"), None, rank=2)
    policy.save_lora(tmp_path / "lora")  # no base_model.json: judged by the transformer's shapes
    argv = ["--model", "tiny-flux", "--prompt", "a", "--num-steps", "1", "--lora", str(tmp_path / "lora")]
    assert main(["sample", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "does not fit tiny-flux" in err


@pytest.mark.parametrize("name", list(BUILDERS))
def test_noise_to_image_is_the_pipeline_with_those_latents(name):
    """ReNO and the search baselines on a flow model: z -> image through the flow ODE on the pipeline's
    schedule (FLUX: its sigmas and mu), differentiable in z, equal to `pipe(latents=z)`."""
    backbone = load_backbone(name, device="cpu")
    guidance = 4.5 if name == "tiny-sd3" else 3.5
    z = draw_noise(backbone, [0, 1]).requires_grad_(True)
    embeds = backbone.encode_prompts(PROMPTS, guidance=guidance > 1)
    ours = make_generator(backbone, 2, guidance)(z, embeds, [0, 1])
    ours.mean().backward()
    assert z.grad.abs().sum() > 0
    latents = z.detach()
    if name == "tiny-flux":  # the pipeline takes user latents packed
        latents = backbone.pipe._pack_latents(latents, 2, 4, 16, 16)
    pipe = backbone.pipe
    theirs = pipe(PROMPTS, num_inference_steps=2, guidance_scale=guidance, latents=latents, output_type="pt")
    assert (ours.detach() - theirs.images).abs().max() <= TOLERANCE


@pytest.mark.parametrize("name", list(BUILDERS))
def test_loads_from_a_pipeline_folder(name, tmp_path):
    BUILDERS[name]().save_pretrained(tmp_path / "model")
    backbone = load_backbone(str(tmp_path / "model"), device="cpu")
    assert type(backbone) is {"tiny-sd3": SD3Backbone, "tiny-flux": FluxBackbone}[name]
    ours = backbone.encode_prompts(PROMPTS, guidance=False).cond
    assert torch.equal(ours, load_backbone(name, device="cpu").encode_prompts(PROMPTS, guidance=False).cond)


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux", "tiny-wan", "tiny-sd"])
def test_offloaded_text_encoders_encode_the_same_and_stay_on_the_cpu(name):
    from diffusion_align.config.registry import build_backbone
    from diffusion_align.config.settings import ModelSettings

    plain = build_backbone(ModelSettings(pretrained=name))
    offloaded = build_backbone(ModelSettings(pretrained=name, offload_text_encoders=True))
    prompt = ["two small red circles on the left on a black background"]
    guidance = name != "tiny-flux"
    a, b = (
        plain.encode_prompts(prompt, guidance=guidance),
        offloaded.encode_prompts(prompt, guidance=guidance),
    )
    assert torch.equal(a.cond, b.cond)
    assert offloaded.offload_text_encoders and offloaded.text_encoders()
    assert all(p.device.type == "cpu" for m in offloaded.text_encoders() for p in m.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the encoders must leave its memory")
def test_offloaded_text_encoders_visit_the_gpu_only_while_encoding():
    from diffusion_align.config.registry import build_backbone
    from diffusion_align.config.settings import ModelSettings

    backbone = build_backbone(ModelSettings(pretrained="tiny-sd3", device="cuda", offload_text_encoders=True))
    assert all(p.device.type == "cpu" for m in backbone.text_encoders() for p in m.parameters())
    embeds = backbone.encode_prompts(["a red circle"])
    assert embeds.cond.device.type == "cuda"
    assert all(p.device.type == "cpu" for m in backbone.text_encoders() for p in m.parameters())


def test_max_sequence_length_sets_the_t5_tokens_as_the_pipeline_call_does():
    from diffusion_align.config.registry import build_backbone
    from diffusion_align.config.settings import ModelSettings

    backbone = build_backbone(ModelSettings(pretrained="tiny-sd3", device="cpu", max_sequence_length=8))
    embeds = backbone.encode_prompts(PROMPTS, guidance=False)
    cond, _, pooled, _ = backbone.pipe.encode_prompt(
        PROMPTS, None, None, do_classifier_free_guidance=False, max_sequence_length=8
    )
    assert torch.equal(embeds.cond, cond) and torch.equal(embeds.pooled, pooled)
    assert cond.shape[1] == backbone.pipe.tokenizer.model_max_length + 8  # CLIP tokens, then T5's
    with pytest.raises(UserError, match="model.max_sequence_length apply to models with a T5 encoder"):
        build_backbone(ModelSettings(pretrained="tiny-sd", device="cpu", max_sequence_length=8))
