"""FSDP2 sharding of the frozen denoiser (`model.shard: fsdp`): each process keeps 1/N of the base weights.

`shard_denoiser` calls PyTorch's `fully_shard` on every block of the denoiser (UNet down/mid/up blocks,
transformer blocks of SD3/FLUX/Wan), then on the denoiser itself: a block's full weights exist only while
it runs (all-gathered before its forward and again before its backward, freed after), on CUDA/NCCL and
CPU/gloo alike. Every process must therefore call the denoiser the same number of times, in the same order.

The LoRA stays replicated, outside FSDP (`ignored_params`): it is a few megabytes, so sharding it would save
nothing that matters, while keeping it a plain tensor keeps everything the trainer does with it unchanged
and exact: the one all-reduce that averages its gradients (`across_processes.sync_gradients`, so nothing
is averaged twice), clipping, the optimizer state, `Policy.weights` swaps, and checkpoints in the diffusers
LoRA format (any process holds the full tensors; rank 0 writes them) that resume on any number of processes.
"""

from __future__ import annotations

import torch

# Children of diffusers denoisers that are sequences of blocks (one FSDP unit each) or one block.
BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks", "blocks")
SINGLE_BLOCKS = ("mid_block",)


def denoiser_blocks(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks of `denoiser` that become FSDP units, in module order."""
    blocks = []
    for name, child in denoiser.named_children():
        if name in BLOCK_LISTS and isinstance(child, torch.nn.ModuleList):
            blocks.extend(child)
        elif name in SINGLE_BLOCKS and child is not None:
            blocks.append(child)
    return blocks


def shard_denoiser(denoiser: torch.nn.Module, replicated: list[torch.nn.Parameter], device) -> None:
    """Shard `denoiser`'s parameters over the default process group, except `replicated` (the LoRA)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = torch.device(device)
    world = torch.distributed.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    ignored = set(replicated)
    for block in denoiser_blocks(denoiser):
        fully_shard(block, mesh=mesh, reshard_after_forward=True, ignored_params=ignored)
    # the root keeps the rest (embeddings, conv_in/out, norms), gathered for the whole forward
    fully_shard(denoiser, mesh=mesh, reshard_after_forward=True, ignored_params=ignored)


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def resident_bytes(module: torch.nn.Module, trainable: bool = False) -> int:
    """Bytes of `module`'s frozen (or, with `trainable`, trained) parameters held by this process: a
    sharded parameter counts its local shard only."""
    total = 0
    for p in module.parameters():
        if p.requires_grad != trainable:
            continue
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total
