"""What a block keeps for backward, measured, not guessed: the bytes of the tensors autograd saves
in one forward of a 3-block copy of the model on the meta device (shapes only: no memory, no
arithmetic, milliseconds), one block of each kind:

- ``trained``: the block's parameters take gradients (under LoRA: its adapters);
- ``frozen``: frozen, but backward passes through it (a block below trains): it keeps what its
  input's gradient needs (norm inputs, attention and MLP activations), as much as a trained one
  less what only its weights' gradients need;
- ``recomputed``: frozen under recompute (:mod:`grass_lightning.core.recompute`): its input;
  in backward it runs again and holds a ``frozen`` block's worth for the length of its backward.

and ``outside``: what the embeddings, final norm, head and chunked loss keep (the head trained or
not). A block below the lowest one that takes a gradient keeps nothing (no_grad in effect).

Measured at two sequence lengths with batch 1 and fitted as ``batch * (a * seq + b * seq**2)``
(the quadratic term is attention that materialises its scores); `ActivationModel` then gives
any batch and length without running anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from grass_lightning.app.lm_loss import causal_lm_loss
from grass_lightning.core.blocks import find_blocks
from grass_lightning.core.recompute import BlockRecompute

KINDS = ("trained", "frozen", "recomputed", "outside")
SAMPLE_LENGTHS = (64, 128)


@dataclass(frozen=True)
class ActivationModel:
    """Saved bytes per kind as ``batch * (linear[kind] * seq + quadratic[kind] * seq**2)``."""

    linear: dict[str, float]
    quadratic: dict[str, float]

    def bytes(self, kind: str, batch: int, seq: int) -> float:
        return batch * (self.linear[kind] * seq + self.quadratic[kind] * seq**2)


def fit_activations(make_model, dtype: torch.dtype, head_trained: bool) -> ActivationModel:
    """Measure at batch 1 and `SAMPLE_LENGTHS` and fit per kind. ``make_model(num_blocks)`` builds
    the model with that many blocks on the meta device."""
    (s1, s2) = SAMPLE_LENGTHS
    first, second = (saved_bytes(make_model, dtype, 1, s, head_trained) for s in SAMPLE_LENGTHS)
    linear, quadratic = {}, {}
    for kind in KINDS:  # y = a s + b s^2 through both points
        quadratic[kind] = max(0.0, (second[kind] / s2 - first[kind] / s1) / (s2 - s1))
        linear[kind] = first[kind] / s1 - quadratic[kind] * s1
    return ActivationModel(linear, quadratic)


def saved_bytes(make_model, dtype: torch.dtype, batch: int, seq: int, head_trained: bool) -> dict[str, int]:
    """Bytes saved for backward per kind, in one forward of ``batch`` rows of ``seq`` tokens."""
    model = make_model(3).to(dtype)
    layout = find_blocks(model)
    trains = [p.requires_grad for p in layout.blocks[0].parameters()]  # as the method left them (LoRA: its adapters)
    for p in model.parameters():
        p.requires_grad_(False)
    for p, t in zip(layout.blocks[0].parameters(), trains):  # block 0 trains, so backward passes through 1 and 2
        p.requires_grad_(t)
    for p in layout.head:
        p.requires_grad_(head_trained)
    recompute = BlockRecompute(layout.blocks)
    recompute.set({2})
    where = ["outside"]
    names = {0: "trained", 1: "frozen", 2: "recomputed"}
    totals = dict.fromkeys(KINDS, 0)
    seen: list[torch.Tensor] = []  # alive for the forward, so ids stay unique
    params = {id(p) for p in model.parameters()}

    def enter(index):  # what a recomputed block's checkpoint keeps (its input) reaches `pack` too
        return lambda module, args: where.append(names[index]) and None

    def pack(tensor: torch.Tensor):
        base = tensor if tensor._base is None else tensor._base
        if id(base) not in params and not any(base is t for t in seen):
            seen.append(base)
            totals[where[-1]] += base.numel() * base.element_size()
        return tensor

    hooks = []
    for index, block in enumerate(layout.blocks):
        hooks.append(block.register_forward_pre_hook(enter(index)))
        hooks.append(block.register_forward_hook(lambda *_: where.pop() and None))
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            causal_lm_loss(model.train(), ids, ids)
    finally:
        for hook in hooks:
            hook.remove()
        recompute.remove()
    return totals


def meta_model(auto, config) -> callable:
    """``make_model`` for `fit_activations`: ``auto.from_config(config)`` with ``num_blocks`` blocks, on meta."""
    import copy

    def make(num_blocks: int) -> nn.Module:
        short = copy.deepcopy(config)
        short.num_hidden_layers = num_blocks
        if getattr(short, "layer_types", None):
            short.layer_types = list(short.layer_types)[:num_blocks]
        with torch.device("meta"):
            return auto.from_config(short)

    return make
