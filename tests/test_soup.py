"""LoRA soups: diffusers' own loader applies exactly the weighted sum of the adapters' deltas (measured by
fusing each LoRA into a fresh tiny SD UNet), weights (1, 0) give back the first adapter, mismatched adapters
are one-line errors, and the sweep evaluates a grid of mixes end to end. LoRAs: random weights on tiny-sd,
saved by the policy in the diffusers format."""

import csv
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusion_align.cli import main
from diffusion_align.config import load_config
from diffusion_align.config.registry import build_backbone, build_policy
from diffusion_align.engine.lora_soup import write_soup
from diffusion_align.errors import UserError
from diffusion_align.testing import tiny_sd

WEIGHTS = "pytorch_lora_weights.safetensors"


def random_lora(directory, seed, rank, alpha=None, targets=None):
    """A tiny-sd LoRA with random A and B (std 0.1), saved by `Policy.save_lora` (diffusers format)."""
    config = load_config(
        {
            "model": {"pretrained": "tiny-sd"},
            "lora": {"rank": rank, "alpha": alpha, "target_modules": targets},
        }
    )
    policy = build_policy(build_backbone(config.model), config.sample, config.lora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return policy.save_lora(directory, base_model="tiny-sd")


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    # a: alpha = rank (scale 1); b: another rank and scale 2, so stacking must carry the scales
    return random_lora(root / "a", 1, rank=2), random_lora(root / "b", 2, rank=3, alpha=6.0)


def fused_delta(lora=None) -> dict[str, torch.Tensor]:
    """UNet weights of a fresh tiny SD after diffusers loads `lora` and fuses it, minus the base weights."""
    base = {k: v.clone() for k, v in tiny_sd().unet.state_dict().items()}
    pipe = tiny_sd()
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # drops the LoRA layers, keeps the fused weights
    return {k: v - base[k] for k, v in pipe.unet.state_dict().items()}


def test_the_soup_applies_exactly_the_weighted_sum_of_the_deltas(loras, tmp_path):
    a, b = loras
    delta_a, delta_b = fused_delta(a), fused_delta(b)
    assert max(d.abs().max() for d in delta_b.values()) > 1e-3  # the adapters change the UNet
    for weights in ((0.3, 0.7), (-0.5, 1.5)):
        soup = write_soup([a, b], weights, tmp_path / f"soup_{weights[0]}")
        got = fused_delta(soup)
        want = {k: weights[0] * delta_a[k] + weights[1] * delta_b[k] for k in delta_a}
        assert max((got[k] - want[k]).abs().max().item() for k in want) < 1e-6


def test_weights_one_and_zero_give_back_the_first_adapter(loras, tmp_path):
    a, b = loras
    soup = write_soup([a, b], [1, 0], tmp_path / "one")
    mine, theirs = load_file(soup / WEIGHTS), load_file(a / WEIGHTS)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    kwargs = dict(prompt=["a red circle"], num_inference_steps=2, output_type="pt", guidance_scale=1.0)
    images = []
    for lora in (a, soup):
        pipe = tiny_sd()
        pipe.load_lora_weights(str(lora))
        images.append(pipe(generator=torch.Generator().manual_seed(0), **kwargs).images)
    assert torch.equal(images[0], images[1])
    assert json.loads((soup / "base_model.json").read_text())["pretrained"] == "tiny-sd"


def test_mismatched_adapters_are_one_line_errors(loras, tmp_path):
    a, b = loras
    other = random_lora(tmp_path / "other", 3, rank=2)
    (other / "base_model.json").write_text(json.dumps({"pretrained": "shapes"}))
    with pytest.raises(UserError, match="trained on tiny-sd and .* on shapes"):
        write_soup([a, other], [0.5, 0.5], tmp_path / "x")
    fewer = random_lora(tmp_path / "fewer", 4, rank=2, targets=["to_q"])
    with pytest.raises(UserError, match="adapt different layers"):
        write_soup([a, fewer], [0.5, 0.5], tmp_path / "y")
    wide = tmp_path / "wide"
    wide.mkdir()
    tensors = load_file(a / WEIGHTS)
    key = next(k for k in tensors if k.endswith("lora.down.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)
    save_file(tensors, str(wide / WEIGHTS))
    with pytest.raises(UserError, match="other shapes"):
        write_soup([a, wide], [0.5, 0.5], tmp_path / "z")
    with pytest.raises(UserError, match="is one of the input LoRAs"):
        write_soup([a, b], [0.5, 0.5], a)


def test_cli_errors_print_one_line(loras, tmp_path, capsys):
    a, b = loras
    for bad, message in (
        (["--weights", "1"], "2 adapters but 1 weights"),
        (["--weights", "0", "0"], "every weight is 0"),
        ([], "give --weights"),
        (["--sweep", "3", "--rewards", "jpeg_compressibility"], "two or three reward names"),
    ):
        assert main(["soup", str(a), str(b), *bad, "-o", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err
    assert main(["soup", str(a), str(b), "--weights", "0.5", "0.5", "-o", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / WEIGHTS).is_file()


def test_sweep_writes_the_table_and_the_front(loras, tmp_path):
    a, b = loras
    config = tmp_path / "sample.yaml"
    config.write_text("model: {pretrained: tiny-sd}\nsample: {num_steps: 2, guidance_scale: 1.0}\n")
    out = tmp_path / "sweep"
    args = ["soup", str(a), str(b), "--sweep", "3", "--prompts", "shapes_heldout", "--count", "2"]
    args += ["--rewards", "jpeg_compressibility", "shapes_color_soft", "--config", str(config)]
    assert main([*args, "--no-progress", "-o", str(out)]) == 0
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(float(r["w1"]), float(r["w2"])) for r in rows] == [(1, 0), (0.5, 0.5), (0, 1)]
    record = json.loads((out / "sweep.json").read_text())
    assert record["rewards"] == ["jpeg_compressibility", "shapes_color_soft"]
    assert any(r["front"] for r in record["rows"])
    ends = record["rows"][0]["jpeg_compressibility"], record["rows"][-1]["jpeg_compressibility"]
    assert ends[0] != ends[1]  # the adapters make different images
    for name in ("front.png", "grids/w_0.500_0.500.png", f"soups/w_1.000_0.000/{WEIGHTS}"):
        assert (out / name).is_file(), name


def test_sweep_rewards_keep_the_args_the_config_gives_them():
    from diffusion_align.commands.soup_sweep import sweep_rewards

    config = load_config(
        {
            "rewards": [{"name": "jpeg_compressibility", "args": {"quality": 50}}],
            "eval_rewards": [{"name": "clip", "args": {"pretrained": "shapes-clip"}}],
        }
    )
    settings = sweep_rewards(["clip", "jpeg_compressibility", "shapes_color"], config)
    assert [(s.name, s.args) for s in settings] == [
        ("clip", {"pretrained": "shapes-clip"}),
        ("jpeg_compressibility", {"quality": 50}),
        ("shapes_color", {}),
    ]
