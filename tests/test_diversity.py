"""Per-prompt diversity of eval images (mean pairwise cosine distance of CLIP image embeddings): the metric
against a hand computation, 0 for identical images through the bundled shapes CLIP, logged by a tiny run with
its collapse warning, and the settings' one-line errors."""

import json
import math

import pytest
import torch
from test_trainer import tiny_config, toy  # noqa: F401 - toy is a fixture

from diffusion_align.builder import build_diversity, train
from diffusion_align.bundled import bundled_path
from diffusion_align.config import load_config
from diffusion_align.errors import ConfigError
from rewards.diversity import ClipDiversity, per_prompt_diversity
from rewards.testing import save_tiny_clip


def test_per_prompt_diversity_matches_a_hand_computation():
    embeddings = torch.tensor(
        [
            [1.0, 0.0],  # prompt a
            [3.0, 0.0],  # prompt b
            [0.0, 2.0],  # prompt a
            [-1.0, 0.0],  # prompt b
            [1.0, 1.0],  # prompt a
            [5.0, 5.0],  # prompt c: a single image, no pair
        ]
    )
    prompts = ["a", "b", "a", "b", "a", "c"]
    # a: pairs (x, y) 1 - 0 = 1, (x, x+y) 1 - 1/sqrt2, (y, x+y) 1 - 1/sqrt2; b: (x, -x) 1 - (-1) = 2
    a = (1 + 2 * (1 - 1 / math.sqrt(2))) / 3
    assert per_prompt_diversity(embeddings, prompts) == pytest.approx((a + 2.0) / 2, abs=1e-6)
    assert math.isnan(per_prompt_diversity(embeddings[:2], ["a", "b"]))


def test_identical_images_have_zero_diversity_through_the_bundled_clip():
    diversity = ClipDiversity.from_pretrained(bundled_path("shapes-clip"))
    g = torch.Generator().manual_seed(0)
    one, other = torch.rand(1, 3, 32, 32, generator=g), torch.rand(1, 3, 32, 32, generator=g)
    same = torch.cat([one, one, one, other, other])
    assert diversity(same, ["p"] * 3 + ["q"] * 2) == pytest.approx(0.0, abs=1e-6)
    assert diversity(torch.cat([one, other]), ["p", "p"]) > 1e-3


def test_a_run_logs_diversity_and_warns_on_collapse(tmp_path, toy, capsys):  # noqa: F811
    clip = save_tiny_clip(tmp_path / "clip", image_size=32, patch_size=8)
    overrides = {
        "train.epochs": 2,
        "prompts.eval_images_per_prompt": 2,
        "guard.diversity_model": str(clip),
        "guard.collapse_fraction": 10.0,  # any value below 10 x the start warns: every evaluation here
    }
    summary = train(tiny_config(tmp_path / "run", **overrides))
    assert summary["eval_before_components"]["diversity"] > 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines if "eval/diversity" in x] == [1, 2]  # epoch 1 and "after"
    warnings = [x for x in capsys.readouterr().err.splitlines() if "may be collapsing" in x]
    assert [w.split(" at epoch ")[1].split()[0] for w in warnings] == ["1", "2"]


def test_diversity_settings():
    shapes = {"model": {"pretrained": "shapes"}, "prompts": {"eval_images_per_prompt": 2}}
    assert isinstance(build_diversity(load_config(shapes), "cpu"), ClipDiversity)  # bundled: on by default
    assert build_diversity(load_config({**shapes, "guard": {"diversity_model": "off"}}), "cpu") is None
    assert build_diversity(load_config({"model": {"pretrained": "shapes"}}), "cpu") is None  # one image each
    assert build_diversity(load_config({"prompts": {"eval_images_per_prompt": 2}}), "cpu") is None  # tiny-sd
    with pytest.raises(ConfigError, match="set prompts.eval_images_per_prompt >= 2"):
        build_diversity(load_config({"guard": {"diversity_model": "shapes-clip"}}), "cpu")
