"""Weighted sums of rewards, with optional per-reward normalisation, keeping every component for logging.
`Combined` is the one reward object that training, ReNO, search and `score` use (see its docstring).

    total, parts = weighted_sum({"aesthetic": r1, "jpeg": r2}, images, prompts, weights={"jpeg": 0.1})

`parts` holds each reward's raw `(B,)` scores (before normalisation and weighting), so a trainer can log
them. Normalisers bring rewards of different scales together before weighting:
- `"running"`: `(r - mean) / std` with the mean/std of every score seen so far (updated on each call,
  before normalising, so the first batch is already centred);
- `("fixed", shift, scale)` or a number `scale`: `(r - shift) / scale`, e.g. PickScore's `/ 26` in flow_grpo.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from rewards.base import Reward
from rewards.errors import RewardError


class RunningNorm(nn.Module):
    """`(r - mean) / (std + eps)` with the running mean/std of all scores seen (Welford, float64)."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("m2", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, r: torch.Tensor) -> None:
        x = r.detach().double().flatten().to(self.mean.device)
        n, mean, m2 = x.numel(), x.mean(), ((x - x.mean()) ** 2).sum()
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.count * n / total
        self.count.copy_(total)

    @property
    def std(self) -> torch.Tensor:
        return (self.m2 / self.count.clamp(min=1)).sqrt()

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        self.update(r)
        mean, std = self.mean.to(r.device, r.dtype), self.std.to(r.device, r.dtype)
        return (r - mean) / (std + self.eps)


class FixedNorm(nn.Module):
    """`(r - shift) / scale`."""

    def __init__(self, shift: float = 0.0, scale: float = 1.0):
        super().__init__()
        if scale == 0:
            raise RewardError("fixed reward normalisation needs a non-zero scale")
        self.shift, self.scale = float(shift), float(scale)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return (r - self.shift) / self.scale


def make_normalizer(spec) -> nn.Module | None:
    """None/"none" -> None; "running" -> RunningNorm; number s -> FixedNorm(0, s); ("fixed", shift, scale)."""
    if spec is None or spec == "none":
        return None
    if spec == "running":
        return RunningNorm()
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return FixedNorm(0.0, spec)
    if isinstance(spec, (tuple, list)) and len(spec) == 3 and spec[0] == "fixed":
        return FixedNorm(spec[1], spec[2])
    if isinstance(spec, nn.Module):
        return spec
    raise RewardError(
        f"unknown reward normalisation {spec!r}: use 'none', 'running', a scale, or ('fixed', shift, scale)"
    )


def weighted_sum(
    rewards: Mapping[str, nn.Module],
    images: torch.Tensor,
    prompts: list[str],
    weights: Mapping[str, float] | None = None,
    normalizers: Mapping[str, nn.Module | None] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`sum_i w_i * norm_i(r_i(images, prompts))` -> (total `(B,)` float32, {name: raw `(B,)` scores}).

    Missing weights default to 1, missing normalisers to none.
    """
    weights = dict(weights or {})
    unknown = set(weights) - set(rewards)
    if unknown:
        raise RewardError(f"weights for unknown rewards {sorted(unknown)}; rewards are {sorted(rewards)}")
    normalizers = normalizers or {}
    total = None
    parts: dict[str, torch.Tensor] = {}
    for name, reward in rewards.items():
        r = reward(images, prompts).float()
        parts[name] = r
        norm = normalizers.get(name)
        term = float(weights.get(name, 1.0)) * (norm(r) if norm is not None else r)
        total = term if total is None else total + term.to(total.device)
    if total is None:
        raise RewardError("weighted_sum needs at least one reward")
    return total, parts


class FunctionReward(Reward):
    """A plain `(images, prompts) -> (B,)` callable (a reward may be one, see `rewards.build`) as a module;
    differentiable only if the callable says so with a `differentiable` attribute."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.name = getattr(fn, "name", getattr(fn, "__name__", "reward"))
        self.differentiable = bool(getattr(fn, "differentiable", False))

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.fn(images, prompts)


class Combined(Reward):
    """The one reward object from config to loss: a weighted sum of named rewards, each optionally normalised.

        c = Combined({"aesthetic": r1, "jpeg": r2}, weights={"jpeg": 0.1}, normalize={"aesthetic": "running"})
        total, parts = c.score(images, prompts)   # (B,) and {name: raw (B,)}; updates running normalisers
        c(images, prompts)                        # the total alone, as any `Reward`
        c.components(images, prompts)             # raw scores, normalisers untouched (evaluation)
        c.raw_total(parts)                        # the weighted sum of raw scores, without normalisation

    `differentiable` is True only if every component is; `non_differentiable` names the others. A mix
    with a non-differentiable part returns a detached total, so the flag stays truthful: a gradient that
    silently ignores some terms would bias reward backprop. With `record = True` every `score` call's
    detached total and components are kept until `take()` (the trainer logs them per epoch). The last
    call's raw components are also in `last_components`.
    """

    name = "combined"

    def __init__(
        self,
        rewards: Mapping[str, nn.Module],
        weights: Mapping[str, float] | None = None,
        normalize: str | float | Mapping | None = None,
        record: bool = False,
    ):
        super().__init__()
        self.rewards = nn.ModuleDict(
            {n: r if isinstance(r, nn.Module) else FunctionReward(r) for n, r in rewards.items()}
        )
        self.weights = {n: float((weights or {}).get(n, 1.0)) for n in self.rewards}
        if weights and set(weights) - set(self.rewards):
            raise RewardError(f"weights for unknown rewards {sorted(set(weights) - set(self.rewards))}")
        per = normalize if isinstance(normalize, Mapping) else {n: normalize for n in self.rewards}
        self.normalizers = nn.ModuleDict(
            {n: m for n in self.rewards if (m := make_normalizer(per.get(n))) is not None}
        )
        self.non_differentiable = [
            n for n, r in self.rewards.items() if not getattr(r, "differentiable", False)
        ]
        self.differentiable = not self.non_differentiable
        self.last_components: dict[str, torch.Tensor] = {}
        self.record = record
        self._calls: list[dict[str, torch.Tensor]] = []
        self.freeze()

    @property
    def names(self) -> list[str]:
        return list(self.rewards)

    def score(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted total (B,) float32, {name: raw (B,) scores}); running normalisers see these scores."""
        total, parts = weighted_sum(self.rewards, images, prompts, self.weights, dict(self.normalizers))
        total = total if self.differentiable else total.detach()
        self.last_components = {n: p.detach() for n, p in parts.items()}
        if self.record:
            self._calls.append({"total": total.detach(), **self.last_components})
        return total, parts

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.score(images, prompts)[0]

    def components(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Raw scores of every component, {name: (B,) float32}; no normaliser update, nothing recorded."""
        return {name: r(images, prompts).float() for name, r in self.rewards.items()}

    def raw_total(self, components: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of raw `components` (no normalisation), comparable across a run."""
        return sum(self.weights[name] * components[name] for name in self.names)

    def take(self) -> dict[str, torch.Tensor]:
        """The recorded calls since the last `take`, concatenated: {"total" | name: (N,)}; {} if none."""
        calls, self._calls = self._calls, []
        if not calls:
            return {}
        return {k: torch.cat([c[k].float().flatten() for c in calls]) for k in calls[0]}

    # The component models are fixed, loaded weights; a checkpoint needs only the running statistics.
    def state_dict(self, *args, **kwargs) -> dict:
        """The normalisers' running statistics ({} when none is running), for checkpoints."""
        return self.normalizers.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping, strict: bool = True, assign: bool = False):
        return self.normalizers.load_state_dict(state_dict, strict=strict, assign=assign)
