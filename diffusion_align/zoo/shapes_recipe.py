"""Train the bundled shapes world from scratch: VAE, then CLIP, then the text-conditioned UNet.

`build(out_dir, RecipeConfig())` writes `pipeline/` (a StableDiffusionPipeline folder), `clip/` (a
CLIPModel folder with its processor) and `train_log.jsonl`. Every component is seeded and trained for a
fixed number of steps, so a CPU run is reproducible for a given thread count; `minutes` is only a safety
cap (a run that hits it says so in the log and is no longer step-for-step reproducible). One file, a little
over 300 lines: the three trainings and the save are one recipe, read top to bottom.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffusion_align.zoo import shapes_data as data
from diffusion_align.zoo import shapes_models as models
from rewards.shapes import BACKGROUNDS, COUNTS, POSITIONS_ALL, SHAPE_COLORS, SHAPES, SIZES, Scene, is_valid
from rewards.tokenizers import clip_tokenizer, write_clip_tokenizer_files


@dataclass
class RecipeConfig:
    seed: int = 0
    n_train: int = 16000  # training images (all three models see the same ones)
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    clip_steps: int = 2500
    clip_batch: int = 128
    clip_lr: float = 1e-3
    unet_steps: int = 3000
    unet_batch: int = 128
    unet_lr: float = 1e-3
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1  # fraction of captions replaced by "" so classifier-free guidance works
    minutes: float = 60.0  # safety cap on the whole run
    threads: int = 2


class TrainLog:
    """JSON-lines training log plus a wall-clock budget shared by the stages."""

    def __init__(self, path: Path, minutes: float):
        self.file = open(path, "a")
        self.t0 = time.time()
        self.deadline = self.t0 + 60 * minutes

    def __call__(self, **record):
        record["elapsed_s"] = round(time.time() - self.t0, 1)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def start_stage(self, share: float):
        # A stage may use `share` of the whole budget, and never past the overall deadline.
        self.stage_deadline = min(self.deadline, time.time() + share * (self.deadline - self.t0))

    def out_of_time(self, stage: str, step: int) -> bool:
        if time.time() < self.stage_deadline:
            return False
        self(
            stage=stage, event="stopped early by the time cap (the run is no longer reproducible)", step=step
        )
        return True


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cosine_lr(step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(images: torch.Tensor, cfg: RecipeConfig, log: TrainLog):
    """images: (N, 3, 32, 32) in [0, 1]. MSE + a tiny KL term (SD's 1e-6 weight); scaling from the data."""
    seed_everything(cfg.seed + 1)
    vae = models.build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, cfg.vae_steps))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    log.start_stage(0.15)
    for step in (bar := tqdm(range(cfg.vae_steps), desc="vae")):
        x = images[torch.randint(len(images), (cfg.vae_batch,), generator=gen)] * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        mse = F.mse_loss(rec, x)
        loss = mse + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == cfg.vae_steps - 1:
            bar.set_postfix(mse=f"{mse.item():.4f}")
            log(stage="vae", step=step, mse=mse.item())
        if log.out_of_time("vae", step):
            break
    vae.eval()
    with torch.no_grad():
        lat = torch.cat(
            [vae.encode(images[i : i + 256] * 2 - 1).latent_dist.mean for i in range(0, len(images), 256)]
        )
    # Like SD's 0.18215: scale latents to unit variance for the diffusion model.
    scaling = float(1.0 / lat.std())
    vae.register_to_config(scaling_factor=scaling)
    log(stage="vae", event="done", scaling_factor=scaling)
    return vae


def _perturb(scene: Scene, rng: random.Random) -> Scene:
    """The same scene with exactly one attribute changed: a hard negative caption for CLIP."""
    choices = dict(
        count=COUNTS, size=SIZES, color=tuple(SHAPE_COLORS), shape=SHAPES, position=POSITIONS_ALL,
        background=tuple(BACKGROUNDS),
    )  # fmt: skip
    while True:
        key = rng.choice(sorted(choices))
        value = rng.choice([v for v in choices[key] if v != getattr(scene, key)])
        new = Scene(**{**scene.as_dict(), key: value})
        if is_valid(new):
            return new


def _clip_pixels(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(models.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(models.CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def train_clip(images: torch.Tensor, scenes: list[Scene], cfg: RecipeConfig, log: TrainLog):
    """Contrastive training with, per image, one hard-negative caption that differs in one attribute."""
    seed_everything(cfg.seed + 2)
    tok = clip_tokenizer()
    clip = models.build_clip()
    opt = torch.optim.AdamW(clip.parameters(), lr=cfg.clip_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, cfg.clip_steps))
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    rng = random.Random(cfg.seed + 2)
    log.start_stage(0.2)
    for step in (bar := tqdm(range(cfg.clip_steps), desc="clip")):
        idx = torch.randint(len(images), (cfg.clip_batch,), generator=gen)
        pos = [scenes[i].caption() for i in idx]
        texts = pos + [_perturb(scenes[i], rng).caption() for i in idx]
        t = tok(texts, padding=True, return_tensors="pt")
        img = F.normalize(
            clip.get_image_features(pixel_values=_clip_pixels(images[idx])).pooler_output, dim=-1
        )
        txt = F.normalize(clip.get_text_features(**t).pooler_output, dim=-1)
        scale = clip.logit_scale.exp().clamp(max=100)
        logits = scale * img @ txt.T  # (B, 2B)
        # Identical captions are all positives (soft targets), wherever they occur among the 2B texts.
        same = torch.tensor([[a == b for b in texts] for a in pos], dtype=torch.float32)
        loss_i = -(same / same.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
        same_t = same[:, : len(pos)]
        loss_t = -(same_t / same_t.sum(0, keepdim=True) * logits[:, : len(pos)].log_softmax(0)).sum(0).mean()
        loss = (loss_i + loss_t) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == cfg.clip_steps - 1:
            acc = (logits.argmax(1) == torch.arange(len(pos))).float().mean().item()
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
            log(stage="clip", step=step, loss=loss.item(), batch_top1=acc, logit_scale=scale.item())
        if log.out_of_time("clip", step):
            break
    clip.eval()
    log(stage="clip", event="done")
    return clip


def text_encoder_from_clip(clip):
    from transformers import CLIPTextModel

    te = CLIPTextModel(clip.config.text_config)
    # transformers 4 wraps the transformer in `.text_model`; 5 does not.
    getattr(te, "text_model", te).load_state_dict(clip.text_model.state_dict())
    return te.eval()


@torch.no_grad()
def encode_prompts(text_encoder, tok, prompts: list[str]) -> torch.Tensor:
    """(N, 77, width) last hidden states, tokenized exactly as StableDiffusionPipeline does."""
    ids = tok(
        prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    )
    return text_encoder(ids.input_ids)[0]


def train_unet(
    images: torch.Tensor, scenes: list[Scene], vae, text_encoder, cfg: RecipeConfig, log: TrainLog
):
    """Epsilon-prediction on the SD 1.5 noise schedule, caption dropout for CFG, EMA weights returned."""
    seed_everything(cfg.seed + 3)
    tok = clip_tokenizer()
    captions = sorted({s.caption() for s in scenes})
    emb = encode_prompts(text_encoder, tok, ["", *captions])  # row 0: the unconditional prompt
    row = {c: i + 1 for i, c in enumerate(captions)}
    cap_idx = torch.tensor([row[s.caption()] for s in scenes])
    with torch.no_grad():
        dists = [vae.encode(images[i : i + 256] * 2 - 1).latent_dist for i in range(0, len(images), 256)]
    mean, std = torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])
    sf = vae.config.scaling_factor
    unet = models.build_unet()
    ema = [p.detach().clone() for p in unet.parameters()]
    noise_sched = models.build_scheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, cfg.unet_steps, warmup=200))
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    log.start_stage(0.6)
    for step in (bar := tqdm(range(cfg.unet_steps), desc="unet")):
        idx = torch.randint(len(images), (cfg.unet_batch,), generator=gen)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * sf
        eps = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=gen)
        drop = torch.rand(len(idx), generator=gen) < cfg.cfg_dropout
        cond = emb[torch.where(drop, 0, cap_idx[idx])]
        pred = unet(noise_sched.add_noise(z0, eps, t), t, cond).sample
        loss = F.mse_loss(pred, eps)
        if denoiser_step(unet, loss, opt, sched, ema, cfg.ema_decay, step, bar, log, "unet", cfg.unet_steps):
            break
    return ema_weights(unet, ema, log, "unet")


def denoiser_step(model, loss, opt, sched, ema, ema_decay, step, bar, log, stage, steps) -> bool:
    """One optimizer step of a denoiser (grad clip 1), its EMA update (warm-up decay) and the log; True when
    the time cap stops the stage."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    decay = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema, model.parameters(), strict=True):
            e.lerp_(p.detach(), 1 - decay)
    if step % 50 == 0 or step == steps - 1:
        bar.set_postfix(loss=f"{loss.item():.4f}")
        log(stage=stage, step=step, loss=loss.item())
    return log.out_of_time(stage, step)


def ema_weights(model, ema, log, stage):
    """The model with its EMA weights, in eval mode."""
    with torch.no_grad():
        for e, p in zip(ema, model.parameters(), strict=True):
            p.copy_(e)
    log(stage=stage, event="done")
    return model.eval()


def write_tokenizer(directory: Path, max_length: int = 77):
    # vocab.json + merges.txt load with every transformers version; the config pins the context length.
    write_clip_tokenizer_files(directory)
    cfg = {"model_max_length": max_length, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True}
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))


def save_artifacts(out: Path, vae, clip, unet) -> None:
    """Write `out/pipeline` (StableDiffusionPipeline, fp16 safetensors) and `out/clip` (CLIPModel, fp16)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder_from_clip(clip),
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=models.build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16)
    for sub in ("pipeline", "clip"):
        shutil.rmtree(out / sub, ignore_errors=True)
    pipe.save_pretrained(out / "pipeline", safe_serialization=True)
    shutil.rmtree(out / "pipeline" / "tokenizer")
    write_tokenizer(out / "pipeline" / "tokenizer")
    clip.half().save_pretrained(out / "clip", safe_serialization=True)
    models.clip_image_processor().save_pretrained(out / "clip")
    write_tokenizer(out / "clip")
    clip.float()


def build(out: str | Path, cfg: RecipeConfig) -> dict:
    """Generate the data, train the three models, save them under `out`; returns timings in seconds."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _build(Path(out), cfg)
    finally:  # leave the caller's process as it was (tests call this in-process)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _build(out: Path, cfg: RecipeConfig) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_log.jsonl").unlink(missing_ok=True)
    log = TrainLog(out / "train_log.jsonl", cfg.minutes)
    log(event="config", **asdict(cfg), torch=torch.__version__)
    times = {}
    t = time.time()
    train = data.make_split("train", cfg.n_train)
    times["data"] = time.time() - t
    log(stage="data", event="done", n_train=cfg.n_train, seconds=times["data"])
    t = time.time()
    vae = train_vae(train.images, cfg, log)
    times["vae"] = time.time() - t
    t = time.time()
    clip = train_clip(train.images, train.scenes, cfg, log)
    times["clip"] = time.time() - t
    t = time.time()
    unet = train_unet(train.images, train.scenes, vae, text_encoder_from_clip(clip), cfg, log)
    times["unet"] = time.time() - t
    save_artifacts(out, vae, clip, unet)
    times["total"] = time.time() - log.t0
    log(event="done", seconds={k: round(v, 1) for k, v in times.items()})
    return times
