"""LAION aesthetic predictor and aesthetic v2.5: known answers, official-pipeline parity, loading errors."""

from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image

import rewards
from rewards import testing as tiny
from rewards.aesthetic import AestheticMLP, AestheticReward
from rewards.aesthetic_v25 import AestheticV25Head, AestheticV25Reward
from rewards.errors import RewardError


def test_head_layout_matches_the_official_checkpoint():
    head = AestheticMLP(768)
    assert sum(p.numel() for p in head.parameters()) == 927_969
    assert list(head.state_dict()) == [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]
    v25 = AestheticV25Head(1152)
    assert [k for k in v25.state_dict() if k.endswith("weight")] == [
        f"scoring_head.{i}.weight" for i in (0, 2, 4, 6, 8)
    ]


def test_head_known_answer_on_a_fixed_embedding():
    """Constant weights c_k and last bias b: a linear (no-activation) stack gives K * sum(e) + b exactly."""
    head = AestheticMLP(768).double()
    consts = [1e-3, 2e-3, 3e-3, 4e-3, 5e-3]
    sd = OrderedDict()
    for i, c in zip((0, 2, 4, 6, 7), consts, strict=True):
        lin = head.layers[i]
        sd[f"layers.{i}.weight"] = torch.full_like(lin.weight, c)
        sd[f"layers.{i}.bias"] = torch.zeros_like(lin.bias)
    sd["layers.7.bias"] = torch.tensor([5.0], dtype=torch.float64)
    head.load_state_dict(sd)
    e = -torch.ones(1, 768, dtype=torch.float64) / 768**0.5  # negative sum: a ReLU anywhere would clip it
    k = np.prod(consts) * 1024 * 128 * 64 * 16
    expected = k * (-(768**0.5)) + 5.0
    assert head.eval()(e).item() == pytest.approx(expected, rel=1e-12)


@pytest.fixture(scope="module")
def aesthetic_files(tmp_path_factory):
    return tiny.save_tiny_aesthetic(tmp_path_factory.mktemp("aes"))


def test_loads_from_directory_file_and_matches_injected_modules(aesthetic_files):
    clip_dir, head_dir = aesthetic_files
    a = rewards.build("aesthetic", pretrained=head_dir, clip=clip_dir)
    b = AestheticReward.from_pretrained(head_dir / "aesthetic-model.pth", clip=clip_dir)
    # the same weights injected as modules
    from transformers import CLIPModel

    head = AestheticMLP(32)
    head.load_state_dict(torch.load(head_dir / "aesthetic-model.pth", weights_only=True))
    c = AestheticReward(CLIPModel.from_pretrained(clip_dir), head)
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        sa, sb, sc = a(x, [""] * 3), b(x, [""] * 3), c(x, [""] * 3)
    assert torch.equal(sa, sb)
    assert torch.allclose(sa, sc, atol=1e-5)


def test_matches_the_official_processor_pipeline(tmp_path):
    """CLIPProcessor(PIL) -> get_image_features -> L2 normalise -> MLP, as ddpo-pytorch/TRL score."""
    from transformers import CLIPImageProcessor

    clip = tiny.tiny_clip(image_size=224, patch_size=32)
    torch.manual_seed(3)
    head = AestheticMLP(32).eval()
    reward = AestheticReward(clip, head)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:300, 0:400] / 400
    imgs = [
        np.stack([np.sin(a * xx) * 0.5 + 0.5, np.cos(a * yy) * 0.5 + 0.5, xx * yy], -1)
        for a in rng.uniform(2, 8, 3)
    ]
    pil = [Image.fromarray((i * 255).round().astype(np.uint8)) for i in imgs]
    with torch.no_grad():
        pixels = CLIPImageProcessor()(images=pil, return_tensors="pt")["pixel_values"]
        emb = clip.get_image_features(pixel_values=torch.as_tensor(np.asarray(pixels)))
        emb = getattr(emb, "pooler_output", emb)
        official = head(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
        x = torch.stack([torch.from_numpy(np.asarray(p).copy()).permute(2, 0, 1) for p in pil]).float() / 255
        ours = reward(x, [""] * 3)
    assert torch.allclose(ours, official, rtol=0.01, atol=1e-3 * official.abs().max().item())


def test_v25_matches_siglip_processor_pipeline(tmp_path):
    from transformers import SiglipImageProcessor

    enc_dir, head_file = tiny.save_tiny_aesthetic_v25(tmp_path)
    reward = AestheticV25Reward.from_pretrained(head_file, encoder=enc_dir)
    yy, xx = np.mgrid[0:90, 0:120] / 120
    img = np.stack([np.sin(5 * xx) * 0.5 + 0.5, np.cos(3 * yy) * 0.5 + 0.5, xx], -1)
    pil = Image.fromarray((img * 255).round().astype(np.uint8))
    with torch.no_grad():
        pixels = SiglipImageProcessor(size={"height": 32, "width": 32})(images=pil, return_tensors="pt")
        pooled = reward.vision(pixel_values=torch.as_tensor(np.asarray(pixels["pixel_values"]))).pooler_output
        official = reward.head(pooled / pooled.norm(dim=-1, keepdim=True)).squeeze(-1)
        ours = reward(torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)[None].float() / 255, [""])
    assert torch.allclose(ours, official, rtol=0.01, atol=1e-3)


def test_loading_errors_say_where_they_looked(aesthetic_files, tmp_path):
    clip_dir, head_dir = aesthetic_files
    with pytest.raises(RewardError, match=f"{tmp_path} has no aesthetic-model.pth"):
        rewards.build("aesthetic", pretrained=tmp_path, clip=clip_dir)
    with pytest.raises(RewardError, match="HF_HOME.*local path"):
        rewards.build("aesthetic", pretrained="someone/missing-aesthetic-repo", clip=clip_dir)
    with pytest.raises(RewardError, match="CLIP vision tower.*clip=/path"):
        rewards.build("aesthetic", pretrained=head_dir, clip=tmp_path / "nothing-here")
    torch.save({"layers.0.weight": torch.zeros(3, 3)}, tmp_path / "aesthetic-model.pth")
    with pytest.raises(RewardError, match="does not match"):
        rewards.build("aesthetic", pretrained=tmp_path, clip=clip_dir)
    with pytest.raises(RewardError, match="does not exist"):
        rewards.build("aesthetic_v25", pretrained=tmp_path / "absent.pth", encoder=clip_dir)
