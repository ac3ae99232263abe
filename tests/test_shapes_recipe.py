"""The shapes recipe end to end at a few steps: loadable artifacts, a data card, and bit-reproducibility."""

import json

import torch
from safetensors.torch import load_file

from diffusion_align.zoo.shapes_card import write_card
from diffusion_align.zoo.shapes_recipe import RecipeConfig, build

TINY = dict(
    n_train=64, vae_steps=2, vae_batch=4, clip_steps=2, clip_batch=8, unet_steps=2, unet_batch=4, threads=1
)


def test_recipe_is_reproducible_and_loads(tmp_path):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel

    a, b = tmp_path / "a", tmp_path / "b"
    times = build(a, RecipeConfig(**TINY))
    build(b, RecipeConfig(**TINY))
    assert set(times) == {"data", "vae", "clip", "unet", "total"}
    for rel in ("pipeline/unet/diffusion_pytorch_model.safetensors", "clip/model.safetensors"):
        wa, wb = load_file(a / rel), load_file(b / rel)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    other = build(tmp_path / "c", RecipeConfig(**{**TINY, "seed": 1}))
    assert other
    key = "visual_projection.weight"
    assert not torch.equal(
        load_file(a / "clip/model.safetensors")[key], load_file(tmp_path / "c/clip/model.safetensors")[key]
    )
    pipe = StableDiffusionPipeline.from_pretrained(a / "pipeline", dtype=torch.float32)
    assert pipe.vae.config.scaling_factor != 0.18215  # measured from the data
    CLIPModel.from_pretrained(a / "clip")
    log = [json.loads(line) for line in (a / "train_log.jsonl").read_text().splitlines()]
    assert {r.get("stage") for r in log} >= {"data", "vae", "clip", "unet"}
    card = write_card(a / "data.json", seconds=times)
    assert (
        card["splits"]["heldout_color_shape_pairs"] and json.loads((a / "data.json").read_text())["seconds"]
    )
