"""Image rewards lifted over frames: selections, InstructVideo segments + temporal attenuation, gradients."""

import pytest
import torch

import rewards
from rewards.base import Reward
from rewards.video import select_frames


class FrameValue(Reward):
    """Score = mean pixel, so a frame filled with t scores t."""

    name = "frame_value"
    differentiable = True

    def forward(self, images, prompts):
        assert len(prompts) == images.shape[0]
        return images.mean(dim=(1, 2, 3))


def video(b=2, t=8):
    """(B, T, 3, 4, 4) where frame i of video j is filled with (i + 10 j) / 100."""
    v = torch.arange(t).float().view(1, t, 1, 1, 1) + 10 * torch.arange(b).float().view(b, 1, 1, 1, 1)
    return (v / 100).expand(b, t, 3, 4, 4).clone()


def test_selections():
    assert select_frames(1, 8, "all").tolist() == [list(range(8))]
    assert select_frames(2, 9, "fml").tolist() == [[0, 4, 8]] * 2
    g = torch.Generator().manual_seed(0)
    r = select_frames(3, 8, "random", k=3, generator=g)
    assert r.shape == (3, 3) and all(len(set(row.tolist())) == 3 for row in r)
    s = select_frames(50, 16, "segments", k=4, generator=g)
    for j in range(4):  # one frame inside each segment of 4
        assert ((s[:, j] >= 4 * j) & (s[:, j] < 4 * (j + 1))).all()
    assert len(set(s[:, 0].tolist())) > 1  # random within the segment
    assert select_frames(1, 2, "random", k=5).shape == (1, 2)  # k capped at T
    with pytest.raises(rewards.RewardError, match="unknown frame selection"):
        select_frames(1, 4, "every-other")


def test_per_frame_means_match_manual():
    v = video()
    r = FrameValue()
    assert torch.allclose(rewards.per_frame(r, "all")(v, ["a", "b"]), torch.tensor([3.5, 13.5]) / 100)
    assert torch.allclose(
        rewards.per_frame(r, "fml")(v, ["a", "b"]), torch.tensor([11 / 3, 10 + 11 / 3]) / 100
    )
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    idx = select_frames(2, 8, "random", k=2, generator=g1)
    got = rewards.per_frame(r, "random", k=2, generator=g2)(v, ["a", "b"])
    assert torch.allclose(got, (idx.float().mean(1) + torch.tensor([0.0, 10.0])) / 100)


def test_segments_with_temporal_attenuation():
    v = video(b=1, t=8)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    idx = select_frames(1, 8, "segments", k=4, generator=g1)[0].float()
    got = rewards.per_frame(FrameValue(), "segments", k=4, generator=g2, tar_lambda=1.0)(v, ["a"])
    expected = (idx / 100 * torch.exp(-(idx - 4).abs())).mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(rewards.RewardError, match="segments.* only"):
        rewards.per_frame(FrameValue(), "all", tar_lambda=1.0)


def test_gradient_reaches_only_the_selected_frames():
    v = torch.rand(1, 9, 3, 4, 4, requires_grad=True)
    lifted = rewards.per_frame(FrameValue(), "fml")
    assert lifted.differentiable
    lifted(v, ["a"]).sum().backward()
    touched = (v.grad.abs().sum(dim=(2, 3, 4)) > 0)[0].nonzero().flatten().tolist()
    assert touched == [0, 4, 8]
    assert not rewards.per_frame(rewards.build("jpeg_compressibility"), "all").differentiable


def test_images_pass_through_and_shape_errors():
    x = torch.rand(2, 3, 8, 8)
    lifted = rewards.per_frame(FrameValue(), "fml")
    assert torch.allclose(lifted(x, ["a", "b"]), x.mean(dim=(1, 2, 3)))
    with pytest.raises(rewards.RewardError, match="one per video"):
        lifted(torch.rand(2, 4, 3, 8, 8), ["a"])
    with pytest.raises(rewards.RewardError, match=r"\(B, T, 3, H, W\)"):
        lifted(torch.rand(2, 4, 1, 8, 8), ["a", "b"])


def test_per_frame_is_a_registered_reward_building_its_image_reward_from_the_other_args():
    lifted = rewards.build("per_frame", reward="jpeg_compressibility", mode="fml", quality=50)
    assert lifted.image_reward.quality == 50 and lifted.name == "jpeg_compressibility"
    clip = torch.rand(2, 5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    jpeg = rewards.build("jpeg_compressibility", quality=50)
    expected = torch.stack([jpeg(clip[:, t], ["", ""]) for t in (0, 2, 4)], 1).mean(1)  # first, middle, last
    assert torch.allclose(lifted(clip, ["", ""]), expected)
    draws = [rewards.build("per_frame", reward="jpeg_compressibility", mode="random", seed=7) for _ in "ab"]
    assert torch.equal(draws[0](clip, ["", ""]), draws[1](clip, ["", ""]))  # seeded frame draws
