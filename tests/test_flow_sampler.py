"""Flow-matching transitions against diffusers' FlowMatchEulerDiscreteScheduler (the ODE) and against an
independent float64 computation of the published SDE steps (flow_grpo `sd3_sde_with_logprob.py`,
DanceGRPO `flux_step`; anchors §2.5)."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffusion_align.math.flow_samplers import FlowMatchSampler
from diffusion_align.testing_flow import FLUX_SCHEDULER_CONFIG, SD3_SCHEDULER_CONFIG

SD3_CONFIG, FLUX_CONFIG = SD3_SCHEDULER_CONFIG, FLUX_SCHEDULER_CONFIG  # the real checkpoints' settings


def flux_schedule(num_steps):  # what FluxPipeline passes for a 256-token image
    return {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps).tolist(), "mu": 0.5}


def _draws(seed, shape=(2, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize(
    "config,schedule", [(SD3_CONFIG, None), (FLUX_CONFIG, flux_schedule)], ids=["sd3", "flux"]
)
def test_noise_level_zero_is_diffusers_euler_step_for_step(config, schedule):
    steps = 6
    reference = FlowMatchEulerDiscreteScheduler(**config)
    reference.set_timesteps(steps, **(schedule(steps) if schedule else {}))
    sampler = FlowMatchSampler(FlowMatchEulerDiscreteScheduler(**config), 0.0, schedule=schedule)
    assert torch.equal(sampler.timesteps(steps), reference.timesteps)
    x, _ = _draws(0)
    ours = theirs = x
    for i, t in enumerate(reference.timesteps):
        v = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        theirs = reference.step(v, t, theirs, return_dict=False)[0]
        step = sampler.step(v, t, ours, steps)
        ours = step.prev
        assert step.log_prob is None
        assert torch.equal(ours, theirs)


def _expected(kind, a, x, v, sigma, sigma_next, sigma_max, noise):
    """float64 numpy, written from the published formulas."""
    x, v, noise = x.double().numpy(), v.double().numpy(), noise.double().numpy()
    dt = sigma_next - sigma
    if kind == "sde":
        s = a * math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma)))
        mean = x * (1 + s**2 / (2 * sigma) * dt) + v * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
        std = s * math.sqrt(-dt)
    elif kind == "dance":
        x0 = x - sigma * v
        score = -(x - x0 * (1 - sigma)) / sigma**2
        mean = x + dt * v - 0.5 * a**2 * score * dt
        std = a * math.sqrt(-dt)
    else:
        std = sigma_next * math.sin(a * math.pi / 2)
        mean = (x - sigma * v) * (1 - sigma_next) + (x + (1 - sigma) * v) * math.sqrt(sigma_next**2 - std**2)
    prev = mean + std * noise
    if kind == "cps":
        log_prob = -((prev - mean) ** 2).mean(axis=(1, 2, 3))
    else:
        log_prob = (-((prev - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)).mean(
            axis=(1, 2, 3)
        )
    return prev, log_prob


@pytest.mark.parametrize("kind,a", [("sde", 0.7), ("dance", 0.3), ("cps", 0.8)])
@pytest.mark.parametrize("index", [0, 3], ids=["sigma=1", "mid"])
def test_sde_steps_equal_the_published_formulas(kind, a, index):
    steps = 6
    sampler = FlowMatchSampler(FlowMatchEulerDiscreteScheduler(**SD3_CONFIG), a, kind)
    t = sampler.timesteps(steps)[index]
    sigmas = sampler.scheduler.sigmas.double()
    sigma, sigma_next, sigma_max = float(sigmas[index]), float(sigmas[index + 1]), float(sigmas[1])
    assert (sigma == 1.0) == (index == 0)
    x, v = _draws(1)
    step = sampler.step(v, t, x, steps, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    prev, log_prob = _expected(kind, a, x, v, sigma, sigma_next, sigma_max, noise)
    assert np.allclose(step.prev.double().numpy(), prev, atol=1e-5)
    assert np.allclose(step.log_prob.double().numpy(), log_prob, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["sde", "dance", "cps"])
def test_rescoring_a_stored_step_gives_its_log_prob_exactly(kind):
    """Ratio exactly 1 on-policy: the log-prob the step stored equals transition + log_prob of the stored
    latents, with per-sample timesteps (as a strategy re-scores a shuffled batch)."""
    sampler = FlowMatchSampler(FlowMatchEulerDiscreteScheduler(**SD3_CONFIG), 0.7, kind)
    timesteps = sampler.timesteps(5)
    x, v = _draws(2)
    step = sampler.step(v, timesteps[2], x, 5, generator=torch.Generator().manual_seed(0))
    mean, std = sampler.transition(v, timesteps[2].repeat(2), x, 5)
    assert torch.equal(sampler.log_prob(step.prev, mean, std), step.log_prob)


def test_per_sample_timesteps_score_each_sample_at_its_own_step():
    sampler = FlowMatchSampler(FlowMatchEulerDiscreteScheduler(**SD3_CONFIG), 0.7)
    timesteps = sampler.timesteps(5)
    x, v = _draws(3)
    both, _ = sampler.transition(v, timesteps[[1, 3]], x, 5)
    first, _ = sampler.transition(v[:1], timesteps[1], x[:1], 5)
    second, _ = sampler.transition(v[1:], timesteps[3], x[1:], 5)
    assert torch.equal(both, torch.cat([first, second]))


def test_forward_noising_is_the_flow_interpolation():
    sampler = FlowMatchSampler(FlowMatchEulerDiscreteScheduler(**SD3_CONFIG))
    x0, noise = _draws(4)
    expected = 0.75 * x0 + 0.25 * noise
    assert torch.allclose(sampler.add_noise(x0, noise, torch.tensor(250.0)), expected, atol=1e-6)
    reference = FlowMatchEulerDiscreteScheduler(**SD3_CONFIG)
    reference.set_timesteps(4)
    t = reference.timesteps[1:2]
    assert torch.allclose(sampler.add_noise(x0, noise, t), reference.scale_noise(x0, t, noise), atol=1e-6)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="sde, dance, cps"):
        FlowMatchSampler(FlowMatchEulerDiscreteScheduler(**SD3_CONFIG), 0.7, "ddim")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_ode_step_rounds_as_diffusers_in_half_precision(dtype):
    """The pipelines' half-precision images are reproduced only if dt * v is taken in the model's dtype."""
    reference = FlowMatchEulerDiscreteScheduler(**SD3_CONFIG)
    reference.set_timesteps(4)
    sampler = FlowMatchSampler(FlowMatchEulerDiscreteScheduler(**SD3_CONFIG))
    sampler.timesteps(4)
    x, v = (a.to(dtype) for a in _draws(6))
    t = reference.timesteps[1]
    reference._step_index = 1
    expected = reference.step(v, t, x, return_dict=False)[0]
    assert torch.equal(sampler.step(v, t, x, 4).prev, expected)


@pytest.mark.parametrize("kind,noise", [("sde", 0.7), ("dance", 0.3)])
def test_likelihood_ratio_gradient_is_the_pathwise_gradient_in_expectation(kind, noise):
    """What Flow-GRPO trains on, E[(r - mean r) sum_k grad log p_k], must equal the gradient of the same SDE
    policy's expected reward, here by differentiating the reparameterised chain (x' = mean + std z, z fixed).
    A toy velocity field v = theta * x with one parameter, 100k one-dimensional chains of 6 steps.
    CPS is left out: its official log-prob, -mean((x' - mean)^2), drops the 1 / (2 std^2), so its gradient
    weighs each step by 2 std^2 and is not this one; scored as a Gaussian it agrees only in the mean over
    seeds (1.98-3.65 against 2.85 at 400k chains): its small late-step std makes the estimator very noisy."""
    sampler = FlowMatchSampler(FlowMatchEulerDiscreteScheduler(**SD3_CONFIG), noise, kind)
    steps, n = 6, 100_000
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(n, 1, generator=gen)
    zs = [torch.randn(n, 1, generator=gen) for _ in range(steps)]
    reward = lambda x0: -((x0 - 0.5) ** 2).squeeze(1)  # noqa: E731

    theta = torch.tensor(-0.8, requires_grad=True)  # pathwise: one differentiable chain
    x = x_T
    for k, t in enumerate(sampler.timesteps(steps)):
        mean, std = sampler.transition(theta * x, t, x, steps)
        x = mean + std * zs[k]
    pathwise = torch.autograd.grad(reward(x).mean(), theta)[0]

    theta_lr = torch.tensor(-0.8, requires_grad=True)  # likelihood ratio: sample without grad, then score
    x, log_prob = x_T, torch.zeros(n)
    for k, t in enumerate(sampler.timesteps(steps)):
        with torch.no_grad():
            m, s = sampler.transition(-0.8 * x, t, x, steps)
            x_prev = m + s * zs[k]
        mean, std = sampler.transition(theta_lr * x, t, x, steps)
        log_prob = log_prob + sampler.log_prob(x_prev, mean, std)
        x = x_prev
    r = reward(x)
    surrogate = ((r - r.mean()).detach() * log_prob).mean()
    likelihood_ratio = torch.autograd.grad(surrogate, theta_lr)[0]
    assert pathwise.abs() > 0.05
    assert torch.isclose(likelihood_ratio, pathwise, rtol=0.1), (likelihood_ratio, pathwise)
