"""The rollout reproduces diffusers' pipelines; log-probs re-score exactly; gradients respect the window."""

import pytest
import torch

from diffusion_align.engine.backbones import StableDiffusionBackbone
from diffusion_align.engine.policy import Policy
from diffusion_align.engine.rollout import rollout
from diffusion_align.math.samplers import DDIMSampler
from diffusion_align.methods.strategies.sampling import transition_inputs

PROMPTS = ["a red circle", "two small blue squares on the left"]


def _setup(pipe, eta=1.0):
    backbone = StableDiffusionBackbone(pipe)
    return backbone, DDIMSampler.from_scheduler(pipe.scheduler, eta=eta)


def _ours(backbone, sampler, prompts, steps, guidance, eta, seed=0, negative=None):
    g = torch.Generator().manual_seed(seed)
    embeds = backbone.encode_prompts(prompts, negative_prompt=negative, guidance=guidance > 1)
    with torch.no_grad():
        return rollout(
            backbone,
            sampler,
            embeds,
            backbone.initial_noise(len(prompts), g),
            steps,
            guidance,
            eta,
            generator=g,
        )


@pytest.mark.parametrize("pipe_name", ["sd", "sdxl"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_rollout_reproduces_pipeline(pipe_name, eta, request):
    pipe = request.getfixturevalue(pipe_name)
    backbone, sampler = _setup(pipe, eta)
    negative = "blurry" if pipe_name == "sd" else None
    expected = pipe(
        PROMPTS,
        num_inference_steps=6,
        guidance_scale=6.0,
        eta=eta,
        negative_prompt=negative and [negative] * 2,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        height=32,
        width=32,
    ).images
    ours = _ours(backbone, sampler, PROMPTS, 6, 6.0, eta, negative=negative)
    assert (ours.images - expected).abs().max() <= 1e-4
    assert ours.images.shape == (2, 3, 32, 32) and ours.latents.shape[1] == 7


def test_rollout_without_guidance_reproduces_pipeline(sd):
    backbone, sampler = _setup(sd, 0.0)
    expected = sd(
        PROMPTS,
        num_inference_steps=4,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
    ).images
    ours = _ours(backbone, sampler, PROMPTS, 4, 1.0, 0.0, seed=3)
    assert (ours.images - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("pipe_name", ["sd", "sdxl"])
def test_recomputed_log_prob_equals_stored_with_guidance(pipe_name, request):
    pipe = request.getfixturevalue(pipe_name)
    backbone, sampler = _setup(pipe)
    policy = Policy(backbone, sampler, rank=4)
    with torch.no_grad():  # a non-trivial adapter, so the check covers LoRA layers too
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    traj = _ours(backbone, sampler, PROMPTS, 5, 5.0, 1.0)
    embeds = backbone.encode_prompts(PROMPTS)
    with torch.no_grad():
        for step in range(5):
            steps = torch.tensor([step, 4 - step])
            stored = {"latents": traj.latents, "timesteps": traj.timesteps, "embeds": embeds}
            x_t, x_prev, t, _ = transition_inputs(stored, torch.arange(2), steps)
            log_prob = policy.log_prob(x_t, x_prev, t, embeds, 5.0, 5)
            ratio = torch.exp(log_prob - traj.log_probs[torch.arange(2), steps])
            assert (ratio - 1).abs().max() <= 1e-6


def test_log_probs_do_not_depend_on_batch_size(sd):
    backbone, sampler = _setup(sd)
    prompts = ["a red circle", "a green triangle", "three yellow squares"]
    gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    embeds = backbone.encode_prompts(prompts)
    with torch.no_grad():
        full = rollout(backbone, sampler, embeds, backbone.initial_noise(3, gens), 4, 5.0, generator=gens)
        gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
        singles = [
            rollout(
                backbone,
                sampler,
                embeds[[i]],
                backbone.initial_noise(1, [gens[i]]),
                4,
                5.0,
                generator=[gens[i]],
            )
            for i in range(3)
        ]
    torch.testing.assert_close(full.log_probs, torch.cat([s.log_probs for s in singles]), atol=1e-5, rtol=0)
    torch.testing.assert_close(full.latents, torch.cat([s.latents for s in singles]), atol=1e-4, rtol=0)


def _param_grads(backbone, sampler, policy, grad_steps, steps=4, **kw):
    policy.backbone.unet.zero_grad(set_to_none=True)
    embeds = backbone.encode_prompts(PROMPTS[:1])
    g = torch.Generator().manual_seed(0)
    x_T = backbone.initial_noise(1, g)
    traj = rollout(backbone, sampler, embeds, x_T, steps, 5.0, grad_steps=grad_steps, generator=g, **kw)
    if traj.images.requires_grad:
        traj.images.mean().backward()
    return traj, [p.grad for p in policy.parameters()]


def test_gradient_only_inside_window(sd):
    backbone, sampler = _setup(sd)
    policy = Policy(backbone, sampler, rank=4)
    with torch.no_grad():  # non-zero B so LoRA A also receives gradient
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    _, grads = _param_grads(backbone, sampler, policy, grad_steps=())
    assert all(g is None for g in grads)
    _, last = _param_grads(backbone, sampler, policy, grad_steps=[-1])
    assert all(g is not None and g.abs().sum() > 0 for g in last)
    # the gradient through the last step alone differs from the gradient through the last two
    _, two = _param_grads(backbone, sampler, policy, grad_steps=[-2, -1])
    assert any((a - b).abs().max() > 1e-9 for a, b in zip(last, two, strict=True))


def test_steps_outside_window_see_no_model_gradient(sd):
    # Window = first step only: the model's influence at later steps is frozen, yet gradient still reaches the
    # parameters through the latent path from step 0 (the DDIM update is linear in x_t).
    backbone, sampler = _setup(sd)
    policy = Policy(backbone, sampler, rank=4)
    calls = []
    handle = backbone.unet.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    _param_grads(backbone, sampler, policy, grad_steps=[0])
    handle.remove()
    assert calls == [True, False, False, False]


def test_checkpointed_window_gives_same_gradients(sd):
    backbone, sampler = _setup(sd)
    policy = Policy(backbone, sampler, rank=4)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    _, plain = _param_grads(backbone, sampler, policy, grad_steps=[-2, -1])
    _, ckpt = _param_grads(backbone, sampler, policy, grad_steps=[-2, -1], checkpoint=True)
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b)


def test_gradient_reaches_initial_noise_only_when_asked(sd):
    backbone, sampler = _setup(sd, eta=0.0)
    embeds = backbone.encode_prompts(PROMPTS[:1])
    x_T = backbone.initial_noise(1, torch.Generator().manual_seed(0)).requires_grad_(True)
    traj = rollout(backbone, sampler, embeds, x_T, 3, 5.0, grad_to_noise=True)
    traj.images.mean().backward()
    assert x_T.grad is not None and x_T.grad.abs().sum() > 0
    x_T.grad = None
    traj = rollout(backbone, sampler, embeds, x_T, 3, 5.0)
    assert not traj.images.requires_grad


def test_a_rollout_started_midway_from_a_stored_latent_continues_the_chain(sd):
    """start=k from latents[k] redoes steps k.. of the full chain (deterministic DDIM: bit-equal)."""
    backbone, sampler = _setup(sd, 0.0)
    full = _ours(backbone, sampler, PROMPTS, 6, 3.0, 0.0)
    embeds = backbone.encode_prompts(PROMPTS, guidance=True)
    with torch.no_grad():
        tail = rollout(backbone, sampler, embeds, full.latents[:, 2], 6, 3.0, 0.0, start=2)
    assert tail.latents.shape[1] == 5
    assert torch.equal(tail.latents, full.latents[:, 2:])
    assert torch.equal(tail.images, full.images)


def test_a_step_callback_can_replace_the_latents(sd):
    """Two chains of one prompt swapped after step 2 end where the other chain would have ended."""
    backbone, sampler = _setup(sd, 0.0)
    embeds = backbone.encode_prompts([PROMPTS[0]] * 2, guidance=False)
    x_T = backbone.initial_noise(2, torch.Generator().manual_seed(0))
    seen = []

    def swap(i, t, step):
        seen.append((i, int(t)))
        return step.prev.flip(0) if i == 2 else None

    with torch.no_grad():
        plain = rollout(backbone, sampler, embeds, x_T, 5, 1.0, 0.0, decode=False)
        swapped = rollout(backbone, sampler, embeds, x_T, 5, 1.0, 0.0, decode=False, on_step=swap)
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4]
    assert [t for _, t in seen] == sampler.timesteps(5).tolist()
    assert torch.equal(swapped.x0, plain.x0.flip(0))
    assert torch.equal(swapped.latents[:, :3], plain.latents[:, :3])


def test_the_ddim_step_predicts_the_clean_latent_as_diffusers_does(sd):
    """`Step.x0` (what FK steering scores) equals DDIMScheduler.step's pred_original_sample."""
    from diffusers import DDIMScheduler

    backbone, sampler = _setup(sd, 1.0)
    scheduler = DDIMScheduler.from_config(sd.scheduler.config)
    scheduler.set_timesteps(4)
    g = torch.Generator().manual_seed(3)
    x, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = sampler.timesteps(4)[1]
    ours = sampler.step(out, t, x, 4, 1.0, torch.Generator().manual_seed(0))
    theirs = scheduler.step(out, t, x, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ours.x0, theirs.pred_original_sample, atol=1e-5)
    assert torch.allclose(ours.prev, theirs.prev_sample, atol=1e-5)
    assert ours.log_prob.shape == (2,)
