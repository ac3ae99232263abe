"""Wan 2.1 text-to-video on a tiny real pipeline: our one loop with the flow ODE (noise level 0) gives
`WanPipeline`'s own videos (with the Euler flow scheduler, see engine/backbones/wan.py), a LoRA our policy
saves loads into plain diffusers and gives our policy's videos, the LoRA sits only on the targeted modules,
`diffusion-align sample` writes videos, and Flow-GRPO is exactly on-policy with a frame-lifted reward."""

import re

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

import rewards
from diffusion_align.cli import main
from diffusion_align.config.registry import build_sampler
from diffusion_align.config.settings import SampleSettings
from diffusion_align.engine.backbones import WanBackbone, load_backbone
from diffusion_align.engine.policy import Policy
from diffusion_align.engine.rollout import rollout
from diffusion_align.errors import UserError
from diffusion_align.math.flow_samplers import FlowMatchSampler
from diffusion_align.methods.strategies.ddpo import DDPO, FlowGRPOConfig
from diffusion_align.testing_flow import tiny_wan
from rewards.combine import Combined

PROMPTS = ["two small red circles on the left", "one large blue square!"]
TOLERANCE = 1e-4
SIZE, FRAMES = (32, 32), 5


pytestmark = pytest.mark.usefixtures("one_thread")


def _generators():
    return [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]


def _ours(backbone, steps, guidance, negative=None, latents=False):
    """Videos (or, `latents`, the final latents) of our rollout at noise level 0."""
    sampler = FlowMatchSampler(backbone.scheduler, schedule=lambda n: backbone.schedule(n, SIZE))
    embeds = backbone.encode_prompts(PROMPTS, negative, guidance=guidance > 1)
    x_T = backbone.initial_noise(len(PROMPTS), _generators(), SIZE, num_frames=FRAMES)
    with torch.no_grad():
        trajectory = rollout(backbone, sampler, embeds, x_T, steps, guidance, eta=0.0)
    return trajectory.x0 if latents else trajectory.images


def _pipeline(pipe, steps, guidance, negative=None, **extra):
    """`WanPipeline(...)` videos as (B, T, 3, H, W) in [0, 1] (output_type="latent" for its latents)."""
    extra.setdefault("output_type", "pt")
    if negative is not None:
        extra["negative_prompt"] = negative
    return pipe(
        PROMPTS,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=SIZE[0],
        width=SIZE[1],
        num_frames=FRAMES,
        generator=_generators(),
        **extra,
    ).frames


@pytest.mark.parametrize(
    "guidance,negative", [(1.0, None), (5.0, None), (5.0, "blurry, static")], ids=["no-cfg", "cfg", "neg"]
)
def test_wan_rollout_reproduces_the_pipeline(guidance, negative):
    """Latents and videos (the tiny random VAE is nearly flat, so the latents are the sharp check)."""
    backbone = WanBackbone(tiny_wan())
    ours = _ours(backbone, 4, guidance, negative, latents=True)
    theirs = _pipeline(tiny_wan(), 4, guidance, negative, output_type="latent")
    assert ours.shape == theirs.shape == (2, 16, 2, 4, 4)
    assert (ours - theirs).abs().max() <= TOLERANCE
    ours = _ours(backbone, 4, guidance, negative)
    theirs = _pipeline(tiny_wan(), 4, guidance, negative)
    assert ours.shape == theirs.shape == (2, FRAMES, 3, *SIZE)
    assert theirs.std() > 0.01  # not a flat video
    assert (ours - theirs).abs().max() <= TOLERANCE


def test_wan_guidance_changes_the_video():
    backbone = WanBackbone(tiny_wan())
    assert (_ours(backbone, 2, 1.0, latents=True) - _ours(backbone, 2, 5.0, latents=True)).abs().max() > 1e-2


def test_unipc_checkpoint_samples_on_the_euler_scheduler_with_its_flow_shift():
    """The real checkpoints' UniPC scheduler (flow_shift 3): our sampler runs the Euler flow ODE with
    shift 3, so its videos equal the pipeline's with `FlowMatchEulerDiscreteScheduler(shift=3)` swapped in."""
    pipe = tiny_wan()
    pipe.scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
    )
    backbone = WanBackbone(pipe)
    assert isinstance(backbone.scheduler, FlowMatchEulerDiscreteScheduler)
    assert backbone.scheduler.config.shift == 3.0 and not backbone.scheduler.config.use_dynamic_shifting
    euler = tiny_wan()
    euler.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    ours = _ours(backbone, 3, 5.0, latents=True)
    assert (ours - _pipeline(euler, 3, 5.0, output_type="latent")).abs().max() <= TOLERANCE
    pipe.scheduler = UniPCMultistepScheduler(prediction_type="epsilon")
    with pytest.raises(UserError, match="not a flow scheduler"):
        WanBackbone(pipe)


def test_wan_parts_match_the_pipeline():
    pipe = tiny_wan()
    backbone = WanBackbone(pipe)
    embeds = backbone.encode_prompts(PROMPTS, "blurry", guidance=True)
    cond, uncond = pipe.encode_prompt(
        PROMPTS, ["blurry"] * 2, do_classifier_free_guidance=True, max_sequence_length=512
    )
    assert torch.equal(embeds.cond, cond) and torch.equal(embeds.uncond, uncond)
    assert embeds.cond.shape == (2, 512, 32)
    for frames, latent_frames in [(5, 2), (9, 3), (1, 1), (81, 21)]:
        assert backbone.latent_shape(2, (48, 32), num_frames=frames) == (2, 16, latent_frames, 6, 4)
        drawn = pipe.prepare_latents(2, 16, 48, 32, frames, torch.float32, "cpu", _generators())
        x_T = backbone.initial_noise(2, _generators(), (48, 32), num_frames=frames)
        assert torch.equal(x_T, drawn)
    assert backbone.schedule(4, SIZE) == {}
    assert backbone.is_video and backbone.default_size() == SIZE and backbone.num_frames == FRAMES


def test_decode_is_the_pipeline_decode_and_encode_inverts_the_normalisation():
    pipe = tiny_wan()
    backbone = WanBackbone(pipe)
    latents = torch.randn(2, 16, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    theirs = pipe(PROMPTS, num_inference_steps=1, latents=latents, output_type="latent").frames
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, 16, 1, 1, 1)
    pixels = pipe.vae.decode(theirs * std + mean).sample  # (B, 3, T, H, W) in [-1, 1]
    expected = (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)
    ours = backbone.decode(theirs)
    assert ours.shape == (2, FRAMES, 3, *SIZE)
    assert (ours - expected).abs().max() <= 1e-5
    assert torch.equal(backbone.decode(theirs, frames=[0, 4]), ours[:, [0, 4]])
    z = backbone.encode(ours, torch.Generator().manual_seed(6))
    posterior = pipe.vae.encode(ours.permute(0, 2, 1, 3, 4) * 2 - 1).latent_dist
    raw = posterior.sample(torch.Generator().manual_seed(6))
    assert z.shape == (2, 16, 2, 4, 4)
    assert torch.allclose(z, (raw - mean) / std, atol=1e-5)


def test_saved_lora_loads_into_diffusers_and_reproduces_the_policy(tmp_path):
    backbone = load_backbone("tiny-wan", device="cpu")
    policy = Policy(backbone, FlowMatchSampler(backbone.scheduler), rank=2)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: B != 0, so the LoRA changes the output
        for p in policy.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    ours = _ours(backbone, 3, 5.0, latents=True)
    videos = _ours(backbone, 3, 5.0)
    with policy.reference():
        base = _ours(backbone, 3, 5.0, latents=True)
    policy.save_lora(tmp_path / "lora")

    pipe = tiny_wan()
    pipe.load_lora_weights(str(tmp_path / "lora"))
    assert (ours - base).abs().max() > 1e-2
    assert (ours - _pipeline(pipe, 3, 5.0, output_type="latent")).abs().max() <= TOLERANCE
    assert (videos - _pipeline(pipe, 3, 5.0)).abs().max() <= TOLERANCE

    reloaded = Policy(load_backbone("tiny-wan", device="cpu"), None, rank=2)
    reloaded.load_lora(tmp_path / "lora")
    for (n, a), (_, b) in zip(policy.named_parameters(), reloaded.named_parameters(), strict=True):
        assert torch.equal(a, b), n


def test_lora_only_on_targeted_modules_and_the_base_frozen():
    backbone = load_backbone("tiny-wan", device="cpu")
    policy = Policy(backbone, None, rank=2)
    adapted = {re.sub(r"\.lora_[AB]\.default\.weight$", "", n) for n, _ in policy.named_parameters()}
    # every block's self- (attn1) and cross-attention (attn2) projections, nothing else
    expected = {
        f"blocks.{i}.{attn}.{proj}"
        for i in range(2)
        for attn in ("attn1", "attn2")
        for proj in ("to_q", "to_k", "to_v", "to_out.0")
    }
    assert adapted == expected
    trainable = {id(p) for p in policy.parameters()}
    for module in backbone.frozen_modules():
        for n, p in module.named_parameters():
            assert p.requires_grad == (id(p) in trainable), n
    assert not any(
        p.requires_grad for m in (backbone.pipe.text_encoder, backbone.vae) for p in m.parameters()
    )


def test_sample_command_writes_the_pipeline_video(tmp_path):
    argv = [
        "--model",
        "tiny-wan",
        "--prompt",
        PROMPTS[0],
        "--num-steps",
        "3",
        "--eta",
        "0",
        "--guidance",
        "5",
    ]
    assert main(["sample", *argv, "--out", str(tmp_path)]) == 0
    (video,) = (tmp_path / "videos").glob("0000_*.mp4")
    assert video.stat().st_size > 0 and list((tmp_path / "videos").glob("0000_*.gif"))
    (image,) = (tmp_path / "images").glob("0000_*.png")  # the first frame
    import numpy as np
    from PIL import Image

    first = np.asarray(Image.open(image), "float32")
    theirs = tiny_wan()(
        PROMPTS[0],
        num_inference_steps=3,
        guidance_scale=5.0,
        height=32,
        width=32,
        num_frames=5,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).frames[0, 0]
    assert first.shape == (32, 32, 3)
    assert np.abs(first - theirs.permute(1, 2, 0).numpy() * 255).max() <= 1


def test_loads_from_a_pipeline_folder(tmp_path):
    tiny_wan().save_pretrained(tmp_path / "model")
    backbone = load_backbone(str(tmp_path / "model"), device="cpu")
    assert type(backbone) is WanBackbone
    ours = backbone.encode_prompts(PROMPTS, guidance=False).cond
    assert torch.equal(
        ours, load_backbone("tiny-wan", device="cpu").encode_prompts(PROMPTS, guidance=False).cond
    )


@pytest.mark.parametrize("source", ["folder", "built-in"])
def test_at_bfloat16_the_vae_stays_float32_with_its_saved_weights(source, tmp_path):
    """The transformer and text encoder take model.dtype; the VAE loads and stays in float32, its weights
    the saved ones bit for bit (not a round trip through bfloat16), and a bfloat16 latent decodes in it."""
    tiny_wan().save_pretrained(tmp_path / "model")
    name = str(tmp_path / "model") if source == "folder" else "tiny-wan"
    backbone = load_backbone(name, dtype="bfloat16", device="cpu")
    assert backbone.unet.dtype == backbone.pipe.text_encoder.dtype == torch.bfloat16
    assert backbone.vae.dtype == torch.float32
    saved = tiny_wan().vae.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in backbone.vae.state_dict().items())
    latents = torch.randn(1, 16, 2, 4, 4, dtype=torch.bfloat16)
    video = backbone.decode(latents)
    assert video.dtype == torch.float32 and torch.isfinite(video).all()
    encoded = backbone.encode(video, torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed-precision training: the VAE still in float32
        assert torch.equal(backbone.decode(latents), video)
        assert torch.equal(backbone.encode(video, torch.Generator().manual_seed(0)), encoded)


def test_flow_grpo_ratio_is_exactly_one_on_policy_with_a_frame_lifted_reward():
    sample = SampleSettings(num_steps=3, eta=0.7, guidance_scale=4.5, batch_size=4)
    backbone = load_backbone("tiny-wan")
    policy = Policy(backbone, build_sampler(backbone, sample), rank=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    reward = Combined({"soft": rewards.per_frame(rewards.build("shapes_color_soft"), "fml")})
    strategy = DDPO(FlowGRPOConfig(group_size=2, beta=0.01), policy, reward, sample)
    shapes = [
        "two small red circles on the left on a black background",
        "one large blue square on a gray background",
    ]
    batch = strategy.collect(shapes * 2, [torch.Generator().manual_seed(i) for i in range(4)])
    assert batch["log_probs"].shape == (4, 3) and batch["latents"].shape[2:] == (16, 2, 4, 4)
    for micro in strategy.plan(batch, 4, 2, torch.Generator().manual_seed(1))[0]:
        loss, metrics = strategy.loss(micro)
        assert metrics["ratio_max_deviation"] < 1e-6 and metrics["clip_fraction"] == 0.0
        loss.backward()
    transformer = backbone.unet
    with_grad = {n for n, p in transformer.named_parameters() if p.grad is not None}
    assert with_grad and all("lora" in n for n in with_grad)


def test_decoding_a_subset_of_latent_frames_is_not_exact():
    """Why `decode` always decodes every frame: the causal VAE's later frames depend on earlier latents."""
    backbone = WanBackbone(tiny_wan())
    latents = 3 * torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = backbone.decode(latents)  # 5 frames: latent frame 0 -> frame 0, latent frame 1 -> frames 1-4
        alone = backbone.decode(latents[:, :, 1:])  # latent frame 1 decoded as a first frame: 1 frame
    assert full.shape[1] == FRAMES and alone.shape[1] == 1
    assert (alone[:, 0] - full[:, 1]).abs().max() > 1e-4
