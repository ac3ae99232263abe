"""The bundled shapes models: offline loading, size budget, and that they learned their world."""

import pytest
import torch
from safetensors import safe_open

from diffusion_align.bundled import bundled_path
from diffusion_align.errors import UserError
from diffusion_align.zoo import shapes_data as data
from rewards import shapes


def test_bundled_names_and_unknown_name():
    assert bundled_path("shapes").joinpath("model_index.json").is_file()
    assert bundled_path("shapes-clip").joinpath("config.json").is_file()
    with pytest.raises(UserError, match="shapes-clip"):
        bundled_path("sd-turbo")
    from diffusion_align import zoo  # the old home of the name stays importable

    assert zoo.bundled_path is bundled_path


# bundled model -> its weight files: text_encoder, unet, vae, clip / text_encoder(_2), transformer, vae
@pytest.mark.parametrize("name", ["shapes", "shapes-flow"])
def test_bundle_is_fp16_safetensors_within_30_mb(name):
    root = bundled_path(name).parent
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total <= 30 * 2**20, total / 2**20
    weights = list(root.rglob("*.safetensors"))
    assert len(weights) == 4
    for w in weights:
        with safe_open(str(w), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, w
    assert not list(root.rglob("*.bin")) and not list(root.rglob("*.pt"))


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(bundled_path("shapes"), dtype=torch.float32)
    p.set_progress_bar_config(disable=True)
    return p


def test_pipeline_loads_offline_and_generates_32px(pipe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert pipe.unet.dtype == torch.float32 and pipe.tokenizer.model_max_length == 77
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.beta_schedule == "scaled_linear"
    out = pipe(["one large red circle on a black background"] * 2, num_inference_steps=4, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert out.shape == (2, 3, 32, 32) and 0 <= out.min() and out.max() <= 1


def test_generator_follows_prompt_colours(pipe):
    # A learning check, not plumbing: detected colours match the prompts well above chance (1/4).
    prompts = data.make_split("val", 24).captions
    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    images = pipe(
        prompts, num_inference_steps=20, guidance_scale=3.0, output_type="pt", generator=gens
    ).images
    acc = shapes.adherence(shapes.detect(images), [shapes.parse_caption(p) for p in prompts])
    assert acc["color"] >= 0.6 and acc["background"] >= 0.6, acc


@torch.no_grad()
def test_clip_prefers_the_right_colour_on_real_images():
    from transformers import CLIPModel, CLIPTokenizer

    from diffusion_align.zoo.shapes_eval import _clip_features, _swap

    path = bundled_path("shapes-clip")
    clip, tok = (
        CLIPModel.from_pretrained(path, dtype=torch.float32).eval(),
        CLIPTokenizer.from_pretrained(path),
    )
    batch = data.make_split("heldout", 48)
    img = _clip_features(clip, tok, images=batch.images)
    right = _clip_features(clip, tok, texts=batch.captions)
    wrong = _clip_features(clip, tok, texts=[_swap(s, "color").caption() for s in batch.scenes])
    wins = ((img * right).sum(1) > (img * wrong).sum(1)).float().mean()
    assert wins >= 0.7, wins  # chance is 0.5


def test_zoo_eval_command_rejects_missing_folders(tmp_path):
    import argparse

    from diffusion_align.commands import zoo

    parser = argparse.ArgumentParser()
    zoo.add_arguments(parser)
    args = parser.parse_args(["eval", "shapes", "--pipeline", str(tmp_path / "nope"), "--out", str(tmp_path)])
    with pytest.raises(UserError, match="not a folder"):
        zoo.run(args)
