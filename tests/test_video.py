"""Video backbones (AnimateDiff, TextToVideoSD): pipeline parity, DDPO re-scoring, LoRA into diffusers, reward
backprop with a decoded frame subset, MP4/GIF writing. Tiny models, 4 frames, 2-3 steps."""

import json

import imageio.v2 as imageio
import imageio.v3 as iio
import pytest
import torch

from diffusion_align.engine.backbones import StableDiffusionBackbone, VideoBackbone, load_backbone
from diffusion_align.engine.policy import Policy
from diffusion_align.engine.rollout import rollout
from diffusion_align.errors import UserError
from diffusion_align.math.samplers import DDIMSampler
from diffusion_align.methods.strategies.sampling import transition_inputs
from diffusion_align.testing_video import TINY_VIDEO_PIPELINES, tiny_animatediff
from diffusion_align.videos import save_videos, write_gif, write_mp4
from rewards.shapes import ShapesColorSoftReward
from rewards.video import per_frame, select_frames

PROMPTS = [
    "two small red circles on the left on a black background",
    "one large blue square on a white background",
]
FAMILIES = ["tiny-animatediff", "tiny-t2v"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _backbone(name: str, eta: float = 1.0):
    backbone = load_backbone(name, device="cpu")
    return backbone, DDIMSampler.from_scheduler(backbone.scheduler, eta=eta)


def _rollout(backbone, sampler, steps, guidance, eta, seed=0, negative=None, **kw):
    g = torch.Generator().manual_seed(seed)
    embeds = backbone.encode_prompts(PROMPTS, negative_prompt=negative, guidance=guidance > 1)
    x_T = backbone.initial_noise(len(PROMPTS), g)
    return rollout(backbone, sampler, embeds, x_T, steps, guidance, eta, generator=g, **kw)


def _perturb(policy: Policy, scale: float = 0.05, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _pipeline_frames(pipe, steps, guidance, eta, negative=None, seed=0):
    return pipe(
        PROMPTS,
        num_frames=4,
        num_inference_steps=steps,
        guidance_scale=guidance,
        eta=eta,
        negative_prompt=negative and [negative] * len(PROMPTS),
        output_type="pt",
        generator=torch.Generator().manual_seed(seed),
    ).frames


# AnimateDiff's DDIM step draws its noise in the (B, C, T, h, w) layout, as we do, so eta = 1 matches too;
# TextToVideoSD steps on (B*T, C, h, w) frames (another draw order): only the deterministic sampler compares.
@pytest.mark.parametrize(
    "name,eta", [("tiny-animatediff", 0.0), ("tiny-animatediff", 1.0), ("tiny-t2v", 0.0)]
)
def test_rollout_reproduces_video_pipeline(name, eta):
    backbone, sampler = _backbone(name, eta)
    expected = _pipeline_frames(backbone.pipe, 3, 5.0, eta, negative="blurry")
    with torch.no_grad():
        ours = _rollout(backbone, sampler, 3, 5.0, eta, negative="blurry")
    assert ours.images.shape == expected.shape == (2, 4, 3, 32, 32)
    assert (ours.images - expected).abs().max() <= 1e-4
    assert ours.latents.shape == (2, 4, 4, 4, 16, 16)  # (B, S+1, C, T, h, w)


def test_rollout_without_guidance_reproduces_t2v():
    backbone, sampler = _backbone("tiny-t2v", 0.0)
    expected = _pipeline_frames(backbone.pipe, 2, 1.0, 0.0, seed=5)
    with torch.no_grad():
        ours = _rollout(backbone, sampler, 2, 1.0, 0.0, seed=5)
    assert (ours.images - expected).abs().max() <= 1e-4


def test_video_backbones_load_by_name_and_folder(tmp_path):
    for name in FAMILIES:
        backbone = load_backbone(name, device="cpu")
        assert isinstance(backbone, VideoBackbone)
        assert backbone.initial_noise(3).shape == (3, 4, 4, 16, 16)
        assert backbone.initial_noise(1, num_frames=6).shape == (1, 4, 6, 16, 16)
    # a saved pipeline folder dispatches on model_index.json's class, as a hub checkpoint would
    TINY_VIDEO_PIPELINES["tiny-t2v"]().save_pretrained(tmp_path / "t2v")
    loaded = load_backbone(str(tmp_path / "t2v"), device="cpu")
    assert isinstance(loaded, VideoBackbone) and type(loaded.unet).__name__ == "UNet3DConditionModel"
    assert loaded.num_frames == 16  # real checkpoints default to the 16-frame training length


def test_decoding_a_frame_subset_matches_the_full_decode_and_routes_gradient():
    backbone, _ = _backbone("tiny-animatediff")
    latents = torch.randn(2, 4, 4, 16, 16, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    full = backbone.decode(latents)
    assert full.shape == (2, 4, 3, 32, 32) and 0 <= full.min() and full.max() <= 1
    torch.testing.assert_close(backbone.decode(latents, frames=[0, 3]), full[:, [0, 3]], atol=1e-6, rtol=0)
    idx = select_frames(
        2, 4, "random", k=1, generator=torch.Generator().manual_seed(0)
    )  # (B, 1), VADER's default
    subset = backbone.decode(latents, frames=idx, chunk_size=1)
    torch.testing.assert_close(subset, full[torch.arange(2)[:, None], idx], atol=1e-6, rtol=0)
    subset.sum().backward()
    touched = latents.grad.abs().sum(dim=(1, 3, 4)) > 0  # (B, T): which latent frames received gradient
    expected = torch.zeros(2, 4, dtype=torch.bool)
    expected[torch.arange(2), idx[:, 0]] = True
    assert torch.equal(touched, expected)


def test_encode_keeps_frames_in_order():
    backbone, _ = _backbone("tiny-t2v")
    video = torch.rand(2, 3, 3, 32, 32)
    latents = backbone.encode(video, torch.Generator().manual_seed(0))
    assert latents.shape == (2, 4, 3, 16, 16)
    # latent frame (b, t) is the image encoding of video b, frame t: the batch and frame axes never mix
    as_images = StableDiffusionBackbone.encode(
        backbone, video.flatten(0, 1), torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(latents.transpose(1, 2).flatten(0, 1), as_images)


@pytest.mark.parametrize("name", FAMILIES)
def test_ddpo_log_prob_recomputes_exactly_on_video(name):
    backbone, sampler = _backbone(name)
    policy = Policy(backbone, sampler, rank=4)
    _perturb(policy)  # a non-trivial adapter, so LoRA layers are part of the check
    with torch.no_grad():
        traj = _rollout(backbone, sampler, 3, 5.0, 1.0, decode=False)
        embeds = backbone.encode_prompts(PROMPTS)
        assert traj.log_probs.shape == (2, 3)
        for step in range(3):
            steps = torch.tensor([step, 2 - step])
            stored = {"latents": traj.latents, "timesteps": traj.timesteps, "embeds": embeds}
            x_t, x_prev, t, _ = transition_inputs(stored, torch.arange(2), steps)
            log_prob = policy.log_prob(x_t, x_prev, t, embeds, 5.0, 3)
            ratio = torch.exp(log_prob - traj.log_probs[torch.arange(2), steps])
            assert (ratio - 1).abs().max() <= 1e-6
            with policy.reference():  # the base model (adapter off) scores the same samples differently
                assert (policy.log_prob(x_t, x_prev, t, embeds, 5.0, 3) - log_prob).abs().max() > 1e-6


def test_animatediff_lora_loads_into_diffusers_pipeline(tmp_path):
    backbone, sampler = _backbone("tiny-animatediff", eta=0.0)
    policy = Policy(backbone, sampler, rank=4)
    _perturb(policy, 0.2)
    with torch.no_grad():
        ours = _rollout(backbone, sampler, 2, 5.0, 0.0).images
    policy.save_lora(tmp_path / "lora")
    pipe = tiny_animatediff()
    base = _pipeline_frames(pipe, 2, 5.0, 0.0)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    tuned = _pipeline_frames(pipe, 2, 5.0, 0.0)
    assert (tuned - base).abs().max() > 1e-3  # the LoRA changes the diffusers pipeline's output ...
    assert (tuned - ours).abs().max() <= 1e-4  # ... into exactly what our policy samples


def test_t2v_lora_saves_and_reloads(tmp_path):
    # diffusers 0.42 cannot `load_lora_weights` into UNet3DConditionModel (it lacks PeftAdapterMixin); our
    # policy attaches the same peft layers and round-trips them in the diffusers LoRA file format.
    backbone, sampler = _backbone("tiny-t2v", eta=0.0)
    policy = Policy(backbone, sampler, rank=4)
    with torch.no_grad():
        base = _rollout(backbone, sampler, 2, 5.0, 0.0).images
    _perturb(policy, 0.2)
    with torch.no_grad():
        tuned = _rollout(backbone, sampler, 2, 5.0, 0.0).images
    assert (tuned - base).abs().max() > 1e-3
    policy.save_lora(tmp_path / "lora")
    fresh, fresh_sampler = _backbone("tiny-t2v", eta=0.0)
    Policy(fresh, fresh_sampler, rank=4).load_lora(tmp_path / "lora")
    with torch.no_grad():
        reloaded = _rollout(fresh, fresh_sampler, 2, 5.0, 0.0).images
    assert (reloaded - tuned).abs().max() <= 1e-5


@pytest.mark.parametrize("name", FAMILIES)
def test_reward_backprop_with_frame_subset_raises_reward(name):
    # VADER-style: last-step gradient window, decode one random frame per video, differentiable image reward
    backbone, sampler = _backbone(name)
    policy = Policy(backbone, sampler, rank=4)
    reward = ShapesColorSoftReward()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-2, weight_decay=0.0)
    frames_gen = torch.Generator().manual_seed(0)
    embeds = backbone.encode_prompts(PROMPTS)

    def evaluate() -> float:  # all frames, fixed noise
        with torch.no_grad():
            video = _rollout(backbone, sampler, 2, 5.0, 1.0, seed=100).images
        return per_frame(reward, mode="all")(video, PROMPTS).mean().item()

    before = evaluate()
    for step in range(8):
        g = torch.Generator().manual_seed(step)
        x_T = backbone.initial_noise(2, g)
        traj = rollout(backbone, sampler, embeds, x_T, 2, 5.0, grad_steps=[-1], generator=g, decode=False)
        idx = select_frames(2, backbone.num_frames, "random", k=1, generator=frames_gen)
        frames = backbone.decode(traj.x0, frames=idx)  # (B, 1, 3, H, W): only one frame through the VAE
        loss = -reward(frames.flatten(0, 1), PROMPTS).mean()
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in policy.parameters())
        optimizer.step()
    after = evaluate()
    assert after > before + 0.01, (before, after)


def test_t2v_rejects_unet_gradient_checkpointing():
    backbone, _ = _backbone("tiny-t2v")
    with pytest.raises(UserError, match="gradient_checkpointing"):
        backbone.enable_memory_options(gradient_checkpointing=True)
    anim, _ = _backbone("tiny-animatediff")
    anim.enable_memory_options(gradient_checkpointing=True)
    assert anim.unet.is_gradient_checkpointing


def _test_video(frames: int = 4) -> torch.Tensor:
    video = torch.zeros(frames, 3, 32, 32)
    for t in range(frames):
        video[t, 0] = t / (frames - 1)  # red ramps up over time
        video[t, 2, :, : 8 * (t + 1)] = 1.0  # a blue band widens
    return video


def test_write_mp4_and_gif_round_trip(tmp_path):
    video = _test_video()
    mp4 = write_mp4(video, tmp_path / "v.mp4", fps=4)
    reader = imageio.get_reader(mp4)
    frames = [f for f in reader]
    assert len(frames) == 4 and frames[0].shape == (32, 32, 3) and reader.get_meta_data()["fps"] == 4
    red = [f[..., 0].mean() / 255 for f in frames]
    assert all(abs(r - t / 3) < 0.03 for t, r in enumerate(red))  # lossy H.264, but the ramp survives
    gif = write_gif(video, tmp_path / "v.gif", fps=4, scale=2)
    decoded = iio.imread(gif, index=None)
    assert decoded.shape == (4, 64, 64, 3)
    expected = (video.repeat_interleave(2, 2).repeat_interleave(2, 3).permute(0, 2, 3, 1) * 255).round()
    assert (torch.from_numpy(decoded).float() - expected).abs().max() <= 1  # 4 colours: lossless palette
    assert iio.immeta(gif)["loop"] == 0


def test_mp4_pads_odd_sizes_and_save_videos_writes_every_format(tmp_path):
    video = torch.rand(3, 3, 31, 33)
    frames = [f for f in imageio.get_reader(write_mp4(video, tmp_path / "odd.mp4"))]  # list() asks len(): inf
    assert frames[0].shape == (32, 34, 3)
    paths = save_videos(torch.rand(2, 3, 3, 16, 16), tmp_path / "out", ["a", "b"])
    assert sorted(p.name for p in paths) == ["a.gif", "a.mp4", "b.gif", "b.mp4"]
    assert all(p.stat().st_size > 0 for p in paths)
    with pytest.raises(ValueError, match="webm"):
        save_videos(torch.rand(1, 2, 3, 16, 16), tmp_path, ["c"], formats=("webm",))


def _sample(tmp_path, name, *extra):
    from diffusion_align.cli import main

    out = tmp_path / name
    argv = ["sample", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--num-steps", "2", "--out", str(out)]
    assert main([*argv, *extra]) == 0
    return out


def test_sample_writes_mp4_gif_and_first_frame_grid(tmp_path):
    out = _sample(tmp_path, "anim", "--model", "tiny-animatediff")
    rows = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    assert [r["video"] for r in rows] == [
        "videos/0000_two_small_red_circles_on_the_left_on_a_black_background.mp4",
        "videos/0001_one_large_blue_square_on_a_white_background.mp4",
    ]
    for row in rows:
        gif = iio.imread(out / row["gif"], index=None)
        mp4 = [f for f in imageio.get_reader(out / row["video"])]
        first = iio.imread(out / row["file"])
        assert gif.shape == (4, 32, 32, 3) and len(mp4) == 4 and first.shape == (32, 32, 3)
        assert abs(gif[0].astype(float) - first).mean() <= 8  # GIF palette quantisation only
        assert abs(gif[0].astype(float) - gif[-1]).max() > 0  # frames differ: it is a video, not a still
    assert (out / "grid.png").is_file()


def test_sample_loads_a_t2v_lora(tmp_path):
    backbone, sampler = _backbone("tiny-t2v", eta=0.0)
    policy = Policy(backbone, sampler, rank=2, alpha=4.0)
    _perturb(policy, 0.3)
    policy.save_lora(tmp_path / "lora")
    g = [torch.Generator().manual_seed(0)]
    with torch.no_grad():
        embeds = backbone.encode_prompts(PROMPTS[:1])
        ours = rollout(
            backbone, sampler, embeds, backbone.initial_noise(1, g), 2, 5.0, 0.0, generator=g
        ).images
    common = ["--model", "tiny-t2v", "--eta", "0", "--guidance", "5"]
    base = _sample(tmp_path, "base", *common)
    tuned = _sample(tmp_path, "tuned", *common, "--lora", str(tmp_path / "lora"))
    name = "images/0000_two_small_red_circles_on_the_left_on_a_black_background.png"
    base_px, tuned_px = (torch.from_numpy(iio.imread(d / name)).float() for d in (base, tuned))
    assert (base_px - tuned_px).abs().max() > 2
    assert (tuned_px - ours[0, 0].permute(1, 2, 0) * 255).abs().max() <= 1  # uint8 rounding only


def test_lora_target_names_from_file_keys():
    from diffusion_align.engine.backbones.video import _module_name

    assert _module_name(
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora.down.weight"
    ) == ("to_out.0")
    assert _module_name("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight") == "to_k"


def test_grad_decode_frames_decodes_a_random_subset_only_under_gradient():
    backbone, _ = _backbone("tiny-animatediff")
    backbone.grad_decode_frames = 1
    latents = torch.randn(2, 4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert backbone.decode(latents).shape == (2, 4, 3, 32, 32)  # sampling / evaluation: every frame
    assert backbone.decode(latents).shape == (2, 4, 3, 32, 32)  # no gradient needed: every frame
    subset = backbone.decode(latents.requires_grad_(True))
    assert subset.shape == (2, 1, 3, 32, 32)
    with torch.no_grad():  # and it is one of the video's own frames
        full = backbone.decode(latents)
    assert all(any((subset[b, 0] - full[b, t]).abs().max() < 1e-5 for t in range(4)) for b in range(2))


def test_per_frame_from_config_lifts_a_registered_image_reward():
    import rewards

    reward = rewards.build("per_frame", reward="shapes_color_soft", mode="random", k=1, seed=0)
    assert reward.differentiable
    video = torch.rand(2, 4, 3, 32, 32, requires_grad=True)
    score = reward(video, PROMPTS)
    assert score.shape == (2,)
    score.sum().backward()
    per_video_frames = (video.grad.abs().sum(dim=(2, 3, 4)) > 0).sum(1)
    assert per_video_frames.tolist() == [1, 1]  # one random frame of each video is scored
    image_score = ShapesColorSoftReward()(video[0].detach(), [PROMPTS[0]] * 4)
    frame = (video.grad[0].abs().sum(dim=(1, 2, 3)) > 0).nonzero().item()
    assert abs(score[0].item() - image_score[frame].item()) < 1e-6


def test_draft_strategy_on_video_decodes_one_frame_under_gradient_and_raises_reward():
    # The strategies' reward backprop (DRaFT-1, i.e. VADER's "last" mode) on AnimateDiff, with the reward
    # built from config settings as the trainer builds it, and VADER's one-random-frame decoding for backprop.
    from diffusion_align.config.registry import build_reward
    from diffusion_align.config.settings import RewardSettings, SampleSettings
    from diffusion_align.methods.strategies.reward_backprop import DRaFT, DRaFTConfig

    backbone, sampler = _backbone("tiny-animatediff")
    backbone.grad_decode_frames = 1
    policy = Policy(backbone, sampler, rank=4)
    reward = build_reward([RewardSettings("per_frame", args={"reward": "shapes_color_soft"})])
    sample = SampleSettings(num_steps=2, eta=1.0, guidance_scale=5.0, batch_size=2)
    strategy = DRaFT(DRaFTConfig(k=1, gradient_checkpointing=False), policy, reward, sample)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-2, weight_decay=0.0)
    decoded = []
    hook = backbone.vae.decoder.register_forward_hook(
        lambda m, i, o: decoded.append((torch.is_grad_enabled(), i[0].shape[0]))
    )
    prompts = [PROMPTS[0]] * 2
    rewards_seen = []
    for epoch in range(4):
        batch = strategy.collect(prompts, torch.Generator().manual_seed(epoch))
        rewards_seen.append(batch["reward"].mean().item())
        for step in strategy.plan(batch, 2, 2, torch.Generator().manual_seed(epoch)):
            optimizer.zero_grad()
            for micro in step:
                loss, _ = strategy.loss(micro)
                (loss * micro["weight"]).backward()
            optimizer.step()
    hook.remove()
    assert {n for grad, n in decoded if grad} == {2}  # backprop decodes: 1 frame x 2 videos
    assert {n for grad, n in decoded if not grad} == {8}  # collection decodes: 4 frames x 2 videos
    assert rewards_seen[-1] > rewards_seen[0] + 0.01, rewards_seen
