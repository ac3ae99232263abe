"""JPEG (in)compressibility: sizes from PIL at quality 95, rising with image entropy."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

import rewards


def test_size_rises_with_entropy():
    g = torch.Generator().manual_seed(0)
    base = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64, generator=g) - 0.5
    images = torch.cat([base + a * noise for a in (0.0, 0.05, 0.2, 0.5, 1.0)])
    size = rewards.build("jpeg_incompressibility")(images, [""] * 5)
    assert (size[1:] > size[:-1]).all()
    assert size[0] < 1.0 and size[-1] > 4.0  # ~0.7 kB flat, ~5.4 kB white noise (reference section 8.5)
    assert torch.equal(rewards.build("jpeg_compressibility")(images, [""] * 5), -size)


def test_matches_pil_directly():
    x = torch.rand(2, 3, 24, 40)
    img = (x[1] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    assert rewards.build("jpeg_incompressibility")(x, ["", ""])[1].item() == pytest.approx(buf.tell() / 1000)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=30)
    assert rewards.build("jpeg_incompressibility", quality=30)(x, ["", ""])[1].item() == pytest.approx(
        buf.tell() / 1000
    )


def test_not_differentiable():
    r = rewards.build("jpeg_compressibility")
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    s = r(x, ["", ""])
    assert not r.differentiable and not s.requires_grad and s.dtype == torch.float32


def test_accepts_a_few_dtypes_and_ignores_missing_prompts():
    x = torch.rand(1, 3, 16, 16)
    r = rewards.build("jpeg_incompressibility")
    assert r(x.double(), None).item() == pytest.approx(r(x, [""]).item())
    assert np.isfinite(r(x.half().float(), [""]).item())
