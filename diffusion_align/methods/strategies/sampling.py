"""Sampling glue shared by every strategy: prompt groups, shared initial noise, per-sample generators, the
no-grad rollouts of a batch (`sample_batch`), step plans, and the stored transitions a loss re-scores.

Strategies import from here and from `losses`/`samplers`, never from each other (tests/test_architecture.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_align.engine.backbones.stable_diffusion import PromptEmbeds
from diffusion_align.engine.rollout import generate
from diffusion_align.errors import UserError


def grouped_prompts(prompts: list[str], size: int, who: str) -> list[str]:
    """Group g is prompts[g * size] repeated `size` times (each image still gets its own noise)."""
    if len(prompts) % size:
        raise UserError(
            f"{who}: samples per process ({len(prompts)}) must be a multiple of strategy.group_size={size}"
        )
    return [p for p in prompts[0::size] for _ in range(size)]


def sample_groups(
    strategy, prompts: list[str], generator, size: int, share_noise: bool, who: str, eta=None
) -> dict:
    """`sample_batch` of groups: prompts[g * size] repeated `size` times, each image with its own step noise
    and, unless `share_noise`, its own x_T."""
    grouped = grouped_prompts(prompts, size, who)
    gens = per_sample_generators(generator, len(grouped), strategy.policy.backbone.device)
    x_T = shared_initial_noise(strategy.policy, strategy.sample, gens, size) if share_noise else None
    return sample_batch(strategy.policy, strategy.reward, strategy.sample, grouped, gens, x_T, eta=eta)


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


def noise_seeds(gens: list[torch.Generator]) -> list[int]:
    """One seed per sample, drawn from its generator after sampling: the noise a loss re-draws for that sample
    (the same whatever the micro-batching)."""
    return [int(torch.randint(0, 2**62, (), generator=g, device=g.device)) for g in gens]


def training_timesteps(sampler, gens: list[torch.Generator]) -> Tensor:
    """One forward-process t per generator, uniform over the training timesteps (the denoising objective):
    U{0..T-1} for DDIM models; U[0, T) for flow samplers, whose sigma = t / T is then uniform in [0, 1)."""
    train_steps = sampler.scheduler.config.num_train_timesteps
    draws = torch.tensor([torch.rand((), generator=g, device=g.device).item() for g in gens])
    if hasattr(sampler, "sigma_at"):
        return draws.float() * train_steps
    return (draws * train_steps).long().clamp(max=train_steps - 1)


def forward_noised(sampler, x0: Tensor, seeds: list[int], t: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, target) of latents x0 (N, ...): noise drawn from each row's seed (the same whatever the
    micro-batching), x_t = sampler.add_noise(x0, noise, t), and the denoiser's training target there."""
    device = x0.device
    noise = torch.stack(
        [
            torch.randn(x0.shape[1:], generator=torch.Generator(device).manual_seed(s), device=device)
            for s in seeds
        ]
    )
    t = t.to(device)
    return sampler.add_noise(x0, noise, t), sampler.training_target(x0, noise, t)


def squared_error(prediction: Tensor, target: Tensor) -> Tensor:
    """(B,) mean over the latent dims of (prediction - target)^2, in float32 (the denoising loss)."""
    return ((prediction.float() - target.float()) ** 2).mean(dim=tuple(range(1, target.ndim)))


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
    eta=None,
) -> dict:
    """Rollouts of `prompts` in chunks of sample.batch_size, scored by `reward`.

    Returns {"prompts", "embeds": PromptEmbeds (N, ...), "latents": (N, S+1, C, h, w), "log_probs": (N, S),
    "timesteps": (S,), "reward": (N,), "components": {name: (N,)}, "metrics": {...}}. `x_T` (N, C, h, w)
    overrides the initial noise (D3PO pairs); otherwise each sample's generator draws it first. `keep_images`
    adds "images" (N, 3, H, W) in [0, 1]; `eta` overrides sample.eta (a per-step list: a windowed SDE).
    """
    backbone, n = policy.backbone, len(prompts)
    gens = per_sample_generators(generator, n, backbone.device)
    embeds, latents, log_probs, totals, parts, images = [], [], [], [], [], []
    for start in range(0, n, sample.batch_size):
        chunk = slice(start, min(n, start + sample.batch_size))
        chunk_prompts, chunk_gens = prompts[chunk], gens[chunk]
        e, traj = generate(
            backbone, policy.sampler, chunk_prompts, chunk_gens, sample.num_steps, sample.guidance_scale,
            sample.eta if eta is None else eta, sample.negative_prompt, image_size(sample),
            None if x_T is None else x_T[chunk],
        )  # fmt: skip
        total, components = reward.score(traj.images, chunk_prompts)
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


def weighted_micros(batch: dict, rows: Tensor, micro_size: int, key: str = "rows", **extra) -> list[dict]:
    """One optimizer step's micro-batches: `rows` `micro_size` at a time, each {"batch", key: its rows,
    **extra, "weight": its share of the step}. A step without rows is one empty micro-batch (weight 0), so
    every process still runs the step (its loss is a zero with a graph)."""
    micros = [
        {"batch": batch, key: rows[m : m + micro_size], **extra} for m in range(0, len(rows), micro_size)
    ]
    micros = micros or [{"batch": batch, key: rows, **extra}]
    for micro in micros:
        micro["weight"] = len(micro[key]) / max(1, len(rows))
    return micros


def global_shares(plan: list[list[dict]], counts: list[int], group, device) -> list[list[dict]]:
    """`plan` with each micro-batch's weight turned from its share of this process's `counts[s]` rows of step
    s into its share of the step's rows on all processes, times the number of processes: the trainer
    averages the processes' gradients, so this makes the step the mean over the global batch (the
    one-process step) however unevenly the rows are spread (decisive pairs, filtered advantages). With one
    process, or equal counts, the weights stay as they are."""
    if group.world_size == 1:
        return plan
    totals = group.gather(torch.tensor(counts, device=device)).view(group.world_size, -1).sum(0).tolist()
    for micros, local, total in zip(plan, counts, totals, strict=True):
        scale = group.world_size * local / total if total else 0.0
        for micro in micros:
            micro["weight"] *= scale
    return plan


def zero_loss(policy) -> Tensor:
    """The loss of a micro-batch with nothing to learn: a zero with a graph in the LoRA, so `backward` and
    the gradient all-reduce work on every process."""
    return sum(p.sum() * 0.0 for p in policy.parameters())


def per_step_micros(batch: dict, rows: Tensor, step_order: Tensor, micro_size: int, key: str) -> list[dict]:
    """One optimizer step's micro-batches when each sample trains on several of its steps: for each chunk of
    `micro_size` of `rows`, one micro per trained step j (chunk-major, as ddpo-pytorch loops), with the
    chunk's `key` (rows or pairs), steps `step_order[chunk, j]` and weight = its share of the step. A step
    without rows is one empty micro-batch (weight 0), as in `weighted_micros`."""
    if len(rows) == 0:
        return [{"batch": batch, key: rows, "steps": rows, "weight": 0.0}]
    trained = step_order.shape[1]
    micros = []
    for m in range(0, len(rows), micro_size):
        chunk = rows[m : m + micro_size]
        weight = len(chunk) / (len(rows) * trained)
        micros += [
            {"batch": batch, key: chunk, "steps": step_order[chunk, j], "weight": weight}
            for j in range(trained)
        ]
    return micros


def transition_inputs(batch: dict, rows: Tensor, steps: Tensor):
    """Stored (x_t, x_prev, t, embeds) of samples `rows`, each at its own step index `steps`."""
    latents = batch["latents"]
    r, s = _on(rows, latents), _on(steps, latents)
    t = batch["timesteps"].to(latents.device)[s]
    return latents[r, s], latents[r, s + 1], t, batch["embeds"][r]


def with_reference(policy, x_t: Tensor, t: Tensor, embeds, sample, eta: float | None = None):
    """(mean, ref_mean, std) of p(x_prev | x_t): the policy's (with gradient) and the reference's (the base
    model, adapter off, no gradient) at the same x_t; `policy.sampler.kl(mean, ref_mean, std)` is the
    per-step KL(pi_theta || pi_ref) that DDPO's `beta` weighs. `eta`: the noise level (None: sampling's)."""
    mean, std = policy.transition(x_t, t, embeds, sample.guidance_scale, sample.num_steps, eta)
    with torch.no_grad(), policy.reference():
        ref_mean, _ = policy.transition(x_t, t, embeds, sample.guidance_scale, sample.num_steps, eta)
    return mean, ref_mean, std


def _on(index: Tensor, like: Tensor) -> Tensor:
    return index.to(like.device)
