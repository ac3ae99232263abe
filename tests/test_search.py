"""Search baselines: best-of-N is batch-invariant, shares ReNO's first sample, counts reward calls and picks
the best of N under any reward; FK steering follows the official resampling rule (fkd_class.py), resamples
on schedule, counts its reward calls, is deterministic and steers towards reward."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

import rewards
from diffusion_align.engine.backbones import StableDiffusionBackbone, load_backbone
from diffusion_align.engine.few_step import draw_noise, make_generator
from diffusion_align.methods.reno import reno
from diffusion_align.methods.search import FKResampler, best_of_n, fk_schedule, fk_steering
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


def test_best_of_n_picks_the_best_under_a_non_differentiable_reward(shapes):
    # independently: each seed's image from diffusers' own pipeline (DDIM, trailing spacing), scored alone
    jpeg = rewards.build("jpeg_incompressibility")
    result = best_of_n(shapes, jpeg, PROMPT, 6, seed=0, batch_size=3, progress=False)
    trailing = DDIMScheduler.from_config(shapes.scheduler.config, timestep_spacing="trailing")
    pipe = StableDiffusionPipeline(**{**shapes.pipe.components, "scheduler": trailing})
    images = [
        pipe(PROMPT, num_inference_steps=1, guidance_scale=0.0, latents=draw_noise(shapes, [s]),
             output_type="pt").images[0]
        for s in range(6)
    ]  # fmt: skip
    expected = torch.tensor([float(jpeg(image[None])) for image in images])  # kB, 1 byte = 0.001
    best = int(expected.argmax())
    assert best % 3 != 0 and expected[best] - expected.topk(2).values[1] > 0.02  # a clear best, mid-batch
    assert torch.allclose(result.rewards, expected, atol=0.005) and result.reward_calls == 6
    assert result.best_seed == best and result.best_reward == pytest.approx(float(expected[best]), abs=0.005)
    assert (result.best_image - images[best]).abs().max() < 1e-4


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


def test_fk_resampler_add_potential_keeps_a_balanced_final_set_weighted_by_potential_over_product():
    resampler = FKResampler(
        4, lmbda=1.0, potential="add", adaptive=True, generator=torch.Generator().manual_seed(0)
    )
    # step 0: one particle carries all the weight (exp(30) clamped to 1e10), ESS ~ 1 < 2: all become it
    idx = resampler(torch.tensor([0.0, 0.0, 0.0, 30.0]), final=False)
    assert idx.tolist() == [3, 3, 3, 3]
    assert resampler.product.tolist() == [1e10] * 4 and resampler.population.tolist() == [30.0] * 4
    # final step: the add potential is r + 30; weight = exp(lambda * (r + 30)) / 1e10 (official), not exp(r)
    r = [1.0, 2.0, 0.5, 1.5]
    expected = [math.exp(x + 30.0) / 1e10 for x in r]
    ess = sum(expected) ** 2 / sum(w * w for w in expected)
    assert 2 <= ess < 4  # 3.11: the official keeps the particles
    assert resampler(torch.tensor(r), final=True) is None
    assert resampler.weights.tolist() == pytest.approx(expected, rel=1e-9)


def test_fk_resampler_non_adaptive_resamples_every_step_but_the_final_one_only_below_half_ess():
    resampler = FKResampler(
        4, lmbda=10.0, potential="max", adaptive=False, generator=torch.Generator().manual_seed(1)
    )
    r0 = [0.1, 0.2, 0.3, 0.4]
    idx = resampler(torch.tensor(r0), final=False)  # ESS 2.09 >= 2, resampled anyway (not adaptive)
    assert idx is not None
    picked = [r0[i] for i in idx.tolist()]  # (float32 inputs: rel 1e-6)
    assert resampler.product.tolist() == pytest.approx([math.exp(10 * x) for x in picked], rel=1e-6)
    # final: max(0, r_prev) = r_prev, so exp(10 r_prev) / product = 1 for every particle: ESS = 4, kept
    assert resampler(torch.zeros(4), final=True) is None
    assert resampler.weights.tolist() == pytest.approx([1.0] * 4, rel=1e-9)


def test_fk_resampler_diff_potential_final_weight_is_not_divided_by_the_product():
    resampler = FKResampler(
        2, lmbda=1.0, potential="diff", adaptive=False, generator=torch.Generator().manual_seed(2)
    )
    assert resampler(torch.tensor([0.0, 20.0]), final=False).tolist() == [1, 1]
    assert resampler.product.tolist() == pytest.approx([math.exp(20.0)] * 2)
    assert resampler(torch.tensor([21.0, 19.0]), final=True) is None  # ESS 1.27 >= 1
    assert resampler.weights.tolist() == pytest.approx([math.e, 1 / math.e], rel=1e-9)


def test_fk_resampler_resamples_at_the_final_step_below_half_ess():
    resampler = FKResampler(
        4, lmbda=10.0, potential="rt", adaptive=True, generator=torch.Generator().manual_seed(3)
    )
    assert resampler(torch.zeros(4), final=False) is None  # equal weights, ESS 4
    idx = resampler(torch.tensor([1.0, 0.0, 0.0, 0.0]), final=True)  # ESS ~ 1.0
    assert idx is not None and resampler.population.tolist() == [1.0 if i == 0 else 0.0 for i in idx.tolist()]


def test_fk_steering_with_flat_potentials_keeps_every_particle_and_picks_the_best(shapes):
    # lambda = 0: every weight is 1, ESS = K, so the official never resamples, not even at the final step;
    # the particles are K independent DDIM(eta=1) chains, computed here with diffusers' scheduler directly
    soft = rewards.build("shapes_color_soft")
    prompt, seeds, steps = heldout_prompts(2)[1], [3, 4, 5, 6], 4
    kw = dict(num_particles=4, num_steps=steps, guidance_scale=3.0, lmbda=0.0, seed=3, progress=False)
    result = fk_steering(shapes, soft, prompt, **kw)
    sched = DDIMScheduler.from_config(shapes.scheduler.config, timestep_spacing="trailing")
    sched.set_timesteps(steps)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x = draw_noise(shapes, seeds)
    embeds = shapes.encode_prompts([prompt]).repeat_interleave(4)
    with torch.no_grad():
        for t in sched.timesteps:
            x, x0 = sched.step(
                shapes.predict(x, t, embeds, 3.0), t, x, eta=1.0, generator=gens, return_dict=False
            )
        images = shapes.decode(x0)
    expected = soft(images, [prompt] * 4)
    assert torch.allclose(result.rewards, expected, atol=1e-5)
    best = int(expected.argmax())
    assert result.best_reward == pytest.approx(float(expected[best]), abs=1e-5)
    assert (result.best_image - images[best]).abs().max() < 1e-4
