"""ReNO (Eyring et al. 2024): reward-based noise optimisation of a one-step or few-step model.

The prompt and the step-noise seed stay fixed; only the initial noise z (1, C, h, w) is optimised:

    loss(z) = -sum_k w_k r_k(G(z)) + lambda * (0.5 * |z|^2 - (d - 1) * log|z|)

The second term is the negative log-likelihood of the chi_d distribution of the norm of a d-dimensional
standard Gaussian (up to a constant), so |z| is kept near its mode sqrt(d - 1); lambda = 0.01, computed in
float32. ReNO writes each reward as a loss (HPS 1 - cos, CLIP 100 - logit, ...); a constant minus the
reward has the same gradient, so we maximise the weighted rewards directly and the default weights below
are ReNO's. SGD with Nesterov momentum 0.9, lr 5, gradient-norm clipping at 0.1, 50 iterations, no step
after the last evaluation. The returned image is the best by weighted reward alone (no regulariser).

    from diffusion_align.methods.reno import reno
    result = reno(backbone, {"hpsv2": hps, "imagereward": ir}, "a cat", weights={"hpsv2": 5.0})
    result.best_image, result.best_noise, result.history
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusion_align.engine.few_step import draw_noise, make_generator
from diffusion_align.errors import UserError
from rewards.combine import Combined

# ReNO's reward weights (its losses, rewritten on our reward scales: HPS cosine, CLIP 100*cos,
# PickScore logit, ImageReward score); other rewards default to 1. Aesthetic is 0 in ReNO (off).
RENO_DEFAULT_WEIGHTS = {"hpsv2": 5.0, "imagereward": 1.0, "clip": 0.01, "pickscore": 0.05}
STRIP_LENGTH = 8  # images kept for the strip across iterations (first, evenly spaced, last)


def chi_regulariser(z: Tensor) -> Tensor:
    """0.5 * |z|^2 - (d - 1) * log|z| per sample, z (B, ...) -> (B,) float32; minimum at |z| = sqrt(d - 1)."""
    z = z.float().flatten(1)
    d, norm = z.shape[1], z.norm(dim=1)
    return 0.5 * norm**2 - (d - 1) * torch.log(norm)


def reno_reward(reward, weights: Mapping[str, float] | None = None) -> Combined:
    """A reward module, {name: module} or a `Combined` -> one `Combined`; weights default to ReNO's."""
    if isinstance(reward, Combined):
        if weights:
            raise UserError("weights go into the Combined reward itself; pass weights=None with a Combined")
        return reward
    rewards = dict(reward) if isinstance(reward, Mapping) else {getattr(reward, "name", "reward"): reward}
    weights = dict(weights or {})
    unknown = set(weights) - set(rewards)
    if unknown:
        raise UserError(f"weights given for unknown rewards {sorted(unknown)}; rewards are {sorted(rewards)}")
    return Combined(rewards, {n: float(weights.get(n, RENO_DEFAULT_WEIGHTS.get(n, 1.0))) for n in rewards})


def require_differentiable(reward: Combined) -> None:
    if reward.non_differentiable:
        name = reward.non_differentiable[0]
        raise UserError(
            f"reward {name!r} is not differentiable, so ReNO cannot optimise the noise "
            "against it; use a differentiable reward (e.g. hpsv2, imagereward, clip, pickscore, "
            "shapes_color_soft) or best-of-N search (diffusion_align.methods.search.best_of_n)"
        )


@dataclass
class RenoResult:
    """best_image: (3, H, W) in [0, 1]; best_noise: (1, C, h, w) float32; best_reward: weighted total;
    history: one dict per iteration (reward, rewards, regulariser, loss, grad_norm, z_norm);
    strip: (K, 3, H, W) images at `strip_iterations`; regenerated: the best noise through the multi-step
    model, (3, H, W), with its scores in `regenerated_rewards`."""

    best_image: Tensor
    best_noise: Tensor
    best_reward: float
    best_iteration: int
    initial_reward: float
    history: list[dict]
    strip: Tensor
    strip_iterations: list[int]
    reward_calls: int
    regenerated: Tensor | None = None
    regenerated_rewards: dict = field(default_factory=dict)


def _optimizer(name: str, params, lr: float, momentum: float):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, eps=1e-2)  # ReNO's Adam eps
    raise UserError(f"optimizer {name!r}: choose sgd or adam")


def reno(
    backbone,
    reward,
    prompt: str,
    weights: Mapping[str, float] | None = None,
    iterations: int = 50,
    lr: float = 5.0,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    grad_clip: float = 0.1,
    reg_weight: float = 0.01,
    num_steps: int = 1,
    guidance_scale: float = 0.0,
    seed: int = 0,
    scheduler: str = "auto",
    negative_prompt: str | None = None,
    size: tuple[int, int] | None = None,
    checkpoint: bool = False,
    regenerate_steps: int | None = None,
    regenerate_backbone=None,
    progress: bool = True,
) -> RenoResult:
    """Optimise the initial noise of `backbone` for `prompt` against `reward` (a module, {name: module} or a
    `rewards.Combined`; see `reno_reward`).

    iterations: number of images generated and scored (= reward calls); an optimiser step follows every one
    but the last. num_steps/guidance_scale/scheduler: the few-step generator (see `few_step.make_generator`).
    regenerate_steps: also render the best noise with that many steps (of `regenerate_backbone`, default the
    same model) and score it. Deterministic for a seed (z and step noise come from CPU generators).
    """
    reward = reno_reward(reward, weights)
    require_differentiable(reward)
    if iterations < 1:
        raise UserError(f"iterations must be at least 1, got {iterations}")
    generate = make_generator(backbone, num_steps, guidance_scale, scheduler, checkpoint, size=size)
    embeds = backbone.encode_prompts([prompt], negative_prompt, guidance=guidance_scale > 1, size=size)
    z = torch.nn.Parameter(draw_noise(backbone, [seed], size))
    opt = _optimizer(optimizer, [z], lr, momentum)
    keep = sorted({round(i * (iterations - 1) / max(1, STRIP_LENGTH - 1)) for i in range(STRIP_LENGTH)})
    history, strip = [], []
    best = (-math.inf, -1, None, None)  # reward, iteration, image, noise
    for it in tqdm(range(iterations), desc="reno", disable=not progress):
        opt.zero_grad(set_to_none=True)
        images = generate(z, embeds, [seed])
        total, parts = reward.score(images, [prompt])  # keeps the gradient to the images
        reg = reg_weight * chi_regulariser(z)
        loss = (-total + reg).sum()
        value = float(total.detach().sum())
        if math.isfinite(value) and value > best[0]:
            best = (value, it, images[0].detach().float().cpu(), z.detach().clone())
        if it in keep:
            strip.append(images[0].detach().float().cpu())
        row = {
            "iteration": it,
            "reward": value,
            "rewards": {n: float(p.detach().sum()) for n, p in parts.items()},
            "regulariser": float(reg.detach().sum()),
            "loss": float(loss.detach()),
            "z_norm": float(z.detach().float().norm()),
            "grad_norm": None,
        }
        if it < iterations - 1 and torch.isfinite(loss):  # no step after the last evaluation (ReNO)
            loss.backward()
            row["grad_norm"] = float(torch.nn.utils.clip_grad_norm_([z], grad_clip))
            opt.step()
        history.append(row)
        del images, total, parts, loss
    if best[2] is None:
        raise UserError("every ReNO iteration gave a non-finite reward; try a lower --lr or float32")
    result = RenoResult(
        best_image=best[2],
        best_noise=best[3],
        best_reward=best[0],
        best_iteration=best[1],
        initial_reward=history[0]["reward"],
        history=history,
        strip=torch.stack(strip),
        strip_iterations=keep,
        reward_calls=iterations,
    )
    if regenerate_steps:
        result.regenerated, result.regenerated_rewards = regenerate(
            regenerate_backbone or backbone, reward, prompt, result.best_noise, seed,
            regenerate_steps, guidance_scale, scheduler if regenerate_backbone is None else "auto",
            negative_prompt, size,
        )  # fmt: skip
    return result


@torch.no_grad()
def regenerate(backbone, reward, prompt, z, seed, num_steps, guidance_scale, scheduler, negative, size):
    """The noise z through a multi-step model; returns ((3, H, W) image, {name: score, "total": total})."""
    generate = make_generator(backbone, num_steps, guidance_scale, scheduler, size=size)
    embeds = backbone.encode_prompts([prompt], negative, guidance=guidance_scale > 1, size=size)
    image = generate(z.to(backbone.device), embeds, [seed])
    total, parts = reward.score(image, [prompt])
    return image[0].float().cpu(), {
        **{n: float(p.sum()) for n, p in parts.items()},
        "total": float(total.sum()),
    }
