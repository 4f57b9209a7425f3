"""Blocks under FSDP2 (torch's ``fully_shard``), in plain PyTorch: sharding a model block by block,
and finding the tensors a block's gradients arrive at in backward.

FSDP2 keeps each parameter as a DTensor shard and computes with an unsharded copy that it
all-gathers for forward and backward. A backward pass's gradient reaches that copy on each
rank, then is reduce-scattered (averaged over ranks) into the shard's ``grad``; hooks on the
shard itself never fire. The probe must read each pass's local gradient, as it does on one
device and under DDP (:mod:`grass_lightning.core.probe`), so it hooks the unsharded copies,
which FSDP2 makes at a module's first all-gather and reuses from then on.

Freezing and unfreezing a block needs no re-sharding: FSDP2 copies ``requires_grad`` from a
shard to its unsharded copy at every all-gather, and frozen shards get no gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor


def shard_blocks(model: nn.Module, blocks: Sequence[nn.Module], **fsdp_kwargs) -> None:
    """``fully_shard`` each block, then ``model`` (what the blocks leave: embeddings, head), with
    ``fsdp_kwargs`` (``mesh=``, ``mp_policy=``...). A block is the unit GRASS trains, so each is
    one FSDP unit: its all-gather and reduce-scatter cover exactly one block."""
    for block in blocks:
        fully_shard(block, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)


def is_sharded(params: Sequence[nn.Parameter]) -> bool:
    return any(isinstance(p, DTensor) for p in params)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """``model``'s state dict with whole tensors on the CPU, gathered under FSDP2 (a collective:
    every rank calls it; rank 0 gets the tensors); None for a model that is not sharded."""
    if not is_sharded(list(model.parameters())):
        return None
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def check_sharding(params: Sequence[nn.Parameter], offload: str, master_weights: bool) -> None:
    """Raise ValueError for what GRASS does not support on FSDP2-sharded ``params``: offloading
    (each rank holds only its shard of the moments already; the offloaders move whole tensors)
    and fp32 masters for half-precision shards (not implemented for DTensors)."""
    if not is_sharded(params):
        return
    if offload != "none":
        raise ValueError(f"offload={offload!r} with FSDP2-sharded blocks: each rank holds only its shard of the "
                         f"moments already, and the offloaders move whole tensors. Use offload='none' under FSDP2.")
    half = sorted({str(p.dtype).removeprefix("torch.") for p in params if p.dtype in (torch.bfloat16, torch.float16)})
    if half and master_weights:
        raise ValueError(
            f"{'/'.join(half)} weights with master_weights=True under FSDP2: fp32 masters of sharded weights are not "
            f"supported yet. Use precision='bf16-mixed' (FSDP2 keeps fp32 shards, 4/N bytes per weight on each of N "
            f"ranks, and computes in bf16), or master_weights=False (pure bf16 AdamW: small updates are lost)."
        )


def gradient_targets(blocks: Sequence[nn.Module]) -> list[list[nn.Parameter]]:
    """Per block, in ``block.parameters()`` order, the tensors its gradients arrive at in backward:
    the parameters themselves, or under FSDP2 their unsharded copies.

    Under FSDP2 this all-gathers one block at a time (a collective: every rank calls it at the
    same point), then reshards.

    Raises:
        ValueError: if a block holds DTensor parameters but no ``fully_shard`` module (a block
            sharded only as part of its parent, or tensor parallelism).
    """
    targets = []
    for index, block in enumerate(blocks):
        params = dict(block.named_parameters())
        if not is_sharded(list(params.values())):
            targets.append(list(params.values()))
            continue
        units = [m for m in block.modules() if isinstance(m, FSDPModule)]
        if not units:
            raise ValueError(
                f"Block {index} holds DTensor parameters but is not sharded by itself: call fully_shard on each "
                f"block before the model (grass_lightning.core.sharding.shard_blocks), with data parallelism only."
            )
        unsharded = dict(params)
        for unit in units:
            unit.unshard()
            try:
                unsharded.update({name: p for name, p in block.named_parameters() if p is not params[name]})
            finally:
                unit.reshard()
        if any(isinstance(p, DTensor) for p in unsharded.values()):
            raise ValueError(f"Block {index} computes with DTensor parameters (tensor parallelism?): GRASS under "
                             f"sharding supports data-parallel FSDP2 only (ModelParallelStrategy(tensor_parallel_size=1)).")
        targets.append(list(unsharded.values()))
    return targets
