"""Recompute: blocks that backward passes through without training them keep no activations.

Backward runs from the loss down to the lowest block that takes a gradient. Every block on the
way keeps what its input gradient needs (norm inputs, attention probabilities, MLP activations),
whether it trains or not. So a probe step, or a draw that includes block 0, holds every block's
activations: that, not the training step, sets a layer-wise run's peak. A recomputed block runs
its forward under `torch.utils.checkpoint`, keeps only its input, and runs again in backward.

What a block's recompute costs is one more forward of it in the steps where it is recomputed,
and it is a no-op for a block below the lowest trained one (backward never reaches it).

A Hugging Face layer (``transformers``' ``GradientCheckpointingLayer``) is switched by its own
``gradient_checkpointing`` flag, so the library drops the KV cache for it as it does under its
own gradient checkpointing; any other block is wrapped. Blocks already checkpointed when this
starts (the model's gradient checkpointing is on) are left alone: they recompute anyway.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence

from torch import nn
from torch.utils.checkpoint import checkpoint

RECOMPUTE = ("none", "probe", "idle")

_checkpoint = functools.partial(checkpoint, use_reentrant=False)


class BlockRecompute:
    """Switches recomputation per block.

    Args:
        blocks: the model's blocks, in order.
    """

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        self._blocks = list(blocks)
        already = [bool(getattr(block, "gradient_checkpointing", False)) for block in self._blocks]
        self.enabled = not any(already)  # the model's own gradient checkpointing covers every block
        self._on: set[int] = set()

    def set(self, indices: Collection[int]) -> None:
        """Recompute exactly the blocks ``indices`` from the next forward on."""
        if not self.enabled:
            return
        for index in set(indices) ^ self._on:
            self._switch(self._blocks[index], index in indices)
        self._on = set(indices)

    def remove(self) -> None:
        """Give every block its plain forward back."""
        self.set(())

    @staticmethod
    def _switch(block: nn.Module, on: bool) -> None:
        if hasattr(block, "gradient_checkpointing"):  # transformers' GradientCheckpointingLayer
            block.gradient_checkpointing = on
            if on:
                block._gradient_checkpointing_func = _checkpoint
        elif on:
            block.forward = functools.partial(_recomputed, type(block).forward.__get__(block))
        else:
            del block.forward  # back to the class's forward


def _recomputed(forward, *args, **kwargs):
    return _checkpoint(forward, *args, **kwargs)
