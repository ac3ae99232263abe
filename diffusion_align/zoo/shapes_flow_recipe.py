"""Train `shapes-flow`: the shapes world as an SD3-style flow model, on the bundled shapes VAE and CLIP.

Only the transformer is trained; the VAE (given SD3's `shift_factor`, 0 here) and the CLIP text tower (loaded
twice, as SD3's two CLIP encoders) come from the bundled `shapes` models, so both models share one image and
text space and the detector and `shapes-clip` judge them alike. There is no T5: the SD3 pipeline feeds
`max_sequence_length` zero rows in its place, and the model is trained with `FLOW_T5_TOKENS` of them (the
length is part of the model; the card says so). Rectified flow as SD3 trains it: x_t = (1 - s) x_0 + s e,
velocity target e - x_0, s logit-normal and shifted as the sampler's schedule is, captions dropped to "" for
classifier-free guidance, EMA weights saved. Seeded and step-counted like `shapes_recipe`.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffusion_align.zoo import shapes_data as data
from diffusion_align.zoo import shapes_models as models
from diffusion_align.zoo.shapes_recipe import (
    TrainLog,
    cosine_lr,
    denoiser_step,
    ema_weights,
    seed_everything,
    write_tokenizer,
)


@dataclass
class FlowRecipeConfig:
    seed: int = 0
    n_train: int = 16000  # the shapes model's training images
    steps: int = 6000
    batch: int = 128
    lr: float = 1e-3
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1  # captions replaced by "" so classifier-free guidance works
    minutes: float = 60.0  # safety cap on the run
    threads: int = 2


def text_encoder_with_projection(clip):
    """The CLIP text tower and its projection as SD3's `CLIPTextModelWithProjection` (same weights)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        **{**clip.config.text_config.to_dict(), "projection_dim": clip.config.projection_dim}
    )
    encoder = CLIPTextModelWithProjection(config)
    encoder.text_model.load_state_dict(clip.text_model.state_dict())
    encoder.text_projection.load_state_dict(clip.text_projection.state_dict())
    return encoder.eval()


def assemble_pipeline(shapes: Path):
    """A `StableDiffusion3Pipeline` of the shapes VAE and CLIP text tower (twice) from the `shapes` build
    folder around a fresh transformer; fp32."""
    from diffusers import AutoencoderKL, StableDiffusion3Pipeline
    from transformers import CLIPModel

    from rewards.tokenizers import clip_tokenizer

    vae = AutoencoderKL.from_pretrained(shapes / "pipeline" / "vae", dtype=torch.float32)
    vae.register_to_config(shift_factor=0.0)  # SD3's decode adds it; the shapes latents are centred already
    clip = CLIPModel.from_pretrained(shapes / "clip", dtype=torch.float32)
    tokenizer = clip_tokenizer()
    tokenizer.model_max_length = models.FLOW_CLIP_TOKENS
    pipe = StableDiffusion3Pipeline(
        transformer=models.build_flow_transformer(),
        scheduler=models.build_flow_scheduler(),
        vae=vae.eval(),
        text_encoder=text_encoder_with_projection(clip),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_with_projection(clip),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def _caption_embeddings(pipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L, D) states and (N, P) pooled exactly as the pipeline computes them at sampling time."""
    states, _, pooled, _ = pipe.encode_prompt(
        prompt=captions,
        prompt_2=None,
        prompt_3=None,
        do_classifier_free_guidance=False,
        max_sequence_length=models.FLOW_T5_TOKENS,
        device=torch.device("cpu"),
    )
    return states, pooled


def _training_sigmas(n: int, shift: float, gen: torch.Generator) -> torch.Tensor:
    # SD3's logit-normal density, shifted as the scheduler shifts its sampling sigmas.
    s = torch.sigmoid(torch.randn(n, generator=gen))
    return shift * s / (1 + (shift - 1) * s)


def train_transformer(pipe, cfg: FlowRecipeConfig, log: TrainLog):
    train = data.make_split("train", cfg.n_train)
    captions = sorted({s.caption() for s in train.scenes})
    states, pooled = _caption_embeddings(pipe, ["", *captions])  # row 0: the unconditional prompt
    row = {c: i + 1 for i, c in enumerate(captions)}
    cap_idx = torch.tensor([row[s.caption()] for s in train.scenes])
    with torch.no_grad():
        dists = [
            pipe.vae.encode(train.images[i : i + 256] * 2 - 1).latent_dist for i in range(0, cfg.n_train, 256)
        ]
    mean, std = torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])
    scale, shift = pipe.vae.config.scaling_factor, pipe.scheduler.config.shift
    log(stage="data", event="encoded", n_train=cfg.n_train, captions=len(captions))

    seed_everything(cfg.seed + 4)
    model = pipe.transformer.train()
    ema = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, cfg.steps, warmup=200))
    gen = torch.Generator().manual_seed(cfg.seed + 4)
    log.start_stage(1.0)
    for step in (bar := tqdm(range(cfg.steps), desc="transformer")):
        idx = torch.randint(cfg.n_train, (cfg.batch,), generator=gen)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        noise = torch.randn(x0.shape, generator=gen)
        sigma = _training_sigmas(cfg.batch, shift, gen)
        drop = torch.rand(cfg.batch, generator=gen) < cfg.cfg_dropout
        rows = torch.where(drop, 0, cap_idx[idx])
        s = sigma.view(-1, 1, 1, 1)
        velocity = model(
            hidden_states=(1 - s) * x0 + s * noise,
            timestep=sigma * 1000,
            encoder_hidden_states=states[rows],
            pooled_projections=pooled[rows],
            return_dict=False,
        )[0]
        loss = F.mse_loss(velocity, noise - x0)
        if denoiser_step(
            model, loss, opt, sched, ema, cfg.ema_decay, step, bar, log, "transformer", cfg.steps
        ):
            break
    return ema_weights(model, ema, log, "transformer")


def save_pipeline(pipe, out: Path) -> None:
    """`out/pipeline`: the StableDiffusion3Pipeline folder in fp16 safetensors, 16-token tokenizers."""
    shutil.rmtree(out / "pipeline", ignore_errors=True)
    pipe.to(torch.float16).save_pretrained(out / "pipeline", safe_serialization=True)
    pipe.to(torch.float32)
    for name in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(out / "pipeline" / name)
        write_tokenizer(out / "pipeline" / name, models.FLOW_CLIP_TOKENS)


def build(out: str | Path, shapes: str | Path, cfg: FlowRecipeConfig) -> dict:
    """Train the transformer on the shapes world around the `shapes` build folder's VAE and CLIP; write
    `out/pipeline` and `out/train_log.jsonl`; returns timings in seconds."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_log.jsonl").unlink(missing_ok=True)
    log = TrainLog(out / "train_log.jsonl", cfg.minutes)
    try:
        log(event="config", **asdict(cfg), torch=torch.__version__, shapes=str(shapes))
        seed_everything(cfg.seed + 4)  # the transformer's initialisation (built with the pipeline)
        pipe = assemble_pipeline(Path(shapes))
        train_transformer(pipe, cfg, log)
        save_pipeline(pipe, out)
        seconds = {"total": time.time() - log.t0}
        log(event="done", seconds=round(seconds["total"], 1))
        return seconds
    finally:  # leave the caller's process as it was (tests call this in-process)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
