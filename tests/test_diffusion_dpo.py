"""Diffusion-DPO (anchors §2.6) on tiny SD and tiny SD3 (CPU): the loss is the published formula, swapping
winner and loser reverses the gradient, the reference is the base model bit for bit, and winner and loser are
noised with one noise at one t (observed at the denoiser's input through a forward hook)."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import rewards
from diffusion_align.config.registry import build_sampler
from diffusion_align.config.settings import SampleSettings
from diffusion_align.engine.backbones import StableDiffusionBackbone, load_backbone
from diffusion_align.engine.policy import Policy
from diffusion_align.errors import UserError
from diffusion_align.math.losses import diffusion_dpo_loss
from diffusion_align.math.samplers import DDIMSampler
from diffusion_align.methods.strategies.dpo import DiffusionDPO, DiffusionDPOConfig
from diffusion_align.testing import tiny_sd
from rewards.combine import Combined

SAMPLE = SampleSettings(num_steps=2, eta=1.0, guidance_scale=5.0, batch_size=4)
FLOW = SampleSettings(num_steps=2, eta=0.7, guidance_scale=1.0, batch_size=4)
CAPTIONS = [
    "two small red circles on the left on a black background",
    "one large blue square at the bottom on a gray background",
    "three small green triangles on the right on a black background",
]


def color_reward():
    return Combined({"shapes_color_soft": rewards.build("shapes_color_soft")})


def perturb(policy, seed=0):
    """A non-zero adapter: the policy differs from the reference and every LoRA weight gets gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return policy


def write_pairs(folder, n, size=32, seed=0):
    """n JSONL pairs of random PNGs with shapes captions."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        for side in "wl":
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}{side}.png")
        lines.append(json.dumps({"prompt": CAPTIONS[i % 3], "image_w": f"{i}w.png", "image_l": f"{i}l.png"}))
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def sd_policy():
    pipe = tiny_sd()
    return perturb(Policy(StableDiffusionBackbone(pipe), DDIMSampler.from_scheduler(pipe.scheduler), rank=4))


@pytest.fixture(scope="module")
def sd_batch(sd_policy, tmp_path_factory):
    data = write_pairs(tmp_path_factory.mktemp("pairs"), 4)
    strategy = DiffusionDPO(DiffusionDPOConfig(data=str(data), beta=200.0), sd_policy, color_reward(), SAMPLE)
    return strategy, strategy.collect(["ignored"] * 8, torch.Generator().manual_seed(0))


def record_denoiser(unet):
    """Every denoiser call's (sample, timestep, output), in call order."""
    calls = []

    def hook(module, args, kwargs, output):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        out = output[0] if isinstance(output, tuple) else output.sample
        calls.append((sample.detach().clone(), torch.as_tensor(t).detach().clone(), out.detach().clone()))

    return calls, unet.register_forward_hook(hook, with_kwargs=True)


# --- the formula --------------------------------------------------------------------------------------
def test_loss_equals_a_hand_computation():
    w, l, rw, rl = 0.30, 0.50, 0.32, 0.49  # policy errors of winner/loser, then the reference's
    beta = 100.0
    t = {k: torch.tensor([v], dtype=torch.float64) for k, v in dict(w=w, l=l, rw=rw, rl=rl).items()}
    # the paper's code: inside = -0.5 * beta * ((w - l) - (rw - rl)) = 0.5 * 100 * 0.03 = 1.5
    inside = -0.5 * beta * ((w - l) - (rw - rl))
    assert abs(inside - 1.5) < 1e-12
    loss, reward_w, reward_l = diffusion_dpo_loss(t["w"], t["l"], t["rw"], t["rl"], beta)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.5)), rel=1e-6)
    assert reward_w.item() == pytest.approx(0.5 * beta * (rw - w), rel=1e-9)  # 1.0
    assert reward_l.item() == pytest.approx(0.5 * beta * (rl - l), rel=1e-9)  # -0.5
    # diffusers' form: beta * ((rw - rl) - (w - l)) = 100 * 0.03 = 3
    loss, *_ = diffusion_dpo_loss(t["w"], t["l"], t["rw"], t["rl"], beta, beta_form="diffusers")
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-3.0)), rel=1e-6)
    loss, *_ = diffusion_dpo_loss(t["w"], t["l"], t["rw"], t["rl"], beta, "hinge", "diffusers")
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # relu(1 - 3)
    loss, *_ = diffusion_dpo_loss(t["w"], t["l"], t["rw"], t["rl"], 10.0, "hinge", "diffusers")
    assert loss.item() == pytest.approx(1 - 0.3, rel=1e-5)  # relu(1 - 10 * 0.03)
    loss, *_ = diffusion_dpo_loss(t["w"], t["l"], t["rw"], t["rl"], 10.0, "ipo", "salesforce")
    assert loss.item() == pytest.approx((0.015 - 1 / 20) ** 2, rel=1e-5)  # (h - 1 / (2 beta))^2


def test_sft_weight_adds_the_winner_error_in_the_dpo_terms_units():
    # RPO-style: loss + sft_weight * beta * s * error_w. By hand (salesforce form, s = 1/2, beta 100):
    # inside = 1.5 as above, so loss = log(1 + e^-1.5) + 0.4 * 50 * 0.30, and d loss / d error_w =
    # beta s sigmoid(-1.5) + 0.4 * beta s (the winner's error pulled down harder), d / d error_l unchanged.
    w, l, rw, rl = (
        torch.tensor([v], dtype=torch.float64, requires_grad=True) for v in (0.30, 0.50, 0.32, 0.49)
    )
    loss, reward_w, reward_l = diffusion_dpo_loss(w, l, rw, rl, 100.0, sft_weight=0.4)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.5)) + 0.4 * 50 * 0.30, rel=1e-9)
    loss.sum().backward()
    sig = 1 / (1 + math.exp(1.5))
    assert w.grad.item() == pytest.approx(50 * sig + 0.4 * 50, rel=1e-9)
    assert l.grad.item() == pytest.approx(-50 * sig, rel=1e-9)
    assert reward_w.item() == pytest.approx(50 * (0.32 - 0.30), rel=1e-9)  # the implicit rewards: unchanged
    assert reward_l.item() == pytest.approx(50 * (0.49 - 0.50), rel=1e-9)


def test_beta_5000_in_the_paper_form_is_beta_2500_in_diffusers_form():
    g = torch.Generator().manual_seed(0)
    errors = [torch.rand(6, generator=g) for _ in range(4)]
    paper, *_ = diffusion_dpo_loss(*errors, 5000.0, beta_form="salesforce")
    example, *_ = diffusion_dpo_loss(*errors, 2500.0, beta_form="diffusers")
    assert torch.allclose(paper, example)


def test_unknown_loss_type_is_refused():
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="sigmoid, hinge or ipo"):
        diffusion_dpo_loss(x, x, x, x, 1.0, "squared")


# --- the strategy on tiny SD ----------------------------------------------------------------------------
def grads(strategy, batch, pairs):
    params = strategy.policy.parameters()
    for p in params:
        p.grad = None
    loss, _ = strategy.loss({"batch": batch, "pairs": pairs, "weight": 1.0})
    loss.backward()
    return torch.cat([p.grad.flatten() for p in params])


def test_swapping_winner_and_loser_reverses_the_gradient(sd_batch):
    strategy, batch = sd_batch
    pairs = torch.tensor([0])
    forward = grads(strategy, batch, pairs)
    swapped = grads(strategy, dict(batch, x0=batch["x0"].flip(1)), pairs)
    assert forward.abs().max() > 0
    cosine = torch.nn.functional.cosine_similarity(forward, swapped, dim=0)
    assert cosine.item() < -0.99999, cosine
    # -log sigmoid(b h) against -log sigmoid(-b h): the magnitudes differ by sigmoid(b h) / sigmoid(-b h)
    _, metrics = strategy.loss({"batch": batch, "pairs": pairs, "weight": 1.0})
    inside = metrics["rewards/margin"]
    ratio = torch.sigmoid(torch.tensor(inside)) / torch.sigmoid(torch.tensor(-inside))
    assert swapped.norm() / forward.norm() == pytest.approx(ratio.item(), rel=1e-3)


def test_the_strategy_adds_sft_weight_times_the_winners_policy_error(sd_batch):
    strategy, batch = sd_batch
    pairs = torch.tensor([0, 1])
    calls, handle = record_denoiser(strategy.policy.backbone.unet)
    try:
        with torch.no_grad():
            plain, _ = strategy.loss({"batch": batch, "pairs": pairs, "weight": 1.0})
    finally:
        handle.remove()
    x_t, t, _ = calls[0]
    a = DDIMSampler.from_scheduler(tiny_sd().scheduler).alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x0 = torch.cat([batch["x0"][pairs, 0], batch["x0"][pairs, 1]])
    noise = (x_t.float() - a.sqrt() * x0) / (1 - a).sqrt()  # the target of epsilon-prediction
    winner_error = ((calls[1][2][:2].float() - noise[:2]) ** 2).mean().item()  # the policy's call
    strategy.config.sft_weight = 0.5
    try:
        with torch.no_grad():
            added, _ = strategy.loss({"batch": batch, "pairs": pairs, "weight": 1.0})
    finally:
        strategy.config.sft_weight = 0.0
    # beta 200 in the salesforce form (s = 1/2): + 0.5 * 200 * 0.5 * mean winner error
    assert added.item() - plain.item() == pytest.approx(50.0 * winner_error, rel=1e-3)


def test_the_reference_is_the_base_model_bit_for_bit(sd_batch):
    strategy, batch = sd_batch
    base = tiny_sd().unet  # the same seeded weights, never given a LoRA
    calls, handle = record_denoiser(strategy.policy.backbone.unet)
    try:
        strategy.loss({"batch": batch, "pairs": torch.tensor([0, 1]), "weight": 1.0})
    finally:
        handle.remove()
    (x_ref, t_ref, out_ref), (x_pol, _, out_pol) = calls
    embeds = batch["embeds"][torch.tensor([0, 1, 0, 1])]
    with torch.no_grad():
        expected = base(x_ref, t_ref, encoder_hidden_states=embeds.cond).sample
    assert torch.equal(out_ref, expected)
    assert torch.equal(x_ref, x_pol)
    assert not torch.allclose(out_pol, expected)  # the policy call carries the LoRA


def test_winner_and_loser_share_noise_and_timestep(sd_batch):
    strategy, batch = sd_batch
    pairs = torch.tensor([0, 1, 2])
    calls, handle = record_denoiser(strategy.policy.backbone.unet)
    try:
        _, metrics = strategy.loss({"batch": batch, "pairs": pairs, "weight": 1.0})
    finally:
        handle.remove()
    x_t, t, out_ref = calls[0]
    p = len(pairs)
    assert torch.equal(t[:p], t[p:])  # one t per pair
    assert len(set(t[:p].tolist())) == p  # drawn per pair
    # the noise the denoiser saw, recovered from x_t = sqrt(a) x0 + sqrt(1 - a) noise
    x0 = torch.cat([batch["x0"][pairs, 0], batch["x0"][pairs, 1]])
    a = DDIMSampler.from_scheduler(tiny_sd().scheduler).alphas_cumprod[t].float().view(-1, 1, 1, 1)
    noise = (x_t.float() - a.sqrt() * x0) / (1 - a).sqrt()
    assert torch.allclose(noise[:p], noise[p:], atol=1e-4)
    assert not torch.allclose(noise[0], noise[1], atol=0.1)
    # epsilon prediction: the reference error is |eps_ref - noise|^2 averaged over the latent
    assert metrics["ref_mse"] == pytest.approx(((out_ref - noise) ** 2).mean().item(), rel=1e-4)


def test_micro_batches_accumulate_to_the_whole_step(sd_batch):
    strategy, batch = sd_batch
    from test_strategies import accumulated_grads, assert_same_grads

    (whole,) = strategy.plan(batch, 8, 8, torch.Generator().manual_seed(1))
    (split,) = strategy.plan(batch, 8, 2, torch.Generator().manual_seed(1))
    assert len(whole) == 1 and len(split) == 4
    assert_same_grads(accumulated_grads(strategy, whole), accumulated_grads(strategy, split), tol=1e-4)


# --- flow models: velocity error ---------------------------------------------------------------------
def test_flow_models_train_the_velocity_noise_minus_x0(tmp_path):
    backbone = load_backbone("tiny-sd3")
    policy = perturb(Policy(backbone, build_sampler(backbone, FLOW), rank=4))
    data = write_pairs(tmp_path, 2, size=32)
    sample = SampleSettings(num_steps=2, eta=0.7, guidance_scale=1.0, batch_size=4, height=32, width=32)
    strategy = DiffusionDPO(DiffusionDPOConfig(data=str(data)), policy, color_reward(), sample)
    batch = strategy.collect(["ignored"] * 4, torch.Generator().manual_seed(0))
    calls, handle = record_denoiser(backbone.unet)
    try:
        _, metrics = strategy.loss({"batch": batch, "pairs": torch.tensor([0, 1]), "weight": 1.0})
    finally:
        handle.remove()
    x_t, t, v_ref = calls[0]
    assert torch.equal(t[:2], t[2:]) and t.is_floating_point()
    x0 = torch.cat([batch["x0"][:, 0], batch["x0"][:, 1]])
    sigma = (t.float() / 1000).view(-1, 1, 1, 1)
    noise = (x_t.float() - (1 - sigma) * x0) / sigma  # x_t = (1 - sigma) x0 + sigma noise
    assert torch.allclose(noise[:2], noise[2:], atol=1e-3)
    assert metrics["ref_mse"] == pytest.approx(((v_ref - (noise - x0)) ** 2).mean().item(), rel=1e-3)


# --- errors ------------------------------------------------------------------------------------------
def test_offline_pairs_need_data_and_online_pairs_need_step_noise(sd_policy):
    with pytest.raises(UserError, match="strategy.data"):
        DiffusionDPO(DiffusionDPOConfig(), sd_policy, color_reward(), SAMPLE)
    deterministic = SampleSettings(num_steps=2, eta=0.0, batch_size=4)
    with pytest.raises(UserError, match="eta > 0"):
        DiffusionDPO(DiffusionDPOConfig(pairs="online"), sd_policy, color_reward(), deterministic)


# --- online pairs (flow_grpo's OnlineDPO) ------------------------------------------------------------
@pytest.mark.parametrize("share", [True, False], ids=["shared-x_T", "own-x_T"])
def test_online_pairs_share_x_T_and_the_reward_picks_the_winner(sd_policy, share):
    strategy = DiffusionDPO(
        DiffusionDPOConfig(pairs="online", group_size=2, share_initial_noise=share),
        sd_policy,
        color_reward(),
        SAMPLE,
    )
    calls, handle = record_denoiser(sd_policy.backbone.unet)
    try:
        batch = strategy.collect([CAPTIONS[0], "x", CAPTIONS[1], "y"], torch.Generator().manual_seed(3))
    finally:
        handle.remove()
    x_T = calls[0][0][4:]  # the first rollout call on [uncond, cond] x 4 samples: the cond half
    assert torch.equal(x_T[0], x_T[1]) == share and torch.equal(x_T[2], x_T[3]) == share
    assert not torch.equal(x_T[0], x_T[2])
    assert len(batch["x0"]) == batch["global_pairs"] >= 1
    with torch.no_grad():
        images = sd_policy.backbone.decode(batch["x0"].flatten(0, 1))
    prompts = [p for p in batch["pair_prompts"] for _ in (0, 1)]
    scores = color_reward().score(images, prompts)[0].view(-1, 2)
    assert (scores[:, 0] > scores[:, 1]).all()  # winner first, by the configured reward


def test_a_refreshed_reference_is_the_policy_of_that_step(sd_batch):
    strategy, batch = sd_batch
    strategy.config.ref_update_every, steps, ref = 2, strategy.steps, strategy.ref
    try:
        plan = strategy.plan(batch, 2, 2, torch.Generator().manual_seed(0))  # 4 steps of 1 pair
        assert [step[0]["refresh_reference"] for step in plan] == [True, False, True, False]
        loss, metrics = strategy.loss(plan[0][0])
        assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # policy == reference: no margin
        assert metrics["rewards/margin"] == 0.0
        state = strategy.state_dict()
        assert all(torch.equal(r, p) for r, p in zip(state["ref"], strategy.policy.parameters(), strict=True))
    finally:
        strategy.config.ref_update_every, strategy.steps, strategy.ref = 0, steps, ref


def test_noise_draws_give_each_pair_several_t_and_noise(sd_policy, tmp_path):
    data = write_pairs(tmp_path, 2)
    config = DiffusionDPOConfig(data=str(data), noise_draws=3)
    strategy = DiffusionDPO(config, sd_policy, color_reward(), SAMPLE)
    batch = strategy.collect(["ignored"] * 4, torch.Generator().manual_seed(0))
    assert len(batch["x0"]) == 6 and batch["metrics"]["preference/pairs"] == 2
    assert torch.equal(batch["x0"][0], batch["x0"][2]) and not torch.equal(batch["x0"][0], batch["x0"][3])
    assert len(set(batch["t"].tolist())) == 6 and len(set(batch["noise_seeds"])) == 6
    (step,) = strategy.plan(batch, 4, 4, torch.Generator().manual_seed(0))  # 2 pairs x 3 draws, one step
    assert sum(len(m["pairs"]) for m in step) == 6


def test_offline_pairs_resume_in_the_same_order_and_the_order_follows_the_run_seed(sd_policy, tmp_path):
    data = write_pairs(tmp_path, 5)

    def make():
        return DiffusionDPO(DiffusionDPOConfig(data=str(data)), sd_policy, color_reward(), SAMPLE)

    first = make()
    first.collect(["ignored"] * 4, torch.Generator().manual_seed(0))
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    a = first.collect(["ignored"] * 4, torch.Generator().manual_seed(1))
    b = resumed.collect(["ignored"] * 4, torch.Generator().manual_seed(1))
    assert torch.equal(a["x0"], b["x0"]) and a["pair_prompts"] == b["pair_prompts"]
    other = make()
    other.collect(["ignored"] * 4, torch.Generator().manual_seed(7))
    assert other.order.seed != first.order.seed
