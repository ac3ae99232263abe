"""Search baselines: best-of-N is batch-invariant, shares ReNO's first sample and counts reward calls;
FK steering resamples on schedule, counts its reward calls, is deterministic and steers towards reward."""

import pytest
import torch

import rewards
from diffusion_align.backbones import StableDiffusionBackbone, load_backbone
from diffusion_align.few_step import draw_noise, make_generator
from diffusion_align.reno import reno
from diffusion_align.search import best_of_n, fk_schedule, fk_steering
from diffusion_align.zoo.shapes_data import heldout_prompts

PROMPT = "one large red circle on a white background"


@pytest.fixture(scope="module")
def shapes():
    return load_backbone("shapes", device="cpu")


def test_best_of_n_is_batch_invariant_and_picks_the_best(sd):
    backbone = StableDiffusionBackbone(sd)
    soft = rewards.build("shapes_color_soft")
    one = best_of_n(backbone, soft, PROMPT, 5, seed=2, batch_size=1, progress=False)
    many = best_of_n(backbone, soft, PROMPT, 5, seed=2, batch_size=3, progress=False)
    assert torch.allclose(one.rewards, many.rewards, atol=1e-5) and one.reward_calls == 5
    assert one.best_reward == pytest.approx(float(one.rewards.max())) and one.best_seed == 2 + int(
        one.rewards.argmax()
    )
    # the winner regenerated alone from its seed is the returned image and noise
    z = draw_noise(backbone, [one.best_seed])
    with torch.no_grad():
        image = make_generator(backbone, 1, 0.0)(z, backbone.encode_prompts([PROMPT], guidance=False), [0])
    assert torch.equal(z, one.best_noise) and (image[0] - one.best_image).abs().max() < 1e-5
    # its first candidate is ReNO's starting image for the same seed
    start = reno(backbone, soft, PROMPT, iterations=1, seed=2, progress=False)
    assert start.initial_reward == pytest.approx(float(one.rewards[0]), abs=1e-5)


def test_best_of_n_accepts_non_differentiable_rewards(sd):
    result = best_of_n(
        StableDiffusionBackbone(sd), rewards.build("jpeg_compressibility"), PROMPT, 3, progress=False
    )
    assert result.rewards.shape == (3,) and torch.isfinite(result.rewards).all()


def test_fk_schedule():
    assert fk_schedule(10, 3, (2, 8)) == [2, 5, 8, 9]
    assert fk_schedule(4, 1, (0, 100)) == [0, 1, 2, 3]
    assert fk_schedule(50, 20, (20, 80)) == [20, 40, 49]


def test_fk_steering_counts_calls_is_deterministic_and_steers(shapes):
    soft = rewards.build("shapes_color_soft")
    kw = dict(num_particles=4, num_steps=4, guidance_scale=3.0, adaptive=False, progress=False)
    a = fk_steering(shapes, soft, PROMPT, seed=1, **kw)
    b = fk_steering(shapes, soft, PROMPT, seed=1, **kw)
    assert a.reward_calls == 4 * 4 and torch.equal(a.rewards, b.rewards)
    assert float(soft(a.best_image[None], [PROMPT])) == pytest.approx(a.best_reward, abs=1e-5)
    steered, unsteered = [], []
    for prompt in heldout_prompts(3):
        for seed in (0, 4):
            steered.append(fk_steering(shapes, soft, prompt, seed=seed, lmbda=50.0, **kw).rewards.mean())
            unsteered.append(fk_steering(shapes, soft, prompt, seed=seed, lmbda=0.0, **kw).rewards.mean())
    assert sum(steered) / len(steered) > sum(unsteered) / len(unsteered), (steered, unsteered)
