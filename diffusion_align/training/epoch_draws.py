"""Randomness of a training run, derived, not carried: sample j of epoch e draws its noise from its own
generator seeded from (train.seed, e, j), and the epoch's prompts from (train.seed, e). So noise never
repeats across processes or epochs, a run gives the same samples whatever the number of processes, and a
resume is exact without saving generator states."""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from keys (train.seed, epoch, sample index, ...); distinct keys, unrelated seeds."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


def epoch_prompts(prompts: list[str], seed: int, epoch: int, samples: int, rank: int, local: int):
    """Process `rank`'s `local` prompts of `epoch`: the global `samples` are drawn uniformly with replacement
    (DDPO); process r owns global samples r*local .. (r+1)*local-1."""
    rng = np.random.default_rng(derive_seed(seed, epoch, 1))
    chosen = rng.integers(len(prompts), size=samples)
    return [prompts[i] for i in chosen[rank * local : (rank + 1) * local]]


def sample_generators(seed: int, epoch: int, rank: int, local: int, device) -> list[torch.Generator]:
    """One noise stream per sample of process `rank`, keyed by its global index in the epoch."""
    first = rank * local
    seeds = [derive_seed(seed, epoch, 2, j) for j in range(first, first + local)]
    return [torch.Generator(device).manual_seed(s) for s in seeds]


def plan_generator(seed: int, epoch: int, inner: int, rank: int) -> torch.Generator:
    """The draws of a strategy's plan (shuffles, trained steps) for one inner epoch on one process."""
    return torch.Generator().manual_seed(derive_seed(seed, epoch, 3, inner, rank))
