"""Where does a Diffusion-DPO step point? Gradient cosines and error gaps on one collected batch of pairs.

    OMP_NUM_THREADS=1 python benchmarks/dpo_signal.py configs/cpu/dpo_online_shapes.yaml [key=value ...]

Builds the recipe's run (nothing trained), nudges the LoRA off its zero start (so every LoRA weight has a
gradient), collects one epoch's pairs twice (independent batches A and B), and on each computes, with the
strategy's own (t, noise) draws:
- g_w, g_l: gradients of the mean denoising error on the winners and on the losers,
- g_dpo: the gradient of the strategy's loss (at the reference point it is c * (g_w - g_l)),
and prints their norms and cosines, the cosine of each between A and B (how repeatable the direction is at
this batch size), and the winner - loser reward gap of the pairs. An SFT step on the winners descends g_w;
DPO descends g_w - g_l: when cos(g_w, g_l) is near 1 the difference is a small remainder of two large,
nearly equal vectors, and its direction repeats across batches only if cos_AB(g_dpo) is clearly above 0.
"""

from __future__ import annotations

import sys

import torch

from diffusion_align.builder import build_run
from diffusion_align.config import load_config
from diffusion_align.methods.strategies.sampling import squared_error


def flat_grad(params, loss) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params, strict=True)]
    )


def cos(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def main() -> None:
    torch.set_num_threads(1)
    overrides = ["logging.progress=false", "logging.tensorboard=false", "output_dir=runs/dpo_signal"]
    settings = load_config(sys.argv[1], [*overrides, *sys.argv[2:]])
    run = build_run(settings, overwrite=True)
    strategy, policy = run.strategy, run.policy
    params = [p for p in policy.backbone.unet.parameters() if p.requires_grad]
    noise = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in params:
            p.add_(1e-3 * torch.randn(p.shape, generator=noise))
    n = settings.train.samples_per_epoch
    out = {}
    for name, seed in (("A", 1), ("B", 2)):
        g = torch.Generator().manual_seed(seed)
        prompts = [
            run.train_prompts[int(i)] for i in torch.randint(len(run.train_prompts), (n,), generator=g)
        ]
        batch = strategy.collect(prompts, torch.Generator().manual_seed(seed + 100))
        rows = torch.arange(len(batch["x0"]))
        x_t, t, target, embeds = strategy.noised_pairs(batch, rows)
        error = squared_error(policy.denoiser_output(x_t, t, embeds), target)
        p = len(rows)
        err_w, err_l = error[:p].mean().item(), error[p:].mean().item()
        g_w = flat_grad(params, error[:p].mean())
        error = squared_error(policy.denoiser_output(x_t, t, embeds), target)
        g_l = flat_grad(params, error[p:].mean())
        loss, _ = strategy.loss({"batch": batch, "pairs": rows})
        g_dpo = flat_grad(params, loss)
        reward = batch["reward"].view(-1, strategy.config.group_size)
        gap = (reward.max(1).values - reward.min(1).values).float()
        out[name] = (g_w, g_l, g_dpo)
        print(
            f"batch {name}: {p} rows, reward gap winner-loser mean {gap.mean():.3f} "
            f"median {gap.median():.3f}, denoising error winners {err_w:.4f} losers {err_l:.4f} "
            f"| |g_w| {g_w.norm():.4g} |g_l| {g_l.norm():.4g} |g_w-g_l| {(g_w - g_l).norm():.4g} "
            f"| cos(g_w,g_l) {cos(g_w, g_l):.3f} cos(g_dpo,g_w-g_l) {cos(g_dpo, g_w - g_l):.3f} "
            f"cos(g_dpo,g_w) {cos(g_dpo, g_w):.3f} cos(g_dpo,-g_l) {cos(g_dpo, -g_l):.3f}"
        )
    (aw, al, ad), (bw, bl, bd) = out["A"], out["B"]
    print(
        f"A vs B: cos(g_w) {cos(aw, bw):.3f} cos(g_l) {cos(al, bl):.3f} "
        f"cos(g_w-g_l) {cos(aw - al, bw - bl):.3f} "
        f"cos(g_dpo) {cos(ad, bd):.3f} | cross: cos(g_dpo A, g_w B) {cos(ad, bw):.3f} "
        f"cos(g_dpo B, g_w A) {cos(bd, aw):.3f}"
    )


if __name__ == "__main__":
    main()
