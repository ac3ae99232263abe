"""Reward-filtered SFT (RAFT, Dong et al. 2023; ReST-style filtering): the baseline every preference method
is compared with. No reference, no likelihoods.

collect: the policy samples `group_size` images per prompt (each with its own x_T), the configured reward
scores them, and the top `keep_fraction` of each prompt's images (at least one; ties broken by sample order)
are kept with their sampled latents x0.
loss: the plain denoising objective on the kept latents: t uniform over the training timesteps, noise, x_t
from the sampler's forward process, mean |pred - target|^2 (target = noise for epsilon-prediction SD,
noise - x0 for flow models), the denoiser conditioned on the prompt without guidance.
Optimizer steps per epoch: samples_per_epoch / batch_size (as for the other strategies), the kept images
spread evenly over them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from diffusion_align.errors import UserError
from diffusion_align.methods.distributed import LocalGroup
from diffusion_align.methods.strategies.sampling import (
    forward_noised,
    noise_seeds,
    per_sample_generators,
    sample_groups,
    squared_error,
    training_timesteps,
    weighted_micros,
)


@dataclass
class RewardSFTConfig:
    group_size: int = 4  # images sampled per prompt (RAFT's k)
    keep_fraction: float = 0.25  # top share of each prompt's images kept (1 / group_size: RAFT's best-of-k)
    num_inner_epochs: int = 1  # passes over each collected batch


class RewardSFT:
    def __init__(self, config: RewardSFTConfig, policy, reward, sample, group=None):
        if not hasattr(policy.sampler, "training_target"):
            raise UserError(f"reward_sft needs a DDIM or flow sampler, not {type(policy.sampler).__name__}")
        self.config, self.policy, self.reward, self.sample = config, policy, reward, sample
        self.group = group or LocalGroup()
        self.num_inner_epochs = config.num_inner_epochs
        self.keep = max(1, math.ceil(config.group_size * config.keep_fraction))

    @torch.no_grad()
    def collect(self, prompts: list[str], generator) -> dict:
        size = self.config.group_size
        gens = per_sample_generators(generator, len(prompts), self.policy.backbone.device)
        batch = sample_groups(self, prompts, gens, size, False, "reward_sft")
        reward = batch["reward"].view(-1, size).cpu()
        top = reward.argsort(dim=1, descending=True, stable=True)[:, : self.keep]
        kept = (top + torch.arange(len(reward))[:, None] * size).flatten()
        kept_gens = [gens[int(k)] for k in kept]
        batch["kept"] = kept
        batch["x0"] = batch.pop("latents")[kept.to(batch["reward"].device), -1].float()
        batch["t"] = training_timesteps(self.policy.sampler, kept_gens)
        batch["noise_seeds"] = noise_seeds(kept_gens)
        batch.pop("log_probs", None)
        batch["metrics"]["sft/kept_reward_mean"] = reward.gather(1, top).mean().item()
        return batch

    def plan(self, batch: dict, batch_size: int, micro_batch_size: int, generator) -> list[list[dict]]:
        """batch_size counts sampled images (kept or not); micro_batch_size counts kept images."""
        n_opt = max(1, min(len(batch["kept"]), len(batch["prompts"]) // batch_size))
        order = torch.randperm(len(batch["kept"]), generator=generator)
        plan = []
        for chunk in np.array_split(order.numpy(), n_opt):
            plan.append(weighted_micros(batch, torch.from_numpy(chunk).long(), micro_batch_size))
        return plan

    def filler(self, micro: dict) -> dict:
        """Padding for a sharded denoiser: the first kept sample."""
        return {"batch": micro["batch"], "rows": torch.zeros(1, dtype=torch.long)}

    def loss(self, micro: dict) -> tuple[Tensor, dict[str, float]]:
        batch, rows = micro["batch"], micro["rows"]
        x0 = batch["x0"][rows.to(batch["x0"].device)]
        seeds = [batch["noise_seeds"][int(r)] for r in rows]
        t = batch["t"][rows].to(x0.device)
        x_t, target = forward_noised(self.policy.sampler, x0, seeds, t)
        embeds = batch["embeds"][batch["kept"][rows].to(x0.device)]
        prediction = self.policy.denoiser_output(x_t.to(self.policy.backbone.dtype), t, embeds)
        loss = squared_error(prediction, target).mean()
        return loss, {"denoising_mse": loss.item()}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
