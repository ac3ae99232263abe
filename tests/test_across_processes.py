"""What processes agree on, with another process stood in by a group whose gathers add its share: the
padding of a sharded step, and reward statistics when processes hold different numbers of rewards."""

import pytest
import torch

from diffusion_align.errors import UserError
from diffusion_align.methods.distributed import LocalGroup
from diffusion_align.training.across_processes import equal_micro_counts, reward_metrics


def test_padding_drops_empty_micro_batches_and_fills_up_to_the_other_processes_count():
    class Group(LocalGroup):  # another process planned 3 micro-batches for this step
        def gather(self, tensor):
            return torch.cat([tensor, torch.tensor([3])])

    class Strategy:
        def filler(self, micro):
            return {"rows": "first", "of": micro["rows"]}

    step = [{"rows": "a", "weight": 0.6}, {"rows": "", "weight": 0.0}, {"rows": "b", "weight": 0.4}]
    micros, added = equal_micro_counts(step, Strategy(), Group(), "cpu")
    assert added == 1 and [m["rows"] for m in micros] == ["a", "b", "first"]
    assert micros[2] == {"rows": "first", "of": "a", "weight": 0.0, "filler": True}
    alone, added = equal_micro_counts([{"rows": "", "weight": 0.0}], Strategy(), LocalGroup(), "cpu")
    assert added == 1 and [m["rows"] for m in alone] == ["first"]  # every step keeps one micro-batch


class TwoProcesses(LocalGroup):
    """This process and another whose recorded rewards are `other`."""

    def __init__(self, other: dict):
        self.other = other

    def gather_object(self, items):
        return [*items, self.other]


def test_reward_statistics_pool_every_process_even_with_unequal_counts_or_a_missing_component():
    """This process scored 3 offline pairs' images, the other none of its own (all its rows bad): the
    statistics are those of the pooled values, computed here by hand."""
    mine = {"shapes_color_soft": torch.tensor([0.5, 1.0, 0.0]), "total": torch.tensor([0.5, 1.0, 0.0])}
    other = {"total": [0.25]}
    metrics = reward_metrics(mine, TwoProcesses(other), epoch=0)
    pooled = [0.5, 1.0, 0.0, 0.25]
    mean = sum(pooled) / 4
    std = (sum((v - mean) ** 2 for v in pooled) / 3) ** 0.5
    assert metrics["reward/mean"] == pytest.approx(mean) and metrics["reward/std"] == pytest.approx(std)
    assert metrics["reward/shapes_color_soft"] == pytest.approx(0.5)


def test_a_non_finite_reward_on_another_process_stops_the_run_here_too():
    with pytest.raises(UserError, match="non-finite reward at epoch 2: total reward has 1 non-finite value"):
        reward_metrics({"total": torch.tensor([1.0])}, TwoProcesses({"total": [float("nan")]}), epoch=1)


def test_micro_batch_weights_become_shares_of_the_steps_rows_on_every_process():
    """Two steps; this process holds 1 and 3 of their rows, the other 3 and 0 (stood in by the gather).
    Averaged over the two processes, the weights must give every row of a step the same share of it, as
    one process holding all of them would: 1/4 in step 1, 1/3 in step 2."""
    from diffusion_align.methods.strategies.sampling import global_shares

    class Group(LocalGroup):
        world_size = 2

        def gather(self, tensor):
            return torch.cat([tensor, torch.tensor([3, 0])])

    plan = [[{"weight": 1.0}], [{"weight": 2 / 3}, {"weight": 1 / 3}]]  # shares of this process's rows
    shared = global_shares(plan, [1, 3], Group(), "cpu")
    per_row = [shared[0][0]["weight"] / 2, shared[1][0]["weight"] / 2 / 2, shared[1][1]["weight"] / 2]
    assert per_row == pytest.approx([1 / 4, 1 / 3, 1 / 3])
    assert global_shares([[{"weight": 0.5}]], [2], LocalGroup(), "cpu") == [[{"weight": 0.5}]]
