"""Torch preprocessing against the official PIL processors on real PIL images.

Tolerance (reference/rewards.md, section 2): on a smooth 512x384 image the normalised pixels match
`CLIPImageProcessor` to a mean absolute difference of ~0.0036 (max ~0.015); the official path rounds to
uint8 after resizing, so ~0.5/255/std of that is rounding alone. Photos have sharp edges where
bicubic kernels differ more; their mean error stays near the same level.
"""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from rewards.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    center_crop,
    clip_preprocess,
    hps_preprocess,
    resize_shortest_side,
    siglip_preprocess,
)


def photo() -> Image.Image:
    import matplotlib

    path = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
    return Image.open(path).convert("RGB")  # 512x600 RGB photograph


def smooth(w: int = 512, h: int = 384) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    rgb = np.stack([np.sin(3 * xx + 1) * 0.5 + 0.5, np.cos(4 * yy) * 0.5 + 0.5, (xx + yy) / 2], -1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255


def hf_pixels(processor, img) -> torch.Tensor:
    return torch.as_tensor(np.asarray(processor(images=img, return_tensors="pt")["pixel_values"]))


IMAGES = {
    "smooth-landscape": (smooth(512, 384), 0.0045, 0.03),
    "smooth-portrait": (smooth(300, 420), 0.0045, 0.03),
    "photo": (photo(), 0.0055, None),
    "photo-landscape-crop": (photo().crop((0, 0, 500, 320)), 0.0055, None),
}


@pytest.mark.parametrize("key", IMAGES)
def test_clip_preprocess_matches_transformers(key):
    from transformers import CLIPImageProcessor

    img, mean_tol, max_tol = IMAGES[key]
    ref = hf_pixels(CLIPImageProcessor(), img)  # defaults: shortest edge 224, crop 224, OpenAI mean/std
    ours = clip_preprocess(to_tensor(img), 224)
    assert ours.shape == ref.shape == (1, 3, 224, 224)
    diff = (ours - ref).abs()
    assert diff.mean() < mean_tol
    if max_tol is not None:
        assert diff.max() < max_tol


@pytest.mark.parametrize("key", ["smooth-landscape", "photo"])
def test_clip_preprocess_matches_open_clip(key):
    from open_clip.transform import image_transform

    img, mean_tol, max_tol = IMAGES[key]
    # what open_clip.create_model_and_transforms returns as preprocess_val for CLIP/ViT-H-14 models
    transform = image_transform(224, is_train=False, mean=CLIP_MEAN, std=CLIP_STD, interpolation="bicubic")
    ref = transform(img)[None]
    diff = (clip_preprocess(to_tensor(img), 224) - ref).abs()
    assert diff.mean() < mean_tol
    if max_tol is not None:
        assert diff.max() < max_tol


@pytest.mark.parametrize("key", ["smooth-landscape", "photo"])
def test_siglip_preprocess_matches_transformers(key):
    from transformers import SiglipImageProcessor

    img, mean_tol, _ = IMAGES[key]
    ref = hf_pixels(SiglipImageProcessor(size={"height": 384, "width": 384}), img)
    ours = siglip_preprocess(to_tensor(img), 384)
    assert ours.shape == ref.shape == (1, 3, 384, 384)
    assert (ours - ref).abs().mean() < mean_tol


def test_crop_offsets_match_transformers_rounding():
    """Odd margins: HF floors the crop offset and truncates the long side; a one-pixel shift would show."""
    x = torch.arange(1 * 1 * 7 * 9, dtype=torch.float32).view(1, 1, 7, 9)
    assert center_crop(x, 4)[0, 0, 0, 0] == x[0, 0, 1, 2]
    assert resize_shortest_side(torch.rand(1, 3, 300, 451), 224).shape[-2:] == (224, 336)  # int(336.7)
    assert resize_shortest_side(torch.rand(1, 3, 451, 300), 224).shape[-2:] == (336, 224)


def test_hps_preprocess_pads_the_short_side():
    x = torch.rand(1, 3, 100, 200)
    out = hps_preprocess(x, 224)
    assert out.shape == (1, 3, 224, 224)
    pad_value = (torch.zeros(3) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    top, bottom, middle = out[0, :, :56], out[0, :, -56:], out[0, :, 56:-56]
    assert torch.allclose(top, pad_value.view(3, 1, 1).expand_as(top))
    assert torch.allclose(bottom, pad_value.view(3, 1, 1).expand_as(bottom))
    assert not torch.allclose(middle[:, :1], pad_value.view(3, 1, 1).expand(3, 1, 224))
    # for square inputs it is the plain resize (+ a no-op crop)
    sq = torch.rand(2, 3, 300, 300)
    assert torch.allclose(hps_preprocess(sq, 224), clip_preprocess(sq, 224), atol=1e-6)


def test_preprocess_keeps_the_gradient():
    x = torch.rand(2, 3, 64, 80, requires_grad=True)
    clip_preprocess(x, 32).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("size", [(512, 384), (300, 421)])
def test_hps_preprocess_matches_open_clip_longest_resize_and_pad(size):
    """HPSv2's ResizeMaxSize (longest side, zero pad) is open_clip's resize_mode='longest' with fill 0."""
    from open_clip.transform import image_transform

    img = smooth(*size)
    transform = image_transform(
        224, is_train=False, mean=CLIP_MEAN, std=CLIP_STD, interpolation="bicubic", resize_mode="longest"
    )
    diff = (hps_preprocess(to_tensor(img), 224) - transform(img)[None]).abs()
    assert diff.mean() < 0.0045 and diff.max() < 0.03
