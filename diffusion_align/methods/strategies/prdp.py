"""PRDP (Deng et al., CVPR 2024), anchors §2.4: reward-difference prediction with proximal clipping.

collect: groups of `group_size` samples per prompt (independent x_T, or one per group with
`share_initial_noise`), DDIM-eta rollouts, rewards.
loss: for trajectories x (all S steps, or their leading `timestep_window` share),
h_t = log pi_theta(x_{t-1}|x_t) - log pi_ref(...) (ref = base model, LoRA disabled), clipped per step to
h_old_t +- eps; h = mean over steps (the JAX reference averages); every pair i < j of a group with different
rewards: max((h_i - h_j - (r_i - r_j)/beta)^2, same with clipped h). The step's objective is the mean over
its pairs; micro-batches hold whole groups.
Old policy (the paper's Algorithm 1: theta_old <- theta, sample, then K updates): the policy that sampled
the batch. `collect` snapshots the LoRA weights into the batch; the old log-probs are computed once per row in
the training forward's own numerics (from the current forward while the weights still equal the snapshot,
else by swapping the snapshot in) and cached in the batch, so the clip is centred on the sampler even after
updates, and exactly before the first (the sampler's stored log-probs come from another forward, whose float
noise eps = 1e-6 leaves no room for). The paper's K inner updates are `num_inner_epochs` with
`train.batch_size = samples_per_epoch` (one full-batch step per pass). Nothing outlives a batch, so a resume
needs no state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion_align.engine.sharding import is_sharded
from diffusion_align.errors import UserError
from diffusion_align.math.losses import group_pairs, prdp_loss
from diffusion_align.methods.distributed import LocalGroup
from diffusion_align.methods.strategies.sampling import (
    global_shares,
    sample_groups,
    window_steps,
    with_reference,
    zero_loss,
)


@dataclass
class PRDPConfig:
    group_size: int = 16  # images per prompt (B); pairs are formed within a group
    beta: float = 3e-5  # reward-difference scale: target = (r_i - r_j) / beta (small-scale setting)
    eps: float = 1e-6  # proximal clip of each step's log-ratio around the old policy's
    share_initial_noise: bool = False  # one x_T per group, as DDPO's option of the same name
    # Leading share of the chain (noisiest first) whose log-ratios make up h, as DDPO's `timestep_window`:
    # the late tiny-sigma steps' log-prob gradients are mostly noise. 1.0 = every step (the published PRDP).
    timestep_window: float = 1.0
    num_inner_epochs: int = 1  # K: passes over each collected batch (paper: 10, each one full-batch step)
    # weight of KL(policy || base model) over the trained steps, added to the loss and logged as `kl` (not in
    # the paper, whose proximal clip is around the sampling policy; DDPO's beta); 0 = the published PRDP
    kl_beta: float = 0.0
    refresh_every: int | None = None  # removed: the old policy is the sampler of each batch

    def __post_init__(self):
        if self.refresh_every is not None:
            raise ValueError(
                "PRDP refresh_every was removed: the old policy is now the one that sampled the batch (the "
                "paper's Algorithm 1); delete the key and set strategy.num_inner_epochs: K with "
                "train.batch_size = train.samples_per_epoch for K full-batch updates per batch"
            )


class PRDP:
    def __init__(self, config: PRDPConfig, policy, reward, sample, group=None):
        if sample.eta <= 0:
            raise ValueError("PRDP needs sample.eta > 0 (the log-ratios are transition log-probs)")
        if config.group_size < 2:
            raise UserError(f"PRDP group_size={config.group_size}: pairs need at least 2 images per prompt")
        if not 0 < config.timestep_window <= 1:
            raise UserError(f"PRDP timestep_window={config.timestep_window} must be in (0, 1]")
        self.config, self.policy, self.reward, self.sample = config, policy, reward, sample
        self.group = group or LocalGroup()
        self.num_inner_epochs = config.num_inner_epochs
        self.sharded = is_sharded(policy.backbone.unet)

    # --- collect -------------------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self, prompts: list[str], generator) -> dict:
        """Group g is prompts[g * group_size] repeated group_size times, each image with its own step noise
        (and its own x_T unless `share_initial_noise`)."""
        n, size = len(prompts), self.config.group_size
        batch = sample_groups(self, prompts, generator, size, self.config.share_initial_noise, "PRDP")
        batch["group_ids"] = torch.arange(n) // size
        batch["ref_log_probs"] = torch.full_like(batch["log_probs"], float("nan"))  # filled on first use
        batch["old_params"] = [p.detach().clone() for p in self.policy.parameters()]  # theta_old: the sampler
        batch["old_log_probs"] = torch.full_like(batch["log_probs"], float("nan"))  # filled on first use
        first, _ = group_pairs(batch["group_ids"], batch["reward"].cpu())
        batch["metrics"]["pairs_per_group"] = len(first) / (n // size)
        return batch

    # --- plan ----------------------------------------------------------------------------------------
    def plan(self, batch: dict, batch_size: int, micro_batch_size: int, generator) -> list[list[dict]]:
        """batch_size and micro_batch_size count images, rounded to whole groups (at least one)."""
        size = self.config.group_size
        groups_per_step, groups_per_micro = max(1, batch_size // size), max(1, micro_batch_size // size)
        num_groups = len(batch["prompts"]) // size
        rewards, ids = batch["reward"].cpu(), batch["group_ids"]
        pairs_in = torch.bincount(ids[group_pairs(ids, rewards)[0]], minlength=num_groups)
        order = torch.randperm(num_groups, generator=generator)
        plan, counts = [], []
        for start in range(0, max(1, num_groups - groups_per_step + 1), groups_per_step):
            groups = order[start : start + groups_per_step]
            total = int(pairs_in[groups].sum())
            counts.append(total)
            micros = []
            for m in range(0, len(groups), groups_per_micro):
                g = groups[m : m + groups_per_micro]
                count = int(pairs_in[g].sum())
                if count or not total:  # a step with no pair at all still gets one (zero) micro-batch
                    micros.append({"batch": batch, "groups": g, "weight": count / total if total else 0.0})
            plan.append(micros)
        return global_shares(plan, counts, self.group, batch["latents"].device)

    def filler(self, micro: dict) -> dict:
        """Padding for a sharded denoiser: group 0's first two images as a pair, whatever their rewards."""
        return {"batch": micro["batch"], "groups": torch.zeros(1, dtype=torch.long), "pairs": ([0], [1])}

    # --- loss ----------------------------------------------------------------------------------------
    def loss(self, micro: dict) -> tuple[Tensor, dict[str, float]]:
        batch, cfg, s = micro["batch"], self.config, self.sample
        rows = torch.cat(
            [torch.arange(g * cfg.group_size, (g + 1) * cfg.group_size) for g in micro["groups"].tolist()]
        )
        rewards = batch["reward"].cpu()[rows]
        if "pairs" in micro:
            first, second = (torch.tensor(p) for p in micro["pairs"])
        else:
            first, second = group_pairs(batch["group_ids"][rows], rewards)
        if len(first) == 0:
            return zero_loss(self.policy), {"pairs": 0.0}
        latents = batch["latents"]
        num_steps = window_steps(batch["log_probs"].shape[1], cfg.timestep_window)
        r = rows.to(latents.device)
        embeds = batch["embeds"][r]
        steps = []
        for i in range(num_steps):
            t = batch["timesteps"][i].to(latents.device).expand(len(rows))
            steps.append((latents[r, i], latents[r, i + 1], t))
        old = batch["old_log_probs"][r, :num_steps]
        missing = bool(torch.isnan(old).any())
        moved = missing and not self._weights_are(batch["old_params"])
        ref_missing = bool(torch.isnan(batch["ref_log_probs"][r, :num_steps]).any())
        run_ref, run_old = self._agreed(ref_missing, moved, latents.device)
        refs = [self._ref(batch, r, i, *step, embeds, run_ref) for i, step in enumerate(steps)]
        if run_old:  # the snapshot's forwards swap weights in place: all before any graph holds the weights
            snapshot = self._old_log_probs(batch["old_params"], steps, embeds)
            old = snapshot if moved else old
        kls = []
        if cfg.kl_beta > 0:  # the same forwards give the log-probs; the reference adds one per step
            log_probs = []
            for x_t, x_prev, t in steps:
                mean, ref_mean, std = with_reference(self.policy, x_t, t, embeds, s)
                log_probs.append(self.policy.sampler.log_prob(x_prev, mean, std))
                kls.append(self.policy.sampler.kl(mean, ref_mean, std))
        else:
            log_probs = [self.policy.log_prob(*step, embeds, s.guidance_scale, s.num_steps) for step in steps]
        log_prob, ref = torch.stack(log_probs, 1), torch.stack(refs, 1)
        if missing:
            old = old if moved else log_prob.detach()  # unchanged weights: the forward is theta_old's
            batch["old_log_probs"][r, :num_steps] = old
        losses, clipped = prdp_loss(
            log_prob - ref, old - ref, rewards.to(ref.device), first, second, cfg.beta, cfg.eps
        )
        dev = (torch.exp(log_prob.detach() - old) - 1).abs().max()
        sampled = batch["log_probs"][r, :num_steps]  # the sampler's: equal to log_prob before any update
        loss, metrics = (
            losses.mean(),
            {
                "pairs": float(len(first)),
                "clip_fraction": clipped.float().mean().item(),
                "log_ratio_abs": (log_prob.detach() - ref).abs().mean().item(),
                "ratio_max_deviation": dev.item(),
                "sampling_ratio_max_deviation": (torch.exp(log_prob.detach() - sampled) - 1)
                .abs()
                .max()
                .item(),
            },
        )
        if kls:
            kl = torch.stack(kls, 1).mean()
            loss, metrics["kl"] = loss + cfg.kl_beta * kl, kl.item()
        return loss, metrics

    def _agreed(self, ref_missing: bool, old_moved: bool, device) -> tuple[bool, bool]:
        """Whether to run the reference's forwards and the snapshot's: where needed here, and with a sharded
        denoiser wherever any process needs them (its blocks run only when every process calls them; the
        values of a run made only for that are not used)."""
        if not self.sharded:
            return ref_missing, old_moved
        flags = self.group.gather(torch.tensor([[int(ref_missing), int(old_moved)]], device=device))
        return bool(flags[:, 0].max() > 0), bool(flags[:, 1].max() > 0)

    def _ref(self, batch, r, i, x_t, x_prev, t, embeds, run: bool) -> Tensor:
        cached = batch["ref_log_probs"][r, i]
        if run:
            s = self.sample
            with torch.no_grad(), self.policy.reference():
                fresh = self.policy.log_prob(x_t, x_prev, t, embeds, s.guidance_scale, s.num_steps)
            if torch.isnan(cached).any():
                batch["ref_log_probs"][r, i] = cached = fresh
        return cached

    # --- the old policy ------------------------------------------------------------------------------
    def _weights_are(self, params: list[Tensor]) -> bool:
        return all(torch.equal(p, o) for p, o in zip(self.policy.parameters(), params, strict=True))

    @torch.no_grad()
    def _old_log_probs(self, old_params, steps, embeds) -> Tensor:
        """(B, len(steps)) log-probs under the snapshot: swapped in once for every step, then swapped back."""
        s = self.sample
        with self.policy.weights(old_params):
            return torch.stack(
                [self.policy.log_prob(*step, embeds, s.guidance_scale, s.num_steps) for step in steps], 1
            )

    def state_dict(self) -> dict:
        return {}  # the old policy lives in each batch, and checkpoints fall between batches

    def load_state_dict(self, state: dict) -> None:
        pass  # a checkpoint from before the old policy moved into the batch holds a stale copy: not needed
