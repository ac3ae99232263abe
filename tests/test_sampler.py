"""DDIM-eta transitions against diffusers' own DDIMScheduler.step, and the log-prob convention."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from diffusion_align.math.samplers import DDIMSampler, gaussian_kl, gaussian_log_prob
from diffusion_align.testing import SD_SCHEDULER_CONFIG


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_transition_equals_ddim_scheduler_step(prediction_type, eta, steps_offset):
    config = {**SD_SCHEDULER_CONFIG, "prediction_type": prediction_type, "steps_offset": steps_offset}
    scheduler = DDIMScheduler(**config)
    sampler = DDIMSampler(DDIMScheduler(**config), eta=eta)
    num_steps = 7
    timesteps = sampler.timesteps(num_steps)
    scheduler.set_timesteps(num_steps)
    assert torch.equal(timesteps, scheduler.timesteps)
    g = torch.Generator().manual_seed(0)
    for t in timesteps:
        x_t = torch.randn(2, 4, 8, 8, generator=g)
        model_output = torch.randn(2, 4, 8, 8, generator=g)
        z = torch.randn(2, 4, 8, 8, generator=g)
        expected = scheduler.step(model_output, t, x_t, eta=eta, variance_noise=z).prev_sample
        mean, std = sampler.transition(model_output, t, x_t, num_steps)
        torch.testing.assert_close(mean + std * z, expected, atol=1e-5, rtol=1e-5)


def test_per_sample_timesteps_match_scalar_ones():
    sampler = DDIMSampler(DDIMScheduler(**SD_SCHEDULER_CONFIG), eta=1.0)
    ts = sampler.timesteps(10)
    x_t, out = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    picked = ts[[0, 4, 9]]
    mean, std = sampler.transition(out, picked, x_t, 10)
    for i, t in enumerate(picked):
        m, s = sampler.transition(out[i : i + 1], t, x_t[i : i + 1], 10)
        torch.testing.assert_close(mean[i : i + 1], m)
        torch.testing.assert_close(std[i : i + 1], s)


def test_last_step_is_not_identity_with_real_sd_offset():
    # With steps_offset=1 the final step moves from alpha_bar[1] to alpha_bar[0] != alpha_bar[1].
    sampler = DDIMSampler(DDIMScheduler(**SD_SCHEDULER_CONFIG), eta=0.0)
    t_last = sampler.timesteps(10)[-1]
    x_t, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    mean, _ = sampler.transition(eps, t_last, x_t, 10)
    assert (mean - x_t).abs().max() > 1e-3


def test_log_prob_is_mean_over_dims_of_gaussian_density():
    mean = torch.zeros(2, 4, 8, 8)
    x = torch.randn(2, 4, 8, 8)
    std = torch.tensor(0.5).view(1, 1, 1, 1)
    expected = torch.distributions.Normal(0.0, 0.5).log_prob(x).mean(dim=(1, 2, 3))
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), expected)
    assert gaussian_log_prob(x, mean, std).dtype == torch.float32


def test_kl_zero_for_equal_means_and_matches_closed_form():
    m = torch.randn(2, 4, 4, 4)
    std = torch.tensor(0.1).view(1, 1, 1, 1)
    assert torch.all(gaussian_kl(m, m, std) == 0)
    kl = gaussian_kl(m, m + 0.05, std)
    torch.testing.assert_close(kl, torch.full((2,), 0.05**2 / (2 * 0.01)))
    assert math.isfinite(kl.sum().item())
    # ((1 - 0)^2 / 8 + (2 - 0)^2 / 8) / 2 = 0.3125, with a scalar std
    torch.testing.assert_close(
        gaussian_kl(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2), torch.tensor(2.0)), torch.tensor([0.3125])
    )


def test_forward_noising_matches_diffusers():
    """`add_noise` (DRaFT-LV's re-noising) is the scheduler's q(x_t | x0), for both sampler kinds."""
    from diffusion_align.math.scheduler_sampler import SchedulerSampler

    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    expected = scheduler.add_noise(x0, noise, torch.tensor([801]))
    for sampler in (DDIMSampler(scheduler), SchedulerSampler(scheduler)):
        assert torch.allclose(sampler.add_noise(x0, noise, torch.tensor(801)), expected, atol=1e-6)
