"""DDPO (Black et al. 2023), the PPO-clipped importance-sampling variant of ddpo-pytorch (anchors §2.1).

collect: DDIM-eta rollouts with stored per-step log-probs (no grad), rewards, advantages from the per-prompt
stat tracker over the global batch (batch statistics until a prompt has `stat_min_count` rewards), clipped.
`group_size` > 1 samples each prompt that many times per epoch (GRPO-style groups), so per-prompt statistics
exist from the first epoch instead of after many random draws of the same prompt; `share_initial_noise` gives
a group one x_T, so its rewards differ only through the step noise that the log-probs score.
plan: each sample trains on the first `timestep_fraction` of its own random permutation of the steps in the
early `timestep_window` of the chain; one optimizer step = `batch_size` samples through all their trained
steps (ddpo-pytorch's accumulation).
loss: PPO-clip on the per-step ratio, CFG recomputed at the sampling scale, optional KL to the base model.

Flow-GRPO (Liu et al. 2025; flow_grpo, anchors §2.5) is this objective on a flow model's SDE sampler with
GRPO advantages: `FlowGRPOConfig` sets its defaults (groups of a prompt normalised within the batch by the
global std, KL weight, clip). `sde_window` = k > 0 is Flow-GRPO-Fast: the chain is an ODE except k
consecutive SDE steps at a random place in the trainable window (redrawn every collect), and only those
steps are trained, so a group branches there. `sde_window_mode: sliding` is MixGRPO's schedule instead: the
window starts at the first step and moves one step later every `sde_window_every` collects, wrapping around.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from diffusion_align.errors import UserError
from diffusion_align.math.losses import clip_advantages, ppo_clip_loss
from diffusion_align.math.multi_objective import non_dominated, signed_objectives
from diffusion_align.math.stat_tracking import PerPromptStatTracker, group_advantages
from diffusion_align.methods.distributed import LocalGroup
from diffusion_align.methods.strategies.sampling import (
    global_shares,
    per_step_micros,
    sample_groups,
    step_rows,
    trained_steps,
    transition_inputs,
    window_steps,
    zero_loss,
)


@dataclass
class DDPOConfig:
    clip_range: float = 1e-4  # PPO ratio clip (per latent dim, log-probs are means over dims)
    adv_clip_max: float = 5.0  # advantages clamped to +-this
    num_inner_epochs: int = 1  # passes over each collected batch
    timestep_fraction: float = 1.0  # share of the window's steps trained per sample (random per sample)
    # Leading share of the chain (noisiest first) whose steps may be trained, as Flow-GRPO-Fast trains only an
    # early window. Late steps have a tiny sigma and their log-prob gradient (~1/sigma) is mostly noise.
    timestep_window: float = 1.0  # 1.0 = every step (the published DDPO)
    per_prompt_stat_tracking: bool = True  # normalise rewards per prompt (else over the global batch)
    group_size: int = 1  # images per prompt per epoch; 1 = the published DDPO (every sample a random prompt)
    # One x_T per group (DanceGRPO's init_same_noise): a group's rewards then differ only through the step
    # noise whose log-probs are trained, instead of mostly through x_T, which no log-prob accounts for.
    share_initial_noise: bool = False
    stat_buffer_size: int = 16  # rewards kept per prompt
    stat_min_count: int = 16  # per-prompt stats only once a prompt has this many rewards
    beta: float = 0.0  # weight of KL(policy || base model) per step; 0 = the published DDPO
    # "stat_tracker": DDPO's per-prompt buffers over epochs; "group": GRPO, each prompt's group in this batch
    advantages: Literal["stat_tracker", "group"] = "stat_tracker"
    global_std: bool = False  # "group" advantages divided by the whole batch's std (Flow-GRPO's default)
    sde_window: int = 0  # > 0: Flow-GRPO-Fast, an ODE chain with this many SDE steps, only they trained
    sde_window_mode: Literal["random", "sliding"] = "random"  # Fast's random place, or MixGRPO's sliding one
    sde_window_every: int = 1  # sliding: collects before the window moves one step
    # Drop samples whose advantage is 0 (a group of equal rewards) from the update, as flow_grpo does: the
    # rest keep the whole objective's weight. Each process keeps the number of optimizer steps it planned.
    filter_zero_advantages: bool = False
    # Parrot's batch-wise Pareto selection (Lee et al. 2024) over the reward components (signed by their
    # weights): only samples no other sample beats on every reward train, the rest get advantage 0 and leave
    # the update. "batch": one front over the global batch (Parrot); "prompt": a front within each prompt's
    # samples; "none": every sample trains on the weighted sum (the published DDPO / Flow-GRPO).
    pareto_selection: Literal["none", "batch", "prompt"] = "none"


@dataclass
class FlowGRPOConfig(DDPOConfig):
    """Flow-GRPO's published settings (SD3.5-M; flow_grpo `config/grpo.py`): 24 images per prompt, GRPO
    advantages with the global std, clip 1e-4, advantages clipped to 5, KL weight 0.04 (0.01 for
    PickScore), 99 % of the steps trained. The noise level (0.7) is `sample.eta` of a flow model."""

    group_size: int = 24
    advantages: Literal["stat_tracker", "group"] = "group"
    global_std: bool = True
    timestep_fraction: float = 0.99
    beta: float = 0.04
    filter_zero_advantages: bool = True


def without_zero_advantages(steps: list[Tensor], advantages: Tensor) -> list[Tensor]:
    """The optimizer steps' rows without those of advantage 0, spread evenly over as many steps (so every
    process still takes the steps it planned; a step may be left without rows)."""
    rows = torch.cat(steps)
    kept = rows[advantages.cpu()[rows] != 0]
    return list(torch.tensor_split(kept, len(steps)))


class DDPO:
    def __init__(self, config: DDPOConfig, policy, reward, sample, group=None):
        if sample.eta <= 0:
            raise ValueError("DDPO needs sample.eta > 0 (with eta = 0 the transition log-prob is undefined)")
        for name in ("timestep_fraction", "timestep_window"):
            if not 0 < getattr(config, name) <= 1:
                raise UserError(f"DDPO {name}={getattr(config, name)} must be in (0, 1]")
        if config.group_size < 1:
            raise UserError(f"DDPO group_size={config.group_size} must be at least 1")
        usable = window_steps(sample.num_steps, config.timestep_window)
        if not 0 <= config.sde_window <= usable:
            raise UserError(
                f"sde_window={config.sde_window} must be between 0 (SDE everywhere) and the {usable} steps "
                f"of timestep_window={config.timestep_window} x sample.num_steps={sample.num_steps}"
            )
        if config.pareto_selection != "none" and sum(w != 0 for w in reward.weights.values()) < 2:
            raise UserError(
                f"pareto_selection={config.pareto_selection} needs at least two rewards of non-zero weight "
                f"(configured: {reward.weights}); add a second reward or set pareto_selection: none"
            )
        self.config, self.policy, self.reward, self.sample = config, policy, reward, sample
        self.group = group or LocalGroup()
        self.num_inner_epochs = config.num_inner_epochs
        self.tracker = PerPromptStatTracker(config.stat_buffer_size, config.stat_min_count)
        self.collects = 0  # collects so far: the sliding window's clock

    # --- collect -------------------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self, prompts: list[str], generator) -> dict:
        cfg = self.config
        eta, window = self.sde_steps(generator)
        batch = sample_groups(self, prompts, generator, cfg.group_size, cfg.share_initial_noise, "DDPO", eta)
        batch["sde_steps"] = window
        prompts = batch["prompts"]
        rewards = self.group.gather(batch["reward"].float())
        every_prompt = self.group.gather_object(list(prompts))
        if cfg.advantages == "group":
            adv = group_advantages(every_prompt, rewards.cpu().numpy(), cfg.global_std)
            adv, per_prompt = torch.from_numpy(adv).to(rewards.device), 1.0
        elif self.config.per_prompt_stat_tracking:
            adv, per_prompt = self.tracker.update(every_prompt, rewards.cpu().numpy())
            adv = torch.from_numpy(adv).to(rewards.device)
        else:
            adv, per_prompt = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-6), 0.0
        adv = clip_advantages(self.group.local(adv), self.config.adv_clip_max)
        if cfg.pareto_selection != "none":
            front = self.group.local(self.pareto_front(batch["components"], every_prompt))
            adv = torch.where(front.to(adv.device), adv, torch.zeros_like(adv))
            batch["metrics"]["pareto/front_fraction"] = front.float().mean().item()
        batch["advantages"] = adv
        batch["metrics"].update(
            {
                "advantage/mean": adv.mean().item(),
                "advantage/std": adv.std().item() if adv.numel() > 1 else 0.0,
                "advantage/abs_mean": adv.abs().mean().item(),
                "advantage/per_prompt_fraction": float(per_prompt),
            }
        )
        if cfg.filter_zero_advantages:
            batch["metrics"]["advantage/zero_fraction"] = (adv == 0).float().mean().item()
        return batch

    def pareto_front(self, components: dict[str, Tensor], every_prompt: list[str]) -> Tensor:
        """(global batch,) bool: the samples on the Pareto front of the signed reward components, over the
        whole batch or within each prompt's samples (`pareto_selection`)."""
        names = list(components)
        scores = self.group.gather(torch.stack([components[n].float() for n in names], -1))
        objectives = signed_objectives(scores.cpu(), torch.tensor([self.reward.weights[n] for n in names]))
        groups = None
        if self.config.pareto_selection == "prompt":
            ids = {p: i for i, p in enumerate(dict.fromkeys(every_prompt))}
            groups = torch.tensor([ids[p] for p in every_prompt])
        return non_dominated(objectives, groups)

    def sde_steps(self, generator) -> tuple[list[float] | None, Tensor | None]:
        """Flow-GRPO-Fast's window: (per-step noise levels, its step indices), or (None, None) without one.
        A random place is drawn from a copy of the first sample's generator (the samples' own noise stays
        untouched); a sliding one from the count of collects."""
        k, s = self.config.sde_window, self.sample
        if k == 0:
            return None, None
        usable = window_steps(s.num_steps, self.config.timestep_window)
        if self.config.sde_window_mode == "sliding":
            start = (self.collects // max(1, self.config.sde_window_every)) % (usable - k + 1)
        else:
            first = generator[0] if isinstance(generator, (list, tuple)) else generator
            draw = torch.Generator(first.device)
            draw.set_state(first.get_state())
            start = int(torch.randint(0, usable - k + 1, (), generator=draw, device=first.device))
        self.collects += 1
        steps = torch.arange(start, start + k)
        return [s.eta if start <= i < start + k else 0.0 for i in range(s.num_steps)], steps

    # --- plan ----------------------------------------------------------------------------------------
    def plan(self, batch: dict, batch_size: int, micro_batch_size: int, generator) -> list[list[dict]]:
        n, num_steps = batch["log_probs"].shape
        cfg = self.config
        order = torch.randperm(n, generator=generator)
        if batch.get("sde_steps") is not None:  # Fast: only the window's steps drew noise to score
            window = batch["sde_steps"]
            step_order = window[trained_steps(n, len(window), 1.0, cfg.timestep_fraction, generator)]
        else:
            step_order = trained_steps(n, num_steps, cfg.timestep_window, cfg.timestep_fraction, generator)
        steps = step_rows(order, batch_size)
        # ddpo-pytorch: an inner loop over each sample's shuffled steps
        if not (cfg.filter_zero_advantages or cfg.pareto_selection != "none"):
            return [per_step_micros(batch, rows, step_order, micro_batch_size, "rows") for rows in steps]
        # the processes keep different numbers of samples: each step is the mean over all processes' kept ones
        steps = without_zero_advantages(steps, batch["advantages"])
        plan = [per_step_micros(batch, rows, step_order, micro_batch_size, "rows") for rows in steps]
        return global_shares(plan, [len(rows) for rows in steps], self.group, batch["latents"].device)

    def filler(self, micro: dict) -> dict:
        """Padding for a sharded denoiser (`across_processes.equal_micro_counts`): the first sample at a
        step that has a log-prob (the window's first under Fast), trained like any micro-batch."""
        batch = micro["batch"]
        window = batch.get("sde_steps")
        steps = window[:1] if window is not None else torch.zeros(1, dtype=torch.long)
        return {"batch": batch, "rows": torch.zeros(1, dtype=torch.long), "steps": steps.clone()}

    # --- loss ----------------------------------------------------------------------------------------
    def loss(self, micro: dict) -> tuple[Tensor, dict[str, float]]:
        cfg, s, batch = self.config, self.sample, micro["batch"]
        if len(micro["rows"]) == 0:  # a step whose samples all had advantage 0 here: a zero gradient
            return zero_loss(self.policy), {}
        x_t, x_prev, t, embeds = transition_inputs(batch, micro["rows"], micro["steps"])
        mean, std = self.policy.transition(x_t, t, embeds, s.guidance_scale, s.num_steps)
        log_prob = self.policy.sampler.log_prob(x_prev, mean, std)
        rows, steps = micro["rows"].to(x_t.device), micro["steps"].to(x_t.device)
        old = batch["log_probs"][rows, steps]
        per_sample, ratio, approx_kl, clip_fraction = ppo_clip_loss(
            log_prob, old, batch["advantages"][rows], cfg.clip_range
        )
        loss = per_sample.mean()
        metrics = {
            "policy_loss": loss.item(),
            "approx_kl": approx_kl.item(),
            "clip_fraction": clip_fraction.item(),
            "ratio_max_deviation": (ratio.detach() - 1).abs().max().item(),
        }
        if cfg.beta > 0:
            with torch.no_grad(), self.policy.reference():
                ref_mean, _ = self.policy.transition(x_t, t, embeds, s.guidance_scale, s.num_steps)
            kl = self.policy.sampler.kl(mean, ref_mean, std).mean()
            loss = loss + cfg.beta * kl
            metrics["kl"] = kl.item()
        return loss, metrics

    def state_dict(self) -> dict:
        return {"tracker": self.tracker.state_dict(), "collects": self.collects}

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state["tracker"])
        self.collects = int(state.get("collects", 0))  # checkpoints from before the sliding window: 0
