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

The sampling helpers at the bottom are shared by the other likelihood-based strategies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion_align.backbones.stable_diffusion import PromptEmbeds
from diffusion_align.distributed import LocalGroup
from diffusion_align.errors import UserError
from diffusion_align.losses import clip_advantages, gaussian_kl_step, ppo_clip_loss
from diffusion_align.rollout import rollout
from diffusion_align.samplers import gaussian_log_prob
from diffusion_align.stat_tracking import PerPromptStatTracker


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


class DDPO:
    def __init__(self, config: DDPOConfig, policy, reward, sample, group=None):
        if sample.eta <= 0:
            raise ValueError("DDPO needs sample.eta > 0 (with eta = 0 the transition log-prob is undefined)")
        for name in ("timestep_fraction", "timestep_window"):
            if not 0 < getattr(config, name) <= 1:
                raise UserError(f"DDPO {name}={getattr(config, name)} must be in (0, 1]")
        if config.group_size < 1:
            raise UserError(f"DDPO group_size={config.group_size} must be at least 1")
        self.config, self.policy, self.reward, self.sample = config, policy, reward, sample
        self.group = group or LocalGroup()
        self.num_inner_epochs = config.num_inner_epochs
        self.tracker = PerPromptStatTracker(config.stat_buffer_size, config.stat_min_count)

    # --- collect -------------------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self, prompts: list[str], generator) -> dict:
        cfg = self.config
        batch = sample_groups(self, prompts, generator, cfg.group_size, cfg.share_initial_noise, "DDPO")
        prompts = batch["prompts"]
        rewards = self.group.gather(batch["reward"].float())
        every_prompt = self.group.gather_object(list(prompts))
        if self.config.per_prompt_stat_tracking:
            adv, per_prompt = self.tracker.update(every_prompt, rewards.cpu().numpy())
            adv = torch.from_numpy(adv).to(rewards.device)
        else:
            adv, per_prompt = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-6), 0.0
        adv = clip_advantages(self.group.local(adv), self.config.adv_clip_max)
        batch["advantages"] = adv
        batch["metrics"].update(
            {
                "advantage/mean": adv.mean().item(),
                "advantage/std": adv.std().item() if adv.numel() > 1 else 0.0,
                "advantage/abs_mean": adv.abs().mean().item(),
                "advantage/per_prompt_fraction": float(per_prompt),
            }
        )
        return batch

    # --- plan ----------------------------------------------------------------------------------------
    def plan(self, batch: dict, batch_size: int, micro_batch_size: int, generator) -> list[list[dict]]:
        n, num_steps = batch["log_probs"].shape
        cfg = self.config
        order = torch.randperm(n, generator=generator)
        step_order = trained_steps(n, num_steps, cfg.timestep_window, cfg.timestep_fraction, generator)
        trained = step_order.shape[1]
        plan = []
        for rows in step_rows(order, batch_size):
            micros = []
            for m in range(0, len(rows), micro_batch_size):
                r = rows[m : m + micro_batch_size]
                for j in range(trained):  # ddpo-pytorch: inner loop over the sample's shuffled steps
                    micros.append(
                        {
                            "batch": batch,
                            "rows": r,
                            "steps": step_order[r, j],
                            "weight": len(r) / (len(rows) * trained),
                        }
                    )
            plan.append(micros)
        return plan

    # --- loss ----------------------------------------------------------------------------------------
    def loss(self, micro: dict) -> tuple[Tensor, dict[str, float]]:
        cfg, s, batch = self.config, self.sample, micro["batch"]
        x_t, x_prev, t, embeds = transition_inputs(batch, micro["rows"], micro["steps"])
        mean, std = self.policy.transition(x_t, t, embeds, s.guidance_scale, s.num_steps)
        log_prob = gaussian_log_prob(x_prev, mean, std)
        rows, steps = _on(micro["rows"], x_t), _on(micro["steps"], x_t)
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
            kl = gaussian_kl_step(mean, ref_mean, std).mean()
            loss = loss + cfg.beta * kl
            metrics["kl"] = kl.item()
        return loss, metrics

    def state_dict(self) -> dict:
        return {"tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state["tracker"])


# --- shared sampling glue ----------------------------------------------------------------------------
def grouped_prompts(prompts: list[str], size: int, who: str) -> list[str]:
    """Group g is prompts[g * size] repeated `size` times (each image still gets its own noise)."""
    if len(prompts) % size:
        raise UserError(
            f"{who}: samples per process ({len(prompts)}) must be a multiple of strategy.group_size={size}"
        )
    return [p for p in prompts[0::size] for _ in range(size)]


def sample_groups(strategy, prompts: list[str], generator, size: int, share_noise: bool, who: str) -> dict:
    """`sample_batch` of groups: prompts[g * size] repeated `size` times, each image with its own step noise
    and, unless `share_noise`, its own x_T."""
    grouped = grouped_prompts(prompts, size, who)
    gens = per_sample_generators(generator, len(grouped), strategy.policy.backbone.device)
    x_T = shared_initial_noise(strategy.policy, strategy.sample, gens, size) if share_noise else None
    return sample_batch(strategy.policy, strategy.reward, strategy.sample, grouped, gens, x_T)


def shared_initial_noise(policy, sample, gens: list, size: int) -> Tensor:
    """x_T (N, C, h, w) shared by each run of `size` consecutive samples (D3PO's pairs, DanceGRPO's
    init_same_noise): drawn from the run's first generator, which then also draws that sample's step noise."""
    backbone = policy.backbone
    x_T = [backbone.initial_noise(1, [g], image_size(sample)) for g in gens[0::size]]
    return torch.cat(x_T).repeat_interleave(size, 0)


def window_steps(num_steps: int, window: float) -> int:
    """How many leading (noisiest) steps of a `num_steps` chain a `timestep_window` share covers (>= 1)."""
    return max(1, round(num_steps * window))


def trained_steps(count: int, num_steps: int, window: float, fraction: float, generator) -> Tensor:
    """(count, trained) step indices: for each sample its own random permutation of the first `window` share
    of the chain's steps (noisiest first), cut to `fraction` of them."""
    usable = window_steps(num_steps, window)
    trained = max(1, int(usable * fraction))
    perms = [torch.randperm(usable, generator=generator)[:trained] for _ in range(count)]
    return torch.stack(perms) if perms else torch.zeros(0, trained, dtype=torch.long)


def per_sample_generators(generator, n: int, device) -> list[torch.Generator]:
    """One noise stream per sample (the trainer passes such a list); a single generator is split into n seeds,
    so a sample's noise never depends on how the batch is chunked."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise ValueError(f"{len(generator)} generators for {n} samples")
        return list(generator)
    seeds = torch.randint(0, 2**62, (n,), generator=generator).tolist()
    return [torch.Generator(device).manual_seed(s) for s in seeds]


def encode(policy, sample, prompts: list[str]) -> PromptEmbeds:
    return policy.backbone.encode_prompts(
        prompts, sample.negative_prompt, guidance=sample.guidance_scale > 1, size=image_size(sample)
    )


def image_size(sample) -> tuple[int, int] | None:
    return (sample.height, sample.width) if sample.height and sample.width else None


@torch.no_grad()
def sample_batch(
    policy,
    reward,
    sample,
    prompts: list[str],
    generator,
    x_T: Tensor | None = None,
    keep_images: bool = False,
) -> dict:
    """Rollouts of `prompts` in chunks of sample.batch_size, scored by `reward`.

    Returns {"prompts", "embeds": PromptEmbeds (N, ...), "latents": (N, S+1, C, h, w), "log_probs": (N, S),
    "timesteps": (S,), "reward": (N,), "components": {name: (N,)}, "metrics": {...}}. `x_T` (N, C, h, w)
    overrides the initial noise (D3PO pairs); otherwise each sample's generator draws it first. `keep_images`
    adds "images" (N, 3, H, W) in [0, 1].
    """
    backbone, n = policy.backbone, len(prompts)
    gens = per_sample_generators(generator, n, backbone.device)
    embeds, latents, log_probs, totals, parts, images = [], [], [], [], [], []
    for start in range(0, n, sample.batch_size):
        chunk = slice(start, min(n, start + sample.batch_size))
        chunk_prompts, chunk_gens = prompts[chunk], gens[chunk]
        e = encode(policy, sample, chunk_prompts)
        noise = (
            backbone.initial_noise(len(chunk_prompts), chunk_gens, image_size(sample))
            if x_T is None
            else x_T[chunk]
        )
        traj = rollout(
            backbone,
            policy.sampler,
            e,
            noise,
            sample.num_steps,
            sample.guidance_scale,
            sample.eta,
            generator=chunk_gens,
        )
        total, components = reward(traj.images, chunk_prompts)
        embeds.append(e)
        latents.append(traj.latents)
        log_probs.append(traj.log_probs)
        if keep_images:
            images.append(traj.images)
        totals.append(total.detach().float())
        parts.append({k: v.detach().float() for k, v in components.items()})
        timesteps = traj.timesteps
    total = torch.cat(totals)
    components = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    metrics = {"reward_mean": total.mean().item(), "reward_std": total.std().item() if n > 1 else 0.0}
    metrics.update({f"reward_{k}": v.mean().item() for k, v in components.items()})
    batch = {
        "prompts": list(prompts),
        "embeds": PromptEmbeds.cat(embeds),
        "latents": torch.cat(latents),
        "log_probs": torch.cat(log_probs) if log_probs[0] is not None else None,
        "timesteps": timesteps,
        "reward": total,
        "components": components,
        "metrics": metrics,
    }
    if keep_images:
        batch["images"] = torch.cat(images)
    return batch


def step_rows(order: Tensor, batch_size: int) -> list[Tensor]:
    """Consecutive full batches of `order` (a remainder smaller than batch_size is dropped, as in DDPO);
    the whole of `order` when it holds less than one batch."""
    if len(order) < batch_size:
        return [order]
    return [order[s : s + batch_size] for s in range(0, len(order) - batch_size + 1, batch_size)]


def transition_inputs(batch: dict, rows: Tensor, steps: Tensor):
    """Stored (x_t, x_prev, t, embeds) of samples `rows`, each at its own step index `steps`."""
    latents = batch["latents"]
    r, s = _on(rows, latents), _on(steps, latents)
    t = batch["timesteps"].to(latents.device)[s]
    return latents[r, s], latents[r, s + 1], t, batch["embeds"][r]


def _on(index: Tensor, like: Tensor) -> Tensor:
    return index.to(like.device)
