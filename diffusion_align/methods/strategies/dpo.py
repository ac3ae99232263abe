"""Diffusion-DPO (Wallace et al. 2024; SalesforceAIResearch/DiffusionDPO train.py, anchors §2.6): DPO on the
denoising objective, from preference pairs of images. No sampler log-probs: any backbone that predicts noise,
velocity or x0 at a forward-process x_t trains with it.

Pairs, one of (`pairs`):
- offline: a preference data set (`data`: JSONL, Pick-a-Pic Parquet/Arrow or a hub id; `preference_data`),
  images VAE-encoded once and cached; the trainer's prompts are ignored. Each epoch takes the next
  samples_per_epoch / 2 pairs of a per-pass shuffled order (the cursor is checkpointed).
- online (flow_grpo's OnlineDPO): the policy samples `group_size` images per prompt (from one shared x_T
  unless `share_initial_noise: false`), the configured reward ranks them, best vs worst is the pair (no pair
  when they tie); the sampled latents are x0.
Loss per pair: one noise and one t for winner and loser (t uniform over the training timesteps), x_t from
the sampler's forward process, the denoising error |pred - target|^2 (mean over latent dims; target = noise
for epsilon-prediction SD, noise - x0 for flow models) under the policy and the reference, then
`losses.diffusion_dpo_loss` (sigmoid, hinge or IPO; beta_form salesforce: -beta/2 (d_model - d_ref), the
paper's code, beta 5000, the default; diffusers: beta (d_ref - d_model), beta 2500), plus, with
`sft_weight` > 0, the winner's own denoising error (RPO-style). Reference: the base
model (LoRA disabled) or, with `ref_update_every` N > 0, a copy of the policy refreshed every N optimizer
steps (flow_grpo's ref_update_step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from diffusion_align.engine.backbones.stable_diffusion import PromptEmbeds
from diffusion_align.errors import UserError
from diffusion_align.math.losses import diffusion_dpo_loss
from diffusion_align.methods.distributed import LocalGroup
from diffusion_align.methods.preference_data import BadImage, PairOrder, load_image, read_pairs
from diffusion_align.methods.strategies.sampling import (
    forward_noised,
    global_shares,
    image_size,
    noise_seeds,
    per_sample_generators,
    sample_groups,
    squared_error,
    training_timesteps,
    weighted_micros,
    zero_loss,
)


@dataclass
class DiffusionDPOConfig:
    beta: float = 5000.0  # DPO temperature (the paper's code: 5000 in the salesforce form)
    beta_form: Literal["salesforce", "diffusers"] = "salesforce"  # -beta/2 (d - d_ref) or beta (d_ref - d)
    loss_type: Literal["sigmoid", "hinge", "ipo"] = "sigmoid"  # DPO, hinge or IPO (diffusers' example)
    pairs: Literal["offline", "online"] = "offline"  # a preference data set, or pairs the policy samples
    data: str | None = None  # offline: .jsonl, Parquet/Arrow file or folder (Pick-a-Pic layout) or hub id
    data_split: str = "train"  # hub datasets: the split
    group_size: int = 2  # online: images per prompt; best vs worst by the reward
    # online: one x_T per group (flow_grpo's same_latent), so a pair differs only through the step noise;
    # False: each image its own x_T (more different pairs: DPO needs no log-prob of the chain)
    share_initial_noise: bool = True
    ref_update_every: int = 0  # optimizer steps between copies of the policy into the reference; 0 = base
    empty_prompt_fraction: float = 0.0  # captions replaced by "" (Salesforce train.py's default is 0.2)
    noise_draws: int = 1  # (t, noise) draws per pair and epoch (the paper: 1; more = less gradient noise)
    cache_latents: bool = True  # offline: keep each pair's VAE latents (host memory) after their first use
    num_inner_epochs: int = 1  # passes over each collected batch
    # + sft_weight * beta * s * the winner's denoising error (RPO-style; 0 = the paper's loss): against
    # DPO raising the winner's error along with the loser's (benchmarks/results/dpo_shapes)
    sft_weight: float = 0.0


class DiffusionDPO:
    def __init__(self, config: DiffusionDPOConfig, policy, reward, sample, group=None):
        if config.pairs == "offline" and not config.data:
            raise UserError(
                "diffusion_dpo with pairs: offline needs strategy.data (a JSONL, Parquet or hub id)"
            )
        if config.pairs == "online" and config.share_initial_noise and sample.eta <= 0:
            raise UserError(
                "diffusion_dpo online pairs share x_T, so they differ only through the step noise: set "
                "sample.eta > 0 (or strategy.share_initial_noise: false)"
            )
        if not hasattr(policy.sampler, "training_target"):
            raise UserError(
                f"diffusion_dpo needs a DDIM or flow sampler, not {type(policy.sampler).__name__}"
            )
        self.config, self.policy, self.reward, self.sample = config, policy, reward, sample
        self.group = group or LocalGroup()
        self.num_inner_epochs = config.num_inner_epochs
        self.data = read_pairs(config.data, config.data_split) if config.pairs == "offline" else None
        self.order = PairOrder(len(self.data.pairs), seed=None) if self.data else None
        self.cache: dict[int, tuple[Tensor, Tensor]] = {}  # offline row -> (latents (2, ...), rewards (2,))
        self.bad: set[int] = set()  # offline pairs whose images did not decode
        self.ref: list[Tensor] | None = None  # the refreshed reference's LoRA weights (ref_update_every)
        self.steps = 0  # optimizer steps planned so far

    # --- collect -------------------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self, prompts: list[str], generator) -> dict:
        """len(prompts) images = len(prompts) // 2 pairs (online: len(prompts) // group_size). Pair k draws
        its empty-prompt coin, then noise_draws t's and noise seeds from generator 2k (group_size * k
        online)."""
        size = 2 if self.config.pairs == "offline" else self.config.group_size
        if len(prompts) < size or len(prompts) % size:
            raise UserError(
                f"diffusion_dpo: the samples per process ({len(prompts)}) must be a multiple of {size}"
            )
        every = per_sample_generators(generator, len(prompts), self.policy.backbone.device)
        gens = every[0::size]
        if self.config.pairs == "offline":
            if self.order.seed is None:  # the data order follows the run's seed, the same on every process
                # drawn from a copy of process 0's first generator: the pairs' own draws stay as they are
                draw = torch.Generator(gens[0].device)
                draw.set_state(gens[0].get_state())
                seed = torch.randint(0, 2**62, (1,), generator=draw, device=gens[0].device)
                self.order.seed = int(self.group.gather(seed)[0])
            batch = self._collect_offline(len(gens))
        else:
            batch = sample_groups(
                self, prompts, every, size, self.config.share_initial_noise, "diffusion_dpo"
            )
            batch = self._online_pairs(batch, size)
        keep = batch.pop("slots")
        gens = [gens[k] for k in keep]
        drop = [torch.rand((), generator=g, device=g.device).item() for g in gens]
        prompts = [
            "" if d < self.config.empty_prompt_fraction else p
            for p, d in zip(batch["pair_prompts"], drop, strict=True)
        ]
        backbone = self.policy.backbone
        embeds = backbone.encode_prompts(prompts or [""], guidance=False, size=image_size(self.sample))
        # noise_draws rows per pair, each with its own (t, noise): row j is pair j // noise_draws
        k = self.config.noise_draws
        batch["embeds"] = embeds[: len(prompts)].repeat_interleave(k)
        batch["x0"] = batch["x0"].repeat_interleave(k, 0)
        draws = [g for g in gens for _ in range(k)]
        batch["t"] = training_timesteps(self.policy.sampler, draws)
        batch["noise_seeds"] = noise_seeds(draws)
        total = self.group.gather(torch.tensor([len(keep)], device=backbone.device))
        batch["global_pairs"] = int(total.sum().item()) * k
        batch["metrics"]["preference/pairs"] = float(total.sum().item())
        return batch

    def _collect_offline(self, n: int) -> dict:
        rows = self.order.take(n * self.group.world_size)[self.group.rank * n : (self.group.rank + 1) * n]
        size = image_size(self.sample) or self.policy.backbone.default_size()
        fresh = [r for r in dict.fromkeys(rows) if r not in self.cache and r not in self.bad]
        loaded = self._load(fresh, size)
        if self.config.cache_latents:
            self.cache.update(loaded)
        entry = {r: loaded[r] if r in loaded else self.cache.get(r) for r in rows}
        slots = [s for s, r in enumerate(rows) if entry[r] is not None]
        latents = [entry[rows[s]][0] for s in slots]
        scores = torch.stack([entry[rows[s]][1] for s in slots]) if slots else torch.zeros(0, 2)
        return {
            "slots": slots,
            "pair_prompts": [self.data.pairs[rows[s]].prompt for s in slots],
            "x0": (torch.stack(latents) if latents else torch.zeros(0, 2, *self._latent_shape(size))).to(
                self.policy.backbone.device
            ),
            "reward": scores.flatten(),  # the configured reward on the data's images, winner first
            "metrics": {
                "preference/reward_agrees": (scores[:, 0] > scores[:, 1]).float().mean().item()
                if slots
                else 0.0,
                "preference/skipped_rows": float(len(self.data.skipped)),
            },
        }

    def _latent_shape(self, size) -> tuple[int, ...]:
        return self.policy.backbone.latent_shape(1, size)[1:]

    def _load(self, rows: list[int], size) -> dict[int, tuple[Tensor, Tensor]]:
        """{row: (latents (2, C, h, w) winner first, rewards (2,))} of offline pairs `rows`, VAE-encoded and
        scored sample.batch_size pairs at a time; a pair whose image does not decode is reported and left
        out."""
        backbone, out = self.policy.backbone, {}
        for start in range(0, len(rows), self.sample.batch_size):
            good, images = [], []
            for row in rows[start : start + self.sample.batch_size]:
                pair = self.data.pairs[row]
                try:
                    images += [load_image(item, size) for item in pair.images()]
                    good.append(row)
                except (BadImage, OSError) as e:  # OSError: a file removed after the data was read
                    self.bad.add(row)
                    self.data.skip(pair.where, str(e))
            if not good:
                continue
            pixels = torch.stack(images).to(backbone.device)
            # the posterior draw is fixed per image, whatever the chunking
            gens = [torch.Generator(backbone.device).manual_seed(2 * r + k) for r in good for k in (0, 1)]
            latents = backbone.encode(pixels, gens).float().view(len(good), 2, *self._latent_shape(size))
            prompts = [self.data.pairs[r].prompt for r in good for _ in (0, 1)]
            total, _ = self.reward.score(pixels, prompts)
            scores = total.detach().float().cpu().view(len(good), 2)
            out.update(
                {r: (latents[i].cpu(), scores[i]) for i, r in enumerate(good)}
            )  # cached in host memory
        return out

    def _online_pairs(self, batch: dict, size: int) -> dict:
        """Best vs worst of each group of `size` sampled images by the reward; groups without a spread
        give no pair."""
        reward = batch["reward"].view(-1, size)
        best, worst = reward.argmax(1), reward.argmin(1)
        decisive = (reward.max(1).values > reward.min(1).values).cpu()
        x0 = batch["latents"][:, -1].float()
        x0 = x0.view(len(reward), size, *x0.shape[1:])
        groups = torch.arange(len(reward), device=x0.device)
        pairs = torch.stack([x0[groups, best], x0[groups, worst]], 1)[decisive.to(x0.device)]
        slots = torch.arange(len(reward))[decisive].tolist()
        batch["metrics"]["preference/decisive_fraction"] = float(decisive.float().mean())
        return {
            "slots": slots,
            "pair_prompts": [batch["prompts"][k * size] for k in slots],
            "x0": pairs,
            "reward": batch["reward"],
            "metrics": batch["metrics"],
        }

    # --- plan ----------------------------------------------------------------------------------------
    def plan(self, batch: dict, batch_size: int, micro_batch_size: int, generator) -> list[list[dict]]:
        """Sizes count images (2 per pair); the "pairs" of a micro-batch are rows (a pair's noise draws).
        Every process plans the same number of optimizer steps (rows over all processes / rows per step)
        and spreads its own rows over them."""
        pairs_per_step = max(1, batch_size // 2) * self.config.noise_draws
        pairs_per_micro = max(1, micro_batch_size // 2)
        n_opt = max(1, batch["global_pairs"] // (pairs_per_step * self.group.world_size))
        order = torch.randperm(len(batch["x0"]), generator=generator)
        plan, counts = [], []
        for chunk in np.array_split(order.numpy(), n_opt):
            counts.append(len(chunk))
            step = self.steps + len(plan)
            refresh = self.config.ref_update_every > 0 and step % self.config.ref_update_every == 0
            # on every micro-batch of the step (the weights do not change within it), so the refresh happens
            # whichever runs first
            micros = weighted_micros(
                batch, torch.from_numpy(chunk).long(), pairs_per_micro, "pairs", refresh_reference=refresh
            )
            plan.append(micros)
        self.steps += len(plan)
        return global_shares(plan, counts, self.group, batch["x0"].device)

    def filler(self, micro: dict) -> dict:
        """Padding for a sharded denoiser: the first pair, or where this process has none (all its rows bad,
        or no group with a reward spread) a blank one: zero latents under the empty prompt."""
        batch, first = micro["batch"], torch.zeros(1, dtype=torch.long)
        if len(batch["x0"]) == 0:
            backbone, device = self.policy.backbone, batch["x0"].device
            size = image_size(self.sample) or backbone.default_size()
            batch = {
                "x0": torch.zeros(1, 2, *self._latent_shape(size), device=device),
                "t": training_timesteps(self.policy.sampler, [torch.Generator(device).manual_seed(0)]),
                "noise_seeds": [0],
                "embeds": backbone.encode_prompts([""], guidance=False, size=size),
            }
        return {"batch": batch, "pairs": first, "refresh_reference": micro.get("refresh_reference", False)}

    # --- loss ----------------------------------------------------------------------------------------
    def loss(self, micro: dict) -> tuple[Tensor, dict[str, float]]:
        cfg, batch, pairs = self.config, micro["batch"], micro["pairs"]
        if micro.get("refresh_reference"):
            self.ref = [p.detach().clone() for p in self.policy.parameters()]
        if len(pairs) == 0:
            return zero_loss(self.policy), {}
        x_t, t, target, embeds = self.noised_pairs(batch, pairs)
        output = self.policy.denoiser_output
        with torch.no_grad(), self._reference():  # before the policy: a weight swap must not meet a graph
            ref_error = squared_error(output(x_t, t, embeds), target)
        error = squared_error(output(x_t, t, embeds), target)
        p = len(pairs)
        losses, reward_w, reward_l = diffusion_dpo_loss(
            *(error[:p], error[p:], ref_error[:p], ref_error[p:]),
            *(cfg.beta, cfg.loss_type, cfg.beta_form, cfg.sft_weight),
        )
        margin = reward_w - reward_l
        return losses.mean(), {
            "implicit_accuracy": ((margin > 0).float() + 0.5 * (margin == 0).float()).mean().item(),
            "rewards/chosen": reward_w.mean().item(),
            "rewards/rejected": reward_l.mean().item(),
            "rewards/margin": margin.mean().item(),
            "model_mse": error.detach().mean().item(),
            "ref_mse": ref_error.mean().item(),
        }

    def noised_pairs(self, batch: dict, pairs: Tensor):
        """(x_t, t, target, embeds) of pairs `pairs`, winners first then losers (2p rows); each pair's two
        images share one noise (re-drawn from its seed) and one t."""
        x0 = batch["x0"][pairs.to(batch["x0"].device)]
        seeds = [batch["noise_seeds"][int(k)] for k in pairs]
        t = batch["t"][pairs].repeat(2).to(x0.device)
        x_t, target = forward_noised(self.policy.sampler, torch.cat([x0[:, 0], x0[:, 1]]), seeds * 2, t)
        embeds = batch["embeds"][pairs.to(batch["embeds"].cond.device)]
        return x_t.to(self.policy.backbone.dtype), t, target, PromptEmbeds.cat([embeds, embeds])

    def _reference(self):
        return self.policy.reference() if self.ref is None else self.policy.weights(self.ref)

    def state_dict(self) -> dict:
        return {
            "position": self.order.position if self.order else 0,
            "order_seed": self.order.seed if self.order else None,
            "bad": sorted(self.bad),
            "ref": None if self.ref is None else [r.cpu() for r in self.ref],
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        if self.order:
            self.order.position, self.order.seed = int(state["position"]), state["order_seed"]
        self.bad = set(state["bad"])
        device = self.policy.backbone.device
        self.ref = None if state["ref"] is None else [r.to(device) for r in state["ref"]]
        self.steps = int(state["steps"])
