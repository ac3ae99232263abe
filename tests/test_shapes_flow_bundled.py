"""The bundled shapes-flow model: offline loading as a plain StableDiffusion3Pipeline, our loop reproducing
that pipeline, that it learned its world, and its recipe end to end at a few steps (its size budget is
checked with the shapes model's in test_shapes_bundled.py)."""

import argparse

import pytest
import torch
from safetensors.torch import load_file

from diffusion_align.bundled import SHAPES, bundled_path
from diffusion_align.engine.backbones import SD3Backbone, load_backbone
from diffusion_align.engine.rollout import rollout
from diffusion_align.errors import UserError
from diffusion_align.math.flow_samplers import FlowMatchSampler
from diffusion_align.zoo import shapes_data as data
from rewards import shapes

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusion3Pipeline

    # No T5 (`text_encoder_3`): diffusers loads such a folder when told so, as its SD3 docs show.
    p = StableDiffusion3Pipeline.from_pretrained(
        bundled_path("shapes-flow"), text_encoder_3=None, tokenizer_3=None, dtype=torch.float32
    )
    p.set_progress_bar_config(disable=True)
    return p


def test_loads_offline_and_shares_the_shapes_vae_and_text_tower(pipe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import AutoencoderKL
    from transformers import CLIPModel

    assert pipe.text_encoder_3 is None and pipe.tokenizer.model_max_length == 16
    vae = AutoencoderKL.from_pretrained(bundled_path("shapes") / "vae", dtype=torch.float32)
    theirs = pipe.vae.state_dict()
    assert all(torch.equal(value, theirs[key]) for key, value in vae.state_dict().items())
    clip = CLIPModel.from_pretrained(bundled_path("shapes-clip"), dtype=torch.float32)
    ids = pipe.tokenizer(["one small red circle on a white background"], return_tensors="pt").input_ids
    with torch.no_grad():
        ours = pipe.text_encoder(ids).text_embeds
        theirs = clip.get_text_features(input_ids=ids)
    assert torch.allclose(ours, getattr(theirs, "pooler_output", theirs), atol=1e-3)  # both stored in fp16


def test_our_ode_rollout_reproduces_the_pipeline_with_its_t5_length(pipe):
    backbone = load_backbone("shapes-flow", device="cpu")
    assert isinstance(backbone, SD3Backbone) and backbone.max_sequence_length == 1  # what it was trained with
    prompts = ["one large red circle on a black background", "two small green squares at the top"]
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    theirs = pipe(prompts, num_inference_steps=8, guidance_scale=4.5, generator=gens, output_type="pt",
                  max_sequence_length=1).images  # fmt: skip
    sampler = FlowMatchSampler(backbone.scheduler, schedule=lambda n: backbone.schedule(n))
    embeds = backbone.encode_prompts(prompts, guidance=True)
    x_T = backbone.initial_noise(2, [torch.Generator().manual_seed(i) for i in range(2)])
    with torch.no_grad():
        ours = rollout(backbone, sampler, embeds, x_T, 8, 4.5, eta=0.0).images
    assert ours.shape == (2, 3, 32, 32)
    assert (ours - theirs).abs().max() <= 1e-4


def test_flow_generator_follows_prompt_colours(pipe):
    # A learning check, not plumbing: detected colours match the prompts well above chance (1/4).
    prompts = data.make_split("val", 24).captions
    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    images = pipe(prompts, num_inference_steps=20, guidance_scale=4.5, output_type="pt", generator=gens,
                  max_sequence_length=1).images  # fmt: skip
    acc = shapes.adherence(shapes.detect(images), [shapes.parse_caption(p) for p in prompts])
    assert acc["color"] >= 0.6 and acc["background"] >= 0.6, acc


def test_flow_recipe_is_reproducible_and_loads(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from diffusion_align.zoo.shapes_flow_recipe import FlowRecipeConfig, build

    tiny = FlowRecipeConfig(n_train=64, steps=2, batch=4, threads=1)
    build(tmp_path / "a", SHAPES, tiny)
    build(tmp_path / "b", SHAPES, tiny)
    rel = "pipeline/transformer/diffusion_pytorch_model.safetensors"
    wa, wb = load_file(tmp_path / "a" / rel), load_file(tmp_path / "b" / rel)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    build(tmp_path / "c", SHAPES, FlowRecipeConfig(**{**tiny.__dict__, "seed": 1}))
    wc = load_file(tmp_path / "c" / rel)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    pipe = StableDiffusion3Pipeline.from_pretrained(
        tmp_path / "a" / "pipeline", text_encoder_3=None, tokenizer_3=None, dtype=torch.float32
    )
    assert pipe.vae.config.shift_factor == 0.0 and pipe.tokenizer_2.model_max_length == 16


def test_zoo_build_shapes_flow_names_the_missing_shapes_folder(tmp_path):
    from diffusion_align.commands import zoo

    parser = argparse.ArgumentParser()
    zoo.add_arguments(parser)
    args = parser.parse_args(
        ["build", "shapes-flow", "--out", str(tmp_path), "--shapes", str(tmp_path / "no")]
    )
    with pytest.raises(UserError, match="zoo build shapes --out"):
        zoo.run(args)
