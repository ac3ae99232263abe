"""Verifiable pixel rewards of the shapes world: shapes, ranges, truthful `differentiable`, right > wrong."""

import pytest
import torch

from diffusion_align.zoo import shapes_data as data
from rewards import shapes
from rewards.errors import RewardError

REWARDS = [
    shapes.ShapesColorReward,
    shapes.ShapesCountReward,
    shapes.ShapesColorSoftReward,
    shapes.ShapesMatchReward,
]


@pytest.fixture(scope="module")
def batch():
    return data.make_split("train", 24)


def _wrong(scene, key):
    vocab = {"color": list(shapes.SHAPE_COLORS), "count": list(shapes.COUNTS)}[key]
    new = vocab[(vocab.index(getattr(scene, key)) + 1) % len(vocab)]
    return shapes.Scene(**{**scene.as_dict(), key: new}).caption()


@pytest.mark.parametrize("cls", REWARDS)
def test_shape_dtype_range_and_right_caption_wins(cls, batch):
    reward = cls()
    right = reward(batch.images, batch.captions)
    assert right.shape == (24,) and right.dtype == torch.float32
    assert ((right >= 0) & (right <= 1)).all()
    key = "count" if cls is shapes.ShapesCountReward else "color"
    wrong = reward(batch.images, [_wrong(s, key) for s in batch.scenes])
    assert (right >= wrong).all() and right.mean() > wrong.mean() + 0.2


@pytest.mark.parametrize("cls", REWARDS)
def test_differentiable_flag_is_truthful(cls, batch):
    reward = cls()
    x = batch.images[:4].clone().requires_grad_(True)
    r = reward(x, batch.captions[:4])
    if reward.differentiable:
        r.sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
    else:
        assert not r.requires_grad


def test_soft_colour_gradient_moves_pixels_towards_the_caption(batch):
    reward = shapes.ShapesColorSoftReward()
    x = batch.images[:8].clone()
    prompts = [_wrong(s, "color") for s in batch.scenes[:8]]
    before = reward(x, prompts)
    for _ in range(20):
        x.requires_grad_(True)
        (g,) = torch.autograd.grad(reward(x, prompts).sum(), x)
        x = (x + 0.05 * g / (g.abs().amax((1, 2, 3), keepdim=True) + 1e-12)).clamp(0, 1).detach()
    assert (reward(x, prompts) > before).all()


def test_exact_scores_on_ground_truth(batch):
    assert torch.equal(shapes.ShapesColorReward()(batch.images, batch.captions), torch.ones(24))
    assert torch.equal(shapes.ShapesCountReward()(batch.images, batch.captions), torch.ones(24))
    blank = torch.ones(2, 3, 32, 32) * torch.tensor(shapes.BACKGROUNDS["gray"]).view(1, 3, 1, 1) / 255
    r = shapes.ShapesCountReward()(blank, ["one small red circle on a gray background"] * 2)
    assert torch.allclose(r, torch.full((2,), 2 / 3))


def test_bad_inputs_raise_reward_error(batch):
    with pytest.raises(RewardError, match="not a shapes caption"):
        shapes.ShapesColorReward()(batch.images[:1], ["a photo of a cat"])
    with pytest.raises(RewardError, match="one prompt per image"):
        shapes.ShapesCountReward()(batch.images[:2], batch.captions[:1])


def test_registered_by_name():
    import importlib

    from rewards import REWARDS as registry

    for cls in REWARDS:
        module, attr = registry[cls.name].split(":")
        assert getattr(importlib.import_module(module), attr) is cls
