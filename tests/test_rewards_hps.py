"""HPSv2 / v2.1 on plain open_clip: official file names and format, parity with open_clip's own scoring."""

import numpy as np
import pytest
import torch
from PIL import Image

import rewards
from rewards import testing as tiny
from rewards.hps import HPS_FILES, HPSReward

PROMPTS = ["a watercolor fox", "a city skyline at dusk"]


def test_official_file_names():
    assert HPS_FILES == {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


@pytest.mark.parametrize("version", ["v2.0", "v2.1"])
def test_matches_open_clip_scoring(tmp_path, version):
    """HPS's img_score: preprocess_val (longest side + zero pad), features normalised, diagonal of I @ T^T."""
    import open_clip
    from open_clip.transform import image_transform

    from rewards.preprocess import CLIP_MEAN, CLIP_STD

    arch, d = tiny.save_tiny_hps(tmp_path, version=version)
    reward = rewards.build("hpsv2", pretrained=d, version=version, arch=arch)
    model = open_clip.create_model(arch, pretrained=str(d / HPS_FILES[version]), output_dict=True).eval()
    preprocess_val = image_transform(
        64, is_train=False, mean=CLIP_MEAN, std=CLIP_STD, interpolation="bicubic", resize_mode="longest"
    )
    yy, xx = np.mgrid[0:90, 0:120] / 120
    pil = [
        Image.fromarray((np.stack([np.sin(a * xx), np.cos(a * yy), xx], -1) * 127 + 127).astype(np.uint8))
        for a in (3.0, 7.0)
    ]
    with torch.no_grad():
        out = model(torch.stack([preprocess_val(p) for p in pil]), open_clip.get_tokenizer(arch)(PROMPTS))
        official = (out["image_features"] @ out["text_features"].T).diag()
        x = torch.stack([torch.from_numpy(np.asarray(p).copy()).permute(2, 0, 1) for p in pil]).float() / 255
        ours = reward(x, PROMPTS)
    assert torch.allclose(ours, official, atol=2e-3)


def test_file_path_and_unprefixed_keys(tmp_path):
    arch, d = tiny.save_tiny_hps(tmp_path, module_prefix=False)
    reward = HPSReward.from_pretrained(d / "HPS_v2.1_compressed.pt", arch=arch)
    assert reward(torch.rand(1, 3, 64, 64), ["a"]).shape == (1,)


def test_errors(tmp_path):
    arch, d = tiny.save_tiny_hps(tmp_path)
    with pytest.raises(rewards.RewardError, match="unknown version"):
        rewards.build("hpsv2", pretrained=d, version="v3")
    with pytest.raises(rewards.RewardError, match="has no HPS_v2_compressed.pt"):
        rewards.build("hpsv2", pretrained=d, version="v2.0", arch=arch)
    with pytest.raises(rewards.RewardError, match="does not match the expected architecture"):
        rewards.build("hpsv2", pretrained=d, arch="ViT-B-32")  # real arch, wrong weights
