"""D3PO (Yang et al. 2024, yk7333/d3po), anchors §2.3: DPO on denoising steps, no reward model needed.

Pairs: two DDIM-eta trajectories of the same prompt from the same x_T, differing only through the step noise.
Preference, one of:
- from the reward: Pareto dominance over the reward components, each counted as its signed weight in the total
  times its value (a negatively weighted component is preferred smaller, a zero-weight, log-only one is
  ignored; one component: the larger total wins); ties and incomparable pairs are dropped;
- from human labels, a JSONL file (`human_labels`) in the offline pairs' layout (`preference_data`), one
  pair per line with the seed that regenerates it and its label (Pick-a-Pic's label_0, or preferred 0 | 1):
      {"prompt": "a red circle", "seed": 7, "label_0": 1}
  `diffusion-align pairs --shared-noise` writes such a file, with the images and the reward's labels, for
  people to relabel; bad rows are reported by line and skipped, ties dropped. The pair is regenerated
  exactly by the frozen base model (`render_pairs`): x_T and image 0's step noise come from
  `torch.Generator("cpu").manual_seed(seed)` (x_T drawn first), image 1's step noise from
  `manual_seed(seed + 2**40)`, with this config's sample settings; the trainer's prompts are then ignored.
Loss per pair and trained step (steps shuffled per pair, shared by both members, as in DDPO):
  -log sigmoid(beta * log clamp(pi/pi_ref, 1-eps, 1+eps)[win] - beta * log clamp(...)[lose]), beta 0.1,
  eps 0.1 (the fixed 0.9-1.1 range, d3po#4); the reference is the base model (LoRA disabled).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from diffusion_align.errors import UserError
from diffusion_align.math.losses import d3po_loss, preference_pairs
from diffusion_align.methods.distributed import LocalGroup
from diffusion_align.methods.preference_data import read_seeded_labels
from diffusion_align.methods.strategies.sampling import (
    global_shares,
    image_size,
    per_sample_generators,
    per_step_micros,
    sample_batch,
    shared_initial_noise,
    trained_steps,
    transition_inputs,
    with_reference,
    zero_loss,
)

SECOND_IMAGE_SEED_OFFSET = 2**40


@dataclass
class D3POConfig:
    beta: float = 0.1  # DPO temperature on the per-step log-ratio
    eps: float = 0.1  # ratio clamp to [1-eps, 1+eps], inside the sigmoid
    num_inner_epochs: int = 1  # passes over each collected batch
    timestep_fraction: float = 1.0  # share of each pair's steps that are trained (random per pair)
    human_labels: str | None = None  # JSONL of {"prompt", "seed", "label_0"}; None = prefer by the reward
    # weight of KL(policy || base model) per trained step, added to the loss and logged as `kl` (not in the
    # paper, DDPO's beta; free here: the reference's transition is computed anyway); 0 = the published D3PO
    kl_beta: float = 0.0


class D3PO:
    def __init__(self, config: D3POConfig, policy, reward, sample, group=None):
        if sample.eta <= 0:
            raise ValueError(
                "D3PO needs sample.eta > 0: pairs from one x_T differ only through the step noise"
            )
        self.config, self.policy, self.reward, self.sample = config, policy, reward, sample
        self.group = group or LocalGroup()
        self.num_inner_epochs = config.num_inner_epochs
        self.labels = None
        if config.human_labels:
            pairs = read_seeded_labels(config.human_labels).pairs
            self.labels = [{"prompt": q.prompt, "seed": q.seed, "preferred": q.order[0]} for q in pairs]
        self.cursor = 0  # next human-labelled pair (checkpointed)

    # --- collect -------------------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self, prompts: list[str], generator) -> dict:
        """len(prompts) images = len(prompts) // 2 pairs; pair k uses prompts[2k] and x_T from generator 2k
        (the trainer's per-sample list), its second image's step noise from generator 2k+1."""
        if len(prompts) < 2 or len(prompts) % 2:
            raise UserError(f"D3PO collects pairs: the samples per process ({len(prompts)}) must be even")
        if self.labels is not None:
            batch, winner = self._collect_human(len(prompts) // 2)
        else:
            batch, winner = self._collect_reward(prompts, generator)
        decisive = winner >= 0
        rows = torch.arange(len(winner))[decisive.cpu()]
        win = 2 * rows + winner[decisive].cpu()
        batch["win"], batch["lose"] = win, 2 * rows + 1 - winner[decisive].cpu()
        total = self.group.gather(torch.tensor([len(rows)], device=batch["latents"].device))
        batch["global_pairs"] = int(total.sum().item())
        batch["metrics"]["preference/decisive_fraction"] = batch["global_pairs"] / (
            len(winner) * self.group.world_size
        )
        return batch

    def _collect_reward(self, prompts: list[str], generator) -> tuple[dict, Tensor]:
        backbone, n = self.policy.backbone, len(prompts)
        gens = per_sample_generators(generator, n, backbone.device)
        pair_prompts = [p for p in prompts[0::2] for _ in range(2)]
        x_T = shared_initial_noise(self.policy, self.sample, gens, 2)
        batch = sample_batch(self.policy, self.reward, self.sample, pair_prompts, gens, x_T)
        parts = batch["components"]
        if parts:
            weights = [self.reward.weights[name] for name in parts]  # signed
            if not any(weights):
                raise UserError(
                    f"D3PO prefers by the reward, but every reward weight is 0 ({', '.join(parts)}): give "
                    "the reward to optimise a non-zero weight"
                )
            scores, weights = torch.stack(list(parts.values()), -1), torch.tensor(weights)
        else:  # a custom reward without components: its total
            scores, weights = batch["reward"][:, None], None
        winner, decisive = preference_pairs(scores.view(n // 2, 2, -1), weights)
        return batch, torch.where(decisive, winner, -1)

    def _collect_human(self, num_pairs: int) -> tuple[dict, Tensor]:
        records = [self.labels[(self.cursor + k) % len(self.labels)] for k in range(num_pairs)]
        self.cursor = (self.cursor + num_pairs) % len(self.labels)
        batch = render_pairs(
            self.policy, self.reward, self.sample, [(r["prompt"], r["seed"]) for r in records]
        )
        return batch, torch.tensor([r["preferred"] for r in records])

    # --- plan ----------------------------------------------------------------------------------------
    def plan(self, batch: dict, batch_size: int, micro_batch_size: int, generator) -> list[list[dict]]:
        """batch_size / micro_batch_size count images (2 per pair). Every process plans the same number of
        optimizer steps (decisive pairs over all processes / pairs per step) and spreads its
        own pairs over them."""
        num_steps = batch["latents"].shape[1] - 1
        pairs_per_step = max(1, batch_size // 2)
        pairs_per_micro = max(1, micro_batch_size // 2)
        n_opt = max(1, batch["global_pairs"] // (pairs_per_step * self.group.world_size))
        order = torch.randperm(len(batch["win"]), generator=generator)
        step_order = trained_steps(len(order), num_steps, 1.0, self.config.timestep_fraction, generator)
        plan, counts = [], []
        for chunk in np.array_split(order.numpy(), n_opt):
            pairs = torch.from_numpy(chunk).long()
            counts.append(len(pairs))
            plan.append(per_step_micros(batch, pairs, step_order, pairs_per_micro, "pairs"))
        return global_shares(plan, counts, self.group, batch["latents"].device)

    def filler(self, micro: dict) -> dict:
        """Padding for a sharded denoiser: the first sampled pair (decisive or not) at the first step."""
        first = torch.zeros(1, dtype=torch.long)
        pair = {**micro["batch"], "win": torch.tensor([0]), "lose": torch.tensor([1])}
        return {"batch": pair, "pairs": first, "steps": first.clone()}

    # --- loss ----------------------------------------------------------------------------------------
    def loss(self, micro: dict) -> tuple[Tensor, dict[str, float]]:
        batch, pairs, s = micro["batch"], micro["pairs"], self.sample
        if len(pairs) == 0:
            return zero_loss(self.policy), {}
        rows = torch.cat([batch["win"][pairs], batch["lose"][pairs]])
        steps = torch.cat([micro["steps"], micro["steps"]])
        x_t, x_prev, t, embeds = transition_inputs(batch, rows, steps)
        mean, ref_mean, std = with_reference(self.policy, x_t, t, embeds, s)
        log_prob = self.policy.sampler.log_prob(x_prev, mean, std)
        ref = self.policy.sampler.log_prob(x_prev, ref_mean, std)
        p = len(pairs)
        losses, accuracy = d3po_loss(
            log_prob[:p], ref[:p], log_prob[p:], ref[p:], self.config.beta, self.config.eps
        )
        ratio = torch.exp(log_prob.detach() - ref)
        clipped = ((ratio - 1).abs() > self.config.eps).float().mean()
        loss, metrics = (
            losses.mean(),
            {
                "implicit_accuracy": accuracy.mean().item(),
                "clip_fraction": clipped.item(),
                "log_ratio_abs": (log_prob.detach() - ref).abs().mean().item(),
            },
        )
        if self.config.kl_beta > 0:
            kl = self.policy.sampler.kl(mean, ref_mean, std).mean()
            loss, metrics["kl"] = loss + self.config.kl_beta * kl, kl.item()
        return loss, metrics

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state.get("cursor", 0))


@torch.no_grad()
def render_pairs(policy, reward, sample, pairs: list[tuple[str, int]]) -> dict:
    """The two trajectories of each (prompt, seed) under the frozen base model, deterministic on any device.

    Returns sample_batch's dict with 2 * len(pairs) rows (pair k at rows 2k, 2k+1) plus "images"
    (2P, 3, H, W) in [0, 1], which is what a labeller looks at.
    """
    backbone = policy.backbone
    gens, noise = [], []
    for _, seed in pairs:
        first = torch.Generator("cpu").manual_seed(seed)
        noise.append(backbone.initial_noise(1, [first], image_size(sample)))
        gens += [first, torch.Generator("cpu").manual_seed(seed + SECOND_IMAGE_SEED_OFFSET)]
    prompts = [p for p, _ in pairs for _ in range(2)]
    with policy.reference():
        return sample_batch(
            policy, reward, sample, prompts, gens, torch.cat(noise).repeat_interleave(2, 0), keep_images=True
        )
