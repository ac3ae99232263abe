"""The registry: lazy import, names, user `module:attr` rewards, one-line errors."""

import subprocess
import sys

import pytest
import torch

import rewards
from rewards.base import Reward
from rewards.errors import RewardError


def test_import_is_light_and_never_touches_diffusion_align():
    code = (
        "import sys, rewards; rewards.REWARDS; rewards.build; "
        "heavy = [m for m in ('diffusion_align', 'transformers', 'open_clip', 'torch') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_using_rewards_never_imports_diffusion_align():
    code = (
        "import sys, torch, rewards; r = rewards.build('jpeg_compressibility'); "
        "v = rewards.per_frame(r, 'fml'); c = rewards.Combined({'a': r}); "
        "c(torch.rand(1, 3, 8, 8), ['x']); v(torch.rand(1, 4, 3, 8, 8), ['x']); "
        "import rewards.aesthetic, rewards.clip_score, rewards.pickscore, rewards.hps, rewards.imagereward, "
        "rewards.testing; print('diffusion_align' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name", sorted(rewards.REWARDS))
def test_every_registered_target_resolves_to_a_reward(name):
    target = rewards.resolve(name)
    assert isinstance(target, type) and issubclass(target, Reward)
    assert target.name == name
    assert callable(target.from_pretrained)


def test_unknown_name_lists_near_matches():
    with pytest.raises(RewardError, match="did you mean.*aesthetic"):
        rewards.build("aesthetik")
    with pytest.raises(RewardError, match="unknown reward 'zzzz'"):
        rewards.build("zzzz")


def test_bad_import_paths_are_one_line_errors():
    with pytest.raises(RewardError, match="cannot import module 'no_such_module_xyz'"):
        rewards.build("no_such_module_xyz:Thing")
    with pytest.raises(RewardError, match="has no attribute 'Nope'"):
        rewards.build("rewards.jpeg:Nope")


def brightness(images, prompts):
    """A user reward as a plain function: mean pixel value."""
    return images.mean(dim=(1, 2, 3))


def make_brightness(scale: float = 1.0):
    return lambda images, prompts: scale * images.mean(dim=(1, 2, 3))


def test_user_reward_by_module_attr():
    x = torch.rand(3, 3, 8, 8)
    r = rewards.build(f"{__name__}:make_brightness", scale=2.0)
    assert torch.allclose(r(x, ["a"] * 3), 2 * x.mean(dim=(1, 2, 3)))
    # a registered class by full path is built through from_pretrained like its short name
    r = rewards.build("rewards.jpeg:JpegIncompressibility", quality=50)
    assert r.quality == 50 and isinstance(r, Reward)


def test_build_passes_kwargs_and_rejects_bad_ones():
    assert rewards.build("jpeg_compressibility", quality=80).quality == 80
    with pytest.raises(RewardError, match="bad arguments"):
        rewards.build("jpeg_compressibility", qualty=80)
    with pytest.raises(RewardError, match="has no checkpoint"):
        rewards.build("jpeg_compressibility", pretrained="/some/where")


def test_reward_stays_frozen_in_eval_mode():
    r = rewards.build("jpeg_compressibility")
    parent = torch.nn.ModuleDict({"r": r, "lin": torch.nn.Linear(2, 2)})
    parent.train()
    assert parent["lin"].training and not r.training


def test_input_checks():
    r = rewards.build("jpeg_compressibility")
    with pytest.raises(RewardError, match="one prompt per image"):
        r(torch.rand(2, 3, 8, 8), ["a"])
    with pytest.raises(RewardError, match="per_frame"):
        r(torch.rand(2, 4, 3, 8, 8), ["a", "b"])
