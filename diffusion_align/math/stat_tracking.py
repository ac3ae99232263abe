"""Reward -> advantage normalisations: DDPO's per-prompt buffers (ddpo-pytorch `PerPromptStatTracker`,
anchors §2.1) and GRPO's groups of one batch (flow_grpo `stat_tracking.py`, anchors §2.5).

DDPO: each prompt keeps a deque of its last `buffer_size` rewards. After this batch's rewards are appended,
a prompt with at least `min_count` stored rewards is normalised by its own mean/std; otherwise by the batch
mean/std. std is the population std; advantages are (r - mean) / (std + 1e-6).
"""

from __future__ import annotations

from collections import deque

import numpy as np

EPS = 1e-6
GROUP_EPS = 1e-4  # flow_grpo's


class PerPromptStatTracker:
    def __init__(self, buffer_size: int = 16, min_count: int = 16):
        if min_count > buffer_size:
            raise ValueError(f"min_count={min_count} can never be reached with buffer_size={buffer_size}")
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards) -> tuple[np.ndarray, float]:
        """Advantages (N,) float32 for the global batch; also the share of samples normalised per prompt."""
        rewards = np.asarray(rewards, dtype=np.float64).reshape(-1)
        prompts = np.asarray(prompts, dtype=object)
        if len(prompts) != len(rewards):
            raise ValueError(f"{len(prompts)} prompts for {len(rewards)} rewards")
        batch_mean, batch_std = rewards.mean(), rewards.std()
        advantages = np.empty_like(rewards)
        per_prompt = 0
        for prompt in dict.fromkeys(prompts.tolist()):  # first-seen order, deterministic
            rows = prompts == prompt
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[rows].tolist())
            if len(buffer) >= self.min_count:
                mean, std = np.mean(buffer), np.std(buffer)
                per_prompt += int(rows.sum())
            else:
                mean, std = batch_mean, batch_std
            advantages[rows] = (rewards[rows] - mean) / (std + EPS)
        return advantages.astype(np.float32), per_prompt / max(1, len(rewards))

    def state_dict(self) -> dict:
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {p: list(b) for p, b in self.buffers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {p: deque(v, maxlen=self.buffer_size) for p, v in state["buffers"].items()}


def group_advantages(prompts: list[str], rewards, global_std: bool = False) -> np.ndarray:
    """GRPO (Flow-GRPO): (r - mean of the prompt's rewards in this batch) / (std + 1e-4), the std being the
    prompt's own (population) or, with `global_std`, the whole batch's. Returns (N,) float32."""
    rewards = np.asarray(rewards, dtype=np.float64).reshape(-1)
    prompts = np.asarray(prompts, dtype=object)
    advantages = np.empty_like(rewards)
    for prompt in dict.fromkeys(prompts.tolist()):
        rows = prompts == prompt
        std = rewards.std() if global_std else rewards[rows].std()
        advantages[rows] = (rewards[rows] - rewards[rows].mean()) / (std + GROUP_EPS)
    return advantages.astype(np.float32)
