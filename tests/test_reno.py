"""ReNO: the chi-norm regulariser, gradient to the noise through few-step schedulers, trailing spacing on
DDIM-type models, reward gain on the bundled shapes model, determinism, best-by-reward bookkeeping, CLI
outputs, non-differentiable rewards."""

import json
import math

import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, LCMScheduler, StableDiffusionPipeline

import rewards
from diffusion_align.cli import main
from diffusion_align.engine.backbones import StableDiffusionBackbone, load_backbone
from diffusion_align.engine.few_step import draw_noise, make_generator
from diffusion_align.errors import UserError
from diffusion_align.methods.reno import chi_regulariser, reno, reno_reward, require_differentiable
from diffusion_align.methods.search import best_of_n
from diffusion_align.zoo.shapes_data import heldout_prompts

PROMPT = "one large red circle on a white background"


@pytest.fixture(scope="module")
def shapes():
    return load_backbone("shapes", device="cpu")


@pytest.fixture
def soft():
    return rewards.build("shapes_color_soft")


def test_regulariser_minimum_at_sqrt_d_minus_1_and_is_chi_nll():
    d = 4 * 16 * 16
    direction = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    direction = direction / direction.norm()
    radii = torch.linspace(5.0, 60.0, 5501, dtype=torch.float64)
    values = torch.stack([chi_regulariser(direction * r) for r in radii]).squeeze(1)
    numeric = float(radii[values.argmin()])
    assert abs(numeric - math.sqrt(d - 1)) < 0.02  # analytic: r - (d-1)/r = 0
    z = (direction * math.sqrt(d - 1)).requires_grad_()
    chi_regulariser(z).sum().backward()
    assert z.grad.norm() < 1e-3
    # up to a constant it is -log p_chi_d(|z|): |z|^2 ~ chi2(d), p_chi(r) = p_chi2(r^2) * 2r
    chi2 = torch.distributions.Chi2(torch.tensor(float(d), dtype=torch.float64))
    nll = -(chi2.log_prob(radii**2) + torch.log(2 * radii))
    assert torch.allclose(values.double() - values[0], nll - nll[0], atol=2e-3)  # float32 at ~2e3


@pytest.mark.parametrize("kind,steps", [("euler_ancestral", 1), ("euler_ancestral", 2), ("lcm", 2)])
def test_scheduler_generator_reproduces_pipeline_and_reaches_the_noise(sd, kind, steps):
    config = sd.scheduler.config
    if kind == "euler_ancestral":
        sd.scheduler = EulerAncestralDiscreteScheduler.from_config(config, timestep_spacing="trailing")
    else:
        sd.scheduler = LCMScheduler.from_config(config)
    backbone = StableDiffusionBackbone(sd)
    z = draw_noise(backbone, [7])
    expected = sd(
        PROMPT, num_inference_steps=steps, guidance_scale=0.0, latents=z.clone(),
        generator=torch.Generator().manual_seed(7), output_type="pt",
    ).images  # fmt: skip
    generate = make_generator(backbone, steps, 0.0)  # "auto": the backbone's own scheduler
    embeds = backbone.encode_prompts([PROMPT], guidance=False)
    z.requires_grad_()
    images = generate(z, embeds, [7])
    assert (images - expected).abs().max() < 1e-4
    images.mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def trailing_pipeline(pipe) -> StableDiffusionPipeline:
    """`pipe` with diffusers' own DDIMScheduler at trailing spacing: the reference for few-step generation."""
    trailing = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    return StableDiffusionPipeline(**{**pipe.components, "scheduler": trailing})


@pytest.mark.parametrize("steps,timesteps", [(1, [999]), (2, [999, 499]), (4, [999, 749, 499, 249])])
def test_ddim_type_models_generate_with_diffusers_trailing_spacing(sd, steps, timesteps):
    # the model ships DDIM with "leading" spacing: one step would be t=1 and two [501, 1], i.e. noise
    assert sd.scheduler.config.timestep_spacing == "leading"
    reference = trailing_pipeline(sd)
    reference.scheduler.set_timesteps(steps)
    assert reference.scheduler.timesteps.tolist() == timesteps
    backbone = StableDiffusionBackbone(sd)
    z = draw_noise(backbone, [7])
    expected = reference(PROMPT, num_inference_steps=steps, guidance_scale=0.0, latents=z.clone(),
                         output_type="pt").images  # fmt: skip
    generate = make_generator(backbone, steps, 0.0)  # "auto" on a DDIM model
    with torch.no_grad():
        images = generate(z, backbone.encode_prompts([PROMPT], guidance=False), [7])
    assert (images - expected).abs().max() < 1e-4
    assert backbone.scheduler.config.timestep_spacing == "leading"  # the training rollout's is untouched


def test_one_step_reno_and_best_of_n_on_the_bundled_model_generate_as_diffusers_trailing(shapes, soft):
    # ReNO's and best-of-N's default: one step, no guidance. Their images are diffusers' trailing DDIM ones.
    prompt = heldout_prompts(1)[0]
    reference = trailing_pipeline(shapes.pipe)
    first = reno(shapes, soft, prompt, iterations=1, seed=5, progress=False)
    search = best_of_n(shapes, soft, prompt, 3, seed=5, progress=False)
    for seed, image in ((5, first.best_image), (search.best_seed, search.best_image)):
        z = draw_noise(shapes, [seed])
        expected = reference(prompt, num_inference_steps=1, guidance_scale=0.0, latents=z,
                             output_type="pt").images[0]  # fmt: skip
        assert (image - expected).abs().max() < 1e-4


def test_reward_improves_on_the_bundled_model_and_best_is_by_reward(shapes, soft):
    gains = []
    for prompt in heldout_prompts(3):
        for seed in (0, 1):
            result = reno(shapes, soft, prompt, iterations=8, num_steps=2, guidance_scale=3.0, seed=seed,
                          progress=False)  # fmt: skip
            history = [h["reward"] for h in result.history]
            assert result.best_reward >= result.initial_reward == history[0]
            assert result.best_reward == max(history) and history[result.best_iteration] == max(history)
            gains.append(result.best_reward - result.initial_reward)
    assert sum(gains) / len(gains) > 0.05, gains
    # the returned image is the one the returned noise generates, and it scores the returned reward
    generate = make_generator(shapes, 2, 3.0)
    with torch.no_grad():
        again = generate(result.best_noise, shapes.encode_prompts([prompt]), [1])
    assert (again[0] - result.best_image).abs().max() < 1e-4
    assert abs(float(soft(again, [prompt])) - result.best_reward) < 1e-4


def test_deterministic_for_a_seed_and_history_bookkeeping(sd, soft):
    backbone = StableDiffusionBackbone(sd)
    run = lambda seed: reno(backbone, soft, PROMPT, iterations=4, seed=seed, progress=False)  # noqa: E731
    a, b, c = run(3), run(3), run(4)
    assert a.history == b.history and torch.equal(a.best_noise, b.best_noise)
    assert a.history[0]["reward"] != c.history[0]["reward"]
    assert a.reward_calls == len(a.history) == 4
    # no optimiser step after the last evaluation
    assert [h["grad_norm"] is None for h in a.history] == [False, False, False, True]
    d = a.best_noise.numel()
    for h in a.history:
        expected = 0.01 * (0.5 * h["z_norm"] ** 2 - (d - 1) * math.log(h["z_norm"]))
        assert h["regulariser"] == pytest.approx(expected, rel=1e-4)
        assert h["loss"] == pytest.approx(h["regulariser"] - h["reward"], rel=1e-4, abs=1e-4)


def test_weighted_rewards_checkpointing_and_adam(sd, soft):
    backbone = StableDiffusionBackbone(sd)
    mix = {"soft": soft, "sharp": rewards.build("shapes_color_soft", tau=0.01, sigma=0.1)}
    kwargs = dict(weights={"soft": 2.0, "sharp": 0.5}, iterations=3, num_steps=2, progress=False)
    plain = reno(backbone, mix, PROMPT, **kwargs)
    for h in plain.history:
        weighted = 2.0 * h["rewards"]["soft"] + 0.5 * h["rewards"]["sharp"]
        assert h["reward"] == pytest.approx(weighted, rel=1e-5)
    checkpointed = reno(backbone, mix, PROMPT, checkpoint=True, **kwargs)
    for p, c in zip(plain.history, checkpointed.history, strict=True):
        assert c["reward"] == pytest.approx(p["reward"], rel=1e-5)
    adam = reno(backbone, mix, PROMPT, optimizer="adam", lr=0.05, **kwargs)
    assert adam.history[1]["z_norm"] != plain.history[1]["z_norm"]


def test_non_differentiable_reward_is_rejected_by_name(sd, soft):
    backbone = StableDiffusionBackbone(sd)
    with pytest.raises(UserError, match="'shapes_color' is not differentiable"):
        reno(backbone, {"soft": soft, "shapes_color": rewards.build("shapes_color")}, PROMPT, progress=False)


def test_cli_writes_best_strip_history(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["reno", "--model", "tiny-sd", "--prompt", PROMPT, "--reward", "shapes_color_soft=2",
                 "--iterations", "3", "--seed", "1", "--regenerate-steps", "2", "--best-of-n",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    assert {"best.png", "strip.png", "history.json", "regenerated.png", "best_of_n.png"} <= {
        p.name for p in out.iterdir()
    }
    report = json.loads((out / "history.json").read_text())
    assert len(report["history"]) == 3 and report["weights"] == {"shapes_color_soft": 2.0}
    assert report["best_reward"] == max(h["reward"] for h in report["history"])
    assert report["best_of_n"]["n"] == report["reward_calls"] == 3


def test_cli_rejects_non_differentiable_reward_in_one_line(tmp_path, capsys):
    code = main(["reno", "--model", "tiny-sd", "--prompt", PROMPT, "--reward", "jpeg_compressibility",
                 "--out", str(tmp_path / "x")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "jpeg_compressibility" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


class Mean(rewards.Reward):
    """scale * mean pixel, differentiable."""

    differentiable = True

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, images, prompts):
        return self.scale * images.mean(dim=(1, 2, 3))


def test_reno_reward_takes_renos_weights_keeps_the_gradient_and_names_what_is_not_differentiable():
    reward = reno_reward({"hpsv2": Mean(1.0), "clip": Mean(2.0), "mine": Mean(3.0)}, {"mine": 0.5})
    assert reward.weights == {"hpsv2": 5.0, "clip": 0.01, "mine": 0.5}
    images = torch.rand(1, 3, 4, 4, requires_grad=True)
    total, _ = reward.score(images, [PROMPT])
    total.sum().backward()
    slope = 5.0 * 1.0 + 0.01 * 2.0 + 0.5 * 3.0  # d total / d pixel = sum_k w_k scale_k / 48
    assert torch.allclose(images.grad, torch.full_like(images, slope / 48))
    assert reno_reward(reward) is reward
    mixed = reno_reward({"hpsv2": Mean(1.0), "jpeg": rewards.build("jpeg_compressibility")})
    with pytest.raises(UserError, match="reward 'jpeg' is not differentiable"):
        require_differentiable(mixed)
