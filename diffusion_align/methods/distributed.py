"""What strategies need to know about other processes: gather tensors and strings across ranks.

Strategies compute statistics (per-prompt reward mean/std, preferences) over the whole global batch,
then keep their own rank's slice. `LocalGroup` is the one-process case; the trainer passes an
`AccelerateGroup`. Every rank must hold the same number of samples (rank r owns rows r*B:(r+1)*B).
"""

from __future__ import annotations

import torch


class LocalGroup:
    rank = 0
    world_size = 1

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """(B, ...) on this rank -> (world_size*B, ...) in rank order."""
        return tensor

    def gather_object(self, items: list) -> list:
        """A list on this rank -> the concatenation of every rank's list, in rank order."""
        return list(items)

    def local(self, gathered: torch.Tensor | list):
        """This rank's rows of something `gather`ed."""
        n = len(gathered) // self.world_size
        return gathered[self.rank * n : (self.rank + 1) * n]


class AccelerateGroup(LocalGroup):
    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.rank = accelerator.process_index
        self.world_size = accelerator.num_processes

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(tensor.contiguous())

    def gather_object(self, items: list) -> list:
        if self.world_size == 1:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(list(items))
