"""Every reward, loaded from a tiny checkpoint in the official layout through the real loading code:
`(B,)` finite float32 output, batch independence, and a truthful `differentiable` flag."""

import pytest
import torch

import rewards
from rewards import testing as tiny

PROMPTS = ["a red cube on a table", "two dogs"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-rewards")
    clip_dir = tiny.save_tiny_clip(root / "clip")
    aes_clip, aes_head = tiny.save_tiny_aesthetic(root / "aesthetic")
    enc, v25_head = tiny.save_tiny_aesthetic_v25(root / "v25")
    arch, hps_dir = tiny.save_tiny_hps(root / "hps")
    ir_dir = tiny.save_tiny_imagereward(root / "imagereward")
    return {
        "aesthetic": rewards.build("aesthetic", pretrained=aes_head, clip=aes_clip),
        "aesthetic_v25": rewards.build("aesthetic_v25", pretrained=v25_head, encoder=enc),
        "clip": rewards.build("clip", pretrained=clip_dir),
        "pickscore": rewards.build("pickscore", pretrained=clip_dir, processor=None),
        "hpsv2": rewards.build("hpsv2", pretrained=hps_dir, arch=arch),
        "imagereward": rewards.build("imagereward", pretrained=ir_dir),
        "jpeg_compressibility": rewards.build("jpeg_compressibility"),
        "jpeg_incompressibility": rewards.build("jpeg_incompressibility"),
    }


NAMES = [
    "aesthetic",
    "aesthetic_v25",
    "clip",
    "pickscore",
    "hpsv2",
    "imagereward",
    "jpeg_compressibility",
    "jpeg_incompressibility",
]


@pytest.mark.parametrize("name", NAMES)
def test_output_contract(built, name):
    r = built[name]
    assert r.name == name and not r.training
    assert all(not p.requires_grad for p in r.parameters())
    torch.manual_seed(0)
    x = torch.rand(2, 3, 40, 56)  # non-square, not the model's size: resizing is the reward's job
    with torch.no_grad():
        s = r(x, PROMPTS)
        s1 = r(x[1:], PROMPTS[1:])
    assert s.shape == (2,) and s.dtype == torch.float32 and torch.isfinite(s).all()
    # each image is scored on its own: the batch does not leak between samples
    assert torch.allclose(s[1:], s1, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_differentiable_flag_is_truthful(built, name):
    r = built[name]
    x = torch.rand(2, 3, 40, 56, requires_grad=True)
    s = r(x, PROMPTS)
    if r.differentiable:
        s.sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    else:
        assert not s.requires_grad


@pytest.mark.parametrize("name", ["aesthetic", "clip", "hpsv2", "imagereward"])
def test_half_precision(built, name):
    """`.to(dtype)` works; inputs stay float32 and are cast inside; output stays float32."""
    import copy

    r = copy.deepcopy(built[name]).to(torch.bfloat16)
    x = torch.rand(2, 3, 40, 56)
    with torch.no_grad():
        s, ref = r(x, PROMPTS), built[name](x, PROMPTS)
    assert s.dtype == torch.float32 and torch.isfinite(s).all()
    assert torch.allclose(s, ref, rtol=0.1, atol=0.1 * ref.abs().max().item() + 0.05)
