"""Reward backpropagation through the sampling chain: AlignProp (Prabhudesai et al.) and DRaFT (Clark et al.),
anchors §2.2. Both need a differentiable reward; the loss is -loss_scale * mean reward.

collect: a no-grad rollout per sample (its reward is the epoch's on-policy reward) storing every latent, plus
a per-sample seed for the noise of the re-run. loss: re-runs the gradient window from the stored latent at the
cut, with gradient through the denoiser calls of the window, the VAE decoder and the reward:
- AlignProp: a random contiguous tail. The cut is drawn from the official distribution (gaussian
  int(N(42, 5)), uniform [0, 50) or fixed 49, redrawn until in [1, steps)), once per optimizer step (the
  official code draws once per rollout call); steps cut..S-1 keep gradient. Not TRL's per-step redraw.
- DRaFT: full chain (k = 0, from x_T), DRaFT-K (last k steps), DRaFT-LV (lv_draws = n > 0): the final sample
  x0 is re-noised n times to the last step's timestep, x1 = sqrt(a) x0 + sqrt(1 - a) z, and each is
  denoised by one step with gradient; the rewards are averaged.
Steps before the cut are the collected ones (identical when the policy has not changed since collect; earlier
denoiser outputs carry no gradient either way, as in AlignProp's `noise_pred.detach()`). The window runs in
the one loop (`rollout(start=cut)`), so its latents are cast to the model dtype after each step exactly as
the collected ones were.
KL to the reference (`kl_beta` > 0, not in either paper; DDPO's beta): the mean over the window's steps of
KL(pi_theta || pi_ref) of the transition at each re-run latent (treated as data, as DDPO scores stored steps),
logged as `kl`. A deterministic chain (eta = 0) has no transition density: its KL is that of the same steps
with noise level 1 (DDIM's DDPM posterior std), i.e. a scaled squared distance of the two models' means.
Several rewards (`gradient_balance`, MARBLE-style, not in either paper): `balanced_loss` steps along the
min-norm convex combination of the per-reward gradients instead of their weighted sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from diffusion_align.engine.rollout import rollout
from diffusion_align.errors import UserError
from diffusion_align.math.losses import sample_truncation
from diffusion_align.math.multi_objective import min_norm_coefficients
from diffusion_align.methods.distributed import LocalGroup
from diffusion_align.methods.strategies.sampling import (
    noise_seeds,
    per_sample_generators,
    sample_batch,
    step_rows,
    weighted_micros,
    with_reference,
)


@dataclass
class AlignPropConfig:
    truncation: Literal["gaussian", "uniform", "fixed"] = "gaussian"  # how the backprop cut is drawn
    truncation_mean: float = 42.0  # gaussian cut mean (of 50 steps: ~8 trained steps)
    truncation_std: float = 5.0  # gaussian cut std
    truncation_low: int = 0  # uniform cut range [low, high)
    truncation_high: int = 50
    truncation_fixed: int = 49  # fixed cut (49 of 50 = K = 1)
    loss_scale: float = 0.01  # loss = -loss_scale * reward (official loss_coeff 0.01)
    gradient_checkpointing: bool = True  # recompute each UNet call of the window in backward (official)
    kl_beta: float = 0.0  # weight of KL(policy || base model) over the window's steps; 0 = the published one
    # MARBLE-style balancing of several differentiable rewards: each reward's gradient (weight-signed)
    # separately, combined at their min-norm point (MGDA) instead of by the fixed weights
    gradient_balance: bool = False
    balance_normalize: bool = True  # unit-length per-reward gradients before the solve (scale-free, MARBLE)
    balance_ema: float = 0.0  # smoothing of the coefficients across micro-batches (MARBLE: EMA); 0 = none


@dataclass
class DRaFTConfig:
    k: int = 1  # backprop through the last k steps (DRaFT-K; 1 is often best); 0 = the full chain (DRaFT)
    lv_draws: int = 0  # DRaFT-LV: > 0 re-noises the final sample this many times (2 in reimplementations)
    loss_scale: float = 1.0  # loss = -loss_scale * reward
    gradient_checkpointing: bool = True  # recompute each UNet call of the window in backward
    kl_beta: float = 0.0  # weight of KL(policy || base model) over the window's steps; 0 = the published one
    # MARBLE-style balancing of several differentiable rewards: each reward's gradient (weight-signed)
    # separately, combined at their min-norm point (MGDA) instead of by the fixed weights
    gradient_balance: bool = False
    balance_normalize: bool = True  # unit-length per-reward gradients before the solve (scale-free, MARBLE)
    balance_ema: float = 0.0  # smoothing of the coefficients across micro-batches (MARBLE: EMA); 0 = none


class _RewardBackprop:
    num_inner_epochs = 1

    def __init__(self, config, policy, reward, sample, group=None):
        bad = reward.non_differentiable
        if bad:
            raise UserError(
                f"{type(self).__name__} backpropagates through the reward, but component '{bad[0]}' is "
                "not differentiable; use a differentiable reward (e.g. shapes_color_soft, aesthetic, hpsv2, "
                "pickscore) or a likelihood strategy (ddpo, d3po, prdp)"
            )
        if config.gradient_balance and sum(w != 0 for w in reward.weights.values()) < 2:
            raise UserError(
                f"gradient_balance needs at least two rewards of non-zero weight (configured: "
                f"{reward.weights}); add a second reward or set gradient_balance: false"
            )
        if not 0 <= config.balance_ema < 1:
            raise UserError(f"balance_ema={config.balance_ema} must be in [0, 1)")
        self.config, self.policy, self.reward, self.sample = config, policy, reward, sample
        self.group = group or LocalGroup()
        self.balance = None  # the smoothed min-norm coefficients (gradient_balance with balance_ema > 0)

    @torch.no_grad()
    def collect(self, prompts: list[str], generator) -> dict:
        gens = per_sample_generators(generator, len(prompts), self.policy.backbone.device)
        batch = sample_batch(self.policy, self.reward, self.sample, prompts, gens)
        batch["noise_seeds"] = noise_seeds(gens)
        return batch

    def cut(self, generator) -> int:
        raise NotImplementedError

    def plan(self, batch: dict, batch_size: int, micro_batch_size: int, generator) -> list[list[dict]]:
        order = torch.randperm(len(batch["prompts"]), generator=generator)
        plan = []
        for rows in step_rows(order, batch_size):
            # one window per optimizer step, on every process (process 0's draw): a sharded denoiser needs
            # the same backward on all of them
            cut = self.group.gather(torch.tensor([self.cut(generator)], device=batch["latents"].device))
            plan.append(weighted_micros(batch, rows, micro_batch_size, cut=int(cut[0])))
        return plan

    def filler(self, micro: dict) -> dict:
        """Padding for a sharded denoiser: the first sample through the step's window."""
        return {**micro, "rows": torch.zeros(1, dtype=torch.long)}

    def loss(self, micro: dict) -> tuple[Tensor, dict[str, float]]:
        batch, rows = micro["batch"], micro["rows"]
        latents = batch["latents"]
        r = rows.to(latents.device)
        prompts = [batch["prompts"][i] for i in rows.tolist()]
        embeds = batch["embeds"][r]
        device = self.policy.backbone.device
        gens = [torch.Generator(device).manual_seed(batch["noise_seeds"][i]) for i in rows.tolist()]
        draws = getattr(self.config, "lv_draws", 0)
        kls = []
        if draws > 0:
            x0 = latents[r, -1]
            t = batch["timesteps"][-1]
            scored = []
            for _ in range(draws):
                z = randn_tensor(x0.shape, generator=gens, device=device, dtype=x0.dtype)
                x1 = self.policy.sampler.add_noise(x0, z, t)
                traj = self.denoise(x1, len(batch["timesteps"]) - 1, embeds, gens)
                scored.append(self.reward.score(traj.images, prompts))
                kls += self.window_kl(traj, len(batch["timesteps"]) - 1, embeds)
            total = torch.stack([t for t, _ in scored]).mean(0)
            parts = {n: torch.stack([p[n] for _, p in scored]).mean(0) for n in scored[0][1]}
        else:
            traj = self.denoise(latents[r, micro["cut"]], micro["cut"], embeds, gens)
            total, parts = self.reward.score(traj.images, prompts)
            kls = self.window_kl(traj, micro["cut"], embeds)
        metrics = {
            "reward_with_grad": total.detach().float().mean().item(),
            "grad_steps": float(len(batch["timesteps"]) - micro["cut"]),
        }
        if self.config.gradient_balance:
            loss = self.balanced_loss(parts, metrics)
        else:
            loss = -self.config.loss_scale * total.float().mean()
        if kls:
            kl = torch.stack(kls).mean()
            loss, metrics["kl"] = loss + self.config.kl_beta * kl, kl.item()
        return loss, metrics

    def balanced_loss(self, parts: dict[str, Tensor], metrics: dict[str, float]) -> Tensor:
        """sum_k c_k L_k with L_k = -loss_scale * w_k * mean r_k, whose gradient is the min-norm point of the
        (unit-length, with balance_normalize) per-reward gradients g_k: c_k = a_k / |g_k|, the coefficients a
        solved on the gradients averaged over processes (so every process takes the same combination) and
        EMA-smoothed with balance_ema. Costs one extra backward pass per reward. Logs balance/<reward> (a)
        and balance/min_cosine (the most conflicting pair of per-reward gradients)."""
        cfg = self.config
        names = [n for n in parts if self.reward.weights[n] != 0]
        losses = [-cfg.loss_scale * self.reward.weights[n] * parts[n].float().mean() for n in names]
        params = [p for p in self.policy.parameters() if p.requires_grad]
        grads = [flat_gradient(loss_k, params) for loss_k in losses]
        g = self.group.gather(torch.stack(grads).double()[None]).mean(0)  # (K, P), the same on every process
        norms = g.norm(dim=1).clamp_min(1e-30)
        scale = 1 / norms if cfg.balance_normalize else torch.ones_like(norms)
        unit = g * scale[:, None]
        alpha = min_norm_coefficients(unit @ unit.T)
        if cfg.balance_ema > 0:
            ema = cfg.balance_ema
            self.balance = alpha if self.balance is None else ema * self.balance + (1 - ema) * alpha
            alpha = self.balance
        cosine = (g / norms[:, None]) @ (g / norms[:, None]).T
        metrics.update({f"balance/{n}": a.item() for n, a in zip(names, alpha, strict=True)})
        metrics["balance/min_cosine"] = cosine.min().item()
        coefficients = (alpha * scale).float().tolist()
        return sum(c * loss_k for c, loss_k in zip(coefficients, losses, strict=True))

    def denoise(self, x: Tensor, start: int, embeds, gens):
        """Steps start..S-1 of the one loop from x, with gradient through every denoiser call; the
        trajectory (`rollout.Trajectory`: its decoded `images` (B, 3, H, W) in [0, 1])."""
        s = self.sample
        steps = range(start, s.num_steps)
        return rollout(
            self.policy.backbone, self.policy.sampler, embeds, x, s.num_steps, s.guidance_scale, s.eta,
            grad_steps=steps, checkpoint=self.config.gradient_checkpointing, generator=gens, start=start,
        )  # fmt: skip

    def window_kl(self, traj, start: int, embeds) -> list[Tensor]:
        """[(B,) KL(pi_theta || pi_ref) at each step of `traj`'s window]; [] when kl_beta is 0."""
        if self.config.kl_beta <= 0:
            return []
        s, sampler = self.sample, self.policy.sampler
        eta = s.eta if s.eta > 0 else 1.0  # see the module doc: eta = 0 has no transition density
        kls = []
        for j in range(traj.latents.shape[1] - 1):
            x_t = traj.latents[:, j]
            mean, ref_mean, std = with_reference(self.policy, x_t, traj.timesteps[start + j], embeds, s, eta)
            kls.append(sampler.kl(mean, ref_mean, std))
        return kls

    def state_dict(self) -> dict:
        return {} if self.balance is None else {"balance": self.balance.tolist()}

    def load_state_dict(self, state: dict) -> None:
        if "balance" in state:
            self.balance = torch.tensor(state["balance"], dtype=torch.float64)


def flat_gradient(loss: Tensor, params: list[Tensor]) -> Tensor:
    """d loss / d params as one flat vector (zeros where the loss does not reach); keeps the graph."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params, strict=True)]
    )


class AlignProp(_RewardBackprop):
    def cut(self, generator) -> int:
        c = self.config
        return sample_truncation(
            self.sample.num_steps,
            c.truncation,
            c.truncation_mean,
            c.truncation_std,
            c.truncation_low,
            c.truncation_high,
            c.truncation_fixed,
            generator,
        )


class DRaFT(_RewardBackprop):
    def __init__(self, config: DRaFTConfig, policy, reward, sample, group=None):
        if not 0 <= config.k <= sample.num_steps:
            raise UserError(
                f"DRaFT k={config.k} must be between 0 (full chain) and sample.num_steps={sample.num_steps}"
            )
        if config.lv_draws > 0 and config.k != 1:
            raise UserError(
                f"DRaFT-LV (lv_draws={config.lv_draws}) backpropagates through the last step only: set k: 1"
            )
        super().__init__(config, policy, reward, sample, group)

    def cut(self, generator) -> int:
        k = self.config.k
        return 0 if k == 0 else self.sample.num_steps - k
