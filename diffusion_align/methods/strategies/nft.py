"""DiffusionNFT (Zheng et al. 2025; NVlabs `train_nft_sd3.py`, anchors §2.5b/§2.9): reinforcement on the
forward process of a flow model. No sampler log-probs: any solver (ODE is fine) and no CFG are needed.

collect: the *old* policy (a slowly moving copy of the LoRA) samples groups of each prompt; rewards become
GRPO advantages (per prompt group, global std) and only the clean latents x0 are kept. Before each collect
the old policy moves towards the current one, old <- d old + (1 - d) theta, d = min(decay_rate * optimizer
steps so far, decay_max) after `decay_delay` steps (the official "decay_type" schedules: 1 = rate 0.001,
max 0.5; 2 = delay 75, rate 0.0075, max 0.999).
plan: each sample trains on `timestep_fraction` of the sampling schedule's timesteps, in its own random order.
loss: x_t = (1 - t) x0 + t noise (fresh noise per sample and step, seeded at collect), the velocities of the
current, old and (for the KL) base policies, `losses.nft_loss` times adv_clip_max, plus kl_beta times
mean((v - v_ref)^2). A flow-matching backbone is assumed: its `predict` is a velocity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion_align.errors import UserError
from diffusion_align.math.flow_samplers import FlowMatchSampler
from diffusion_align.math.losses import nft_loss, nft_reward_weight
from diffusion_align.math.stat_tracking import group_advantages
from diffusion_align.methods.distributed import LocalGroup
from diffusion_align.methods.strategies.sampling import (
    noise_seeds,
    per_sample_generators,
    per_step_micros,
    sample_groups,
    step_rows,
    trained_steps,
)


@dataclass
class NFTConfig:
    beta: float = 1.0  # strength of the implicit policies (official: 1.0; 0.1 for OCR)
    kl_beta: float = 1e-4  # weight of mean((v - v_ref)^2) to the base model (official train.beta)
    adv_clip_max: float = 5.0  # advantages clipped to +-this before r = A / A_max / 2 + 1/2
    group_size: int = 24  # images per prompt per epoch (official num_image_per_prompt)
    global_std: bool = True  # group advantages divided by the whole batch's std
    timestep_fraction: float = 1.0  # share of the sampling schedule's timesteps trained per sample
    decay_rate: float = 0.001  # old policy: d = min(decay_rate * (steps - decay_delay), decay_max)
    decay_max: float = 0.5
    decay_delay: int = 0
    num_inner_epochs: int = 1


class NFT:
    def __init__(self, config: NFTConfig, policy, reward, sample, group=None):
        if not isinstance(policy.sampler, FlowMatchSampler):
            raise UserError(
                "DiffusionNFT trains velocities on the flow-matching forward process: use a flow model "
                "(SD3/SD3.5, FLUX, the bundled shapes-flow), not an epsilon-prediction one"
            )
        if config.beta <= 0:
            raise UserError(f"NFT beta={config.beta} must be > 0 (the implicit policies divide by it)")
        if not 0 < config.timestep_fraction <= 1:
            raise UserError(f"NFT timestep_fraction={config.timestep_fraction} must be in (0, 1]")
        self.config, self.policy, self.reward, self.sample = config, policy, reward, sample
        self.group = group or LocalGroup()
        self.num_inner_epochs = config.num_inner_epochs
        self.old: list[Tensor] | None = None  # the old policy's LoRA weights
        self.steps = 0  # optimizer steps planned so far (the official global_step)

    # --- the old policy ------------------------------------------------------------------------------
    def decay(self) -> float:
        c = self.config
        return min(max(0.0, c.decay_rate * (self.steps - c.decay_delay)), c.decay_max)

    def move_old_policy(self) -> None:
        current = [p.detach().clone() for p in self.policy.parameters()]
        if self.old is None:
            self.old = current
            return
        d = self.decay()
        self.old = [o * d + c * (1 - d) for o, c in zip(self.old, current, strict=True)]

    # --- collect -------------------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self, prompts: list[str], generator) -> dict:
        cfg = self.config
        self.move_old_policy()
        with self.policy.weights(self.old):
            batch = sample_groups(self, prompts, generator, cfg.group_size, False, "NFT")
        rewards = self.group.gather(batch["reward"].float())
        every_prompt = self.group.gather_object(list(batch["prompts"]))
        adv = group_advantages(every_prompt, rewards.cpu().numpy(), cfg.global_std)
        batch["advantages"] = self.group.local(torch.from_numpy(adv).to(rewards.device))
        gens = per_sample_generators(generator, len(batch["prompts"]), self.policy.backbone.device)
        batch["noise_seeds"] = noise_seeds(gens)
        batch["latents"] = batch["latents"][:, -1:]  # only x0 is trained on
        batch.pop("log_probs", None)
        batch["metrics"]["nft/old_policy_decay"] = self.decay()
        return batch

    # --- plan ----------------------------------------------------------------------------------------
    def plan(self, batch: dict, batch_size: int, micro_batch_size: int, generator) -> list[list[dict]]:
        n, num_steps = len(batch["prompts"]), len(batch["timesteps"])
        order = torch.randperm(n, generator=generator)
        step_order = trained_steps(n, num_steps, 1.0, self.config.timestep_fraction, generator)
        plan = [
            per_step_micros(batch, rows, step_order, micro_batch_size, "rows")
            for rows in step_rows(order, batch_size)
        ]
        self.steps += len(plan)
        return plan

    def filler(self, micro: dict) -> dict:
        """Padding for a sharded denoiser: the first sample at the first step."""
        first = torch.zeros(1, dtype=torch.long)
        return {"batch": micro["batch"], "rows": first, "steps": first.clone()}

    # --- loss ----------------------------------------------------------------------------------------
    def loss(self, micro: dict) -> tuple[Tensor, dict[str, float]]:
        cfg, batch = self.config, micro["batch"]
        rows, steps = micro["rows"], micro["steps"]
        x0 = batch["latents"][rows.to(batch["latents"].device), -1]
        embeds = batch["embeds"][rows.to(x0.device)]
        t = batch["timesteps"].to(x0.device)[steps.to(x0.device)]
        noise = torch.stack(
            [self._noise(batch, int(r), int(s), x0.shape[1:]) for r, s in zip(rows, steps, strict=True)]
        )
        x_t = self.policy.sampler.add_noise(x0, noise, t).to(x0.dtype)
        predict = self.policy.backbone.predict
        with torch.no_grad(), self.policy.weights(self.old):
            v_old = predict(x_t, t, embeds, 1.0).float()
        v = predict(x_t, t, embeds, 1.0).float()
        sigma = self.policy.sampler.sigma_at(t, t)
        r = nft_reward_weight(batch["advantages"][rows.to(x0.device)], cfg.adv_clip_max)
        per_sample = nft_loss(v, v_old, x_t.float(), x0.float(), sigma, r, cfg.beta) * cfg.adv_clip_max
        loss = per_sample.mean()
        metrics = {"policy_loss": loss.item(), "old_deviation": ((v - v_old) ** 2).mean().item()}
        if cfg.kl_beta > 0:
            with torch.no_grad(), self.policy.reference():
                v_ref = predict(x_t, t, embeds, 1.0).float()
            kl = ((v - v_ref) ** 2).mean()
            loss = loss + cfg.kl_beta * kl
            metrics["kl"] = kl.item()
        return loss, metrics

    def _noise(self, batch: dict, row: int, step: int, shape) -> Tensor:
        """The noise of (sample, step), the same whatever the micro-batching (accumulation equivalence)."""
        device = batch["latents"].device
        g = torch.Generator(device).manual_seed(batch["noise_seeds"][row] + step)
        return torch.randn(shape, generator=g, device=device, dtype=torch.float32)

    def state_dict(self) -> dict:
        return {"old": [o.cpu() for o in self.old] if self.old is not None else None, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        device = self.policy.backbone.device
        self.old = None if state["old"] is None else [o.to(device) for o in state["old"]]
        self.steps = int(state["steps"])
