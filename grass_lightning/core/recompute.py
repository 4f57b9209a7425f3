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
own gradient checkpointing. The library checkpoints only a layer in training mode; a layer left
in eval mode (transformers 5 loads models so) passes that check and is back in eval mode before
its forward runs, so recompute does not depend on the caller's mode and eval-mode dropout stays
off. Any other block is wrapped, keeping an instance-level ``forward`` (accelerate's hooks) and
giving keyword tensors to the checkpoint as positional ones: torch saves the device RNG state
only for the devices of positional arguments, and dropout must replay the same masks. Blocks
already checkpointed when this starts (the model's gradient checkpointing is on) are left
alone: they recompute anyway.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Sequence

import torch
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
        self._undo: dict[int, Callable[[], None]] = {}

    def set(self, indices: Collection[int]) -> None:
        """Recompute exactly the blocks ``indices`` from the next forward on."""
        if not self.enabled:
            return
        for index in set(indices) ^ self._on:
            if index in indices:
                self._undo[index] = _switch_on(self._blocks[index])
            else:
                self._undo.pop(index)()
        self._on = set(indices)

    def remove(self) -> None:
        """Give every block its plain forward back."""
        self.set(())


def _switch_on(block: nn.Module):
    """Recompute ``block``; returns what switches it off."""
    if hasattr(block, "gradient_checkpointing"):  # transformers' GradientCheckpointingLayer
        block.gradient_checkpointing = True
        block._gradient_checkpointing_func = functools.partial(_checkpoint_in_callers_mode, block)
        hooks = (block.register_forward_pre_hook(_pass_the_training_check),
                 block.register_forward_hook(lambda module, args, output: _back_to_callers_mode(module)))

        def off() -> None:
            block.gradient_checkpointing = False
            for hook in hooks:
                hook.remove()
        return off
    own = vars(block).get("forward")  # an instance-level forward (accelerate's hooks) stays in front
    block.forward = functools.partial(_recomputed, own or type(block).forward.__get__(block))

    def off() -> None:
        if own is None:
            del block.forward  # back to the class's forward
        else:
            block.forward = own
    return off


def _pass_the_training_check(layer: nn.Module, args) -> None:
    if not layer.training and torch.is_grad_enabled():
        layer.training, layer._recompute_in_eval = True, True


def _back_to_callers_mode(layer: nn.Module) -> None:
    if vars(layer).pop("_recompute_in_eval", False):
        layer.training = False


def _checkpoint_in_callers_mode(layer: nn.Module, forward, *args):
    _back_to_callers_mode(layer)  # before the layer's forward: its own dropout reads layer.training
    return _checkpoint(forward, *args)


def _recomputed(forward, *args, **kwargs):
    tensors = [value for value in kwargs.values() if isinstance(value, torch.Tensor)]
    return _checkpoint(lambda *given: forward(*given[: len(args)], **kwargs), *args, *tensors)
