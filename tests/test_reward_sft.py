"""Reward-filtered SFT on tiny SD (CPU): the top share of each prompt's samples by the reward is kept, and the
loss is the plain denoising error of the kept latents (checked against an independent computation)."""

import pytest
import torch

import rewards
from diffusion_align.config.settings import SampleSettings
from diffusion_align.engine.backbones import StableDiffusionBackbone
from diffusion_align.engine.policy import Policy
from diffusion_align.math.samplers import DDIMSampler
from diffusion_align.methods.strategies.sft import RewardSFT, RewardSFTConfig
from diffusion_align.testing import tiny_sd
from rewards.combine import Combined

SAMPLE = SampleSettings(num_steps=2, eta=1.0, guidance_scale=5.0, batch_size=4)
PROMPTS = [
    "two small red circles on the left on a black background",
    "one large blue square at the bottom on a gray background",
]


@pytest.fixture(scope="module")
def collected():
    pipe = tiny_sd()
    policy = Policy(StableDiffusionBackbone(pipe), DDIMSampler.from_scheduler(pipe.scheduler), rank=4)
    reward = Combined({"soft": rewards.build("shapes_color_soft")})
    strategy = RewardSFT(RewardSFTConfig(group_size=4, keep_fraction=0.5), policy, reward, SAMPLE)
    prompts = [PROMPTS[0]] * 4 + [PROMPTS[1]] * 4
    return strategy, strategy.collect(prompts, torch.Generator().manual_seed(0))


def test_the_top_share_of_each_prompt_is_kept(collected):
    strategy, batch = collected
    reward = batch["reward"].view(2, 4)
    for group in range(2):
        kept = sorted(int(k) - 4 * group for k in batch["kept"][2 * group : 2 * group + 2])
        best_two = sorted(reward[group].topk(2).indices.tolist())
        assert kept == best_two
    assert len(batch["x0"]) == 4
    assert batch["metrics"]["sft/kept_reward_mean"] >= reward.mean().item()


def test_the_loss_is_the_denoising_error_of_the_kept_latents(collected):
    strategy, batch = collected
    rows = torch.tensor([0, 3])
    loss, _ = strategy.loss({"batch": batch, "rows": rows, "weight": 1.0})
    # independently: epsilon prediction at x_t = sqrt(a) x0 + sqrt(1 - a) noise, noise from each row's seed
    sampler = DDIMSampler.from_scheduler(tiny_sd().scheduler)
    errors = []
    for r in rows.tolist():
        noise = torch.randn(
            batch["x0"].shape[1:], generator=torch.Generator().manual_seed(batch["noise_seeds"][r])
        )
        a = sampler.alphas_cumprod[int(batch["t"][r])].float()
        x_t = a.sqrt() * batch["x0"][r] + (1 - a).sqrt() * noise
        embeds = batch["embeds"][batch["kept"][r : r + 1]]
        with torch.no_grad():
            eps = strategy.policy.backbone.unet(
                x_t[None], batch["t"][r : r + 1], encoder_hidden_states=embeds.cond
            )
        errors.append(((eps.sample[0] - noise) ** 2).mean())
    assert loss.item() == pytest.approx(torch.stack(errors).mean().item(), rel=1e-5)


def test_plan_spreads_the_kept_images_over_the_steps(collected):
    strategy, batch = collected
    plan = strategy.plan(batch, 4, 1, torch.Generator().manual_seed(0))  # 8 samples / 4 = 2 steps
    assert len(plan) == 2 and all(abs(sum(m["weight"] for m in step) - 1) < 1e-9 for step in plan)
    assert sorted(int(m["rows"]) for step in plan for m in step) == [0, 1, 2, 3]
