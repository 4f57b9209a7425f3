"""Making a set of blocks the only trainable ones, and what happens to idle blocks' moments.

Blocks are switched by ``requires_grad``: a frozen block gets no gradient, so AdamW (which
skips parameters whose ``grad`` is None) neither updates it nor creates state for it. The
optimizer is therefore built over *all* parameters first; freezing before it exists is
LISA's classic bug (the optimizer never sees the blocks), which `ActiveSet` refuses.

Idle moments: ``"drop"`` releases a leaving block's Adam moments, so optimizer memory is
bounded by the active set (a returning block starts fresh, as LISA-as-run and BAdam do);
``"keep"`` leaves them in ``optimizer.state`` so a returning block resumes its moments. With an
`offloader`, which blocks' moments stay on the device follows the active set too.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch.optim import Optimizer

from grass_lightning.core.blocks import BlockLayout
from grass_lightning.core.offload import MomentOffloader

IDLE_MOMENTS = ("drop", "keep")


class ActiveSet:
    """Applies active sets to a model's ``requires_grad`` flags and its optimizers' state.

    Parameters the user froze before training stay frozen whatever the active set.

    Args:
        layout: the model's blocks and always-trained parameters.
        optimizers: the optimizers built over the model's parameters.
        always_trained: parameters outside the blocks that train in every step.
        idle_moments: ``"drop"`` or ``"keep"`` (see module docstring).
        offloader: keeps block moments in host memory (its owner, `GrassSchedule`, closes it).

    Raises:
        ValueError: if a trainable block parameter is in no optimizer.
    """

    def __init__(
        self,
        layout: BlockLayout,
        optimizers: Sequence[Optimizer],
        always_trained: Sequence[nn.Parameter],
        idle_moments: str,
        offloader: MomentOffloader | None = None,
    ) -> None:
        self.layout = layout
        self.optimizers = list(optimizers)
        self.idle_moments = idle_moments
        self._blocks = [layout.block_params(i) for i in range(len(layout))]
        outside = {id(p): p for p in (*layout.embeddings, *layout.head)}
        self._outside = list(outside.values())
        self._always = {id(p) for p in always_trained}
        self._user_frozen = {id(p) for p in (*self._outside, *sum(self._blocks, [])) if not p.requires_grad}
        self.offloader = offloader
        self._check_optimizers()

    def _check_optimizers(self) -> None:
        optimized = {id(p) for opt in self.optimizers for group in opt.param_groups for p in group["params"]}
        for index, block in enumerate(self.layout.blocks):
            for name, p in block.named_parameters():
                if id(p) not in self._user_frozen and id(p) not in optimized:
                    raise ValueError(
                        f"Parameter {self.layout.path}.{index}.{name} is in no optimizer. Build the "
                        f"optimizer over all parameters (e.g. `AdamW(self.parameters())`) before any "
                        f"block is frozen: GRASS freezes and unfreezes blocks itself."
                    )

    def only_blocks(self) -> None:
        """Every block takes gradients (to be measured), nothing outside the blocks does."""
        self.open_all_blocks()
        self._set(self._outside, False)
        if self.offloader is not None:
            self.offloader.set_active([])

    def activate(self, active: Sequence[int]) -> None:
        """Train exactly ``active`` plus the always-trained parameters."""
        for index, params in enumerate(self._blocks):
            self._set(params, index in active)
            if index not in active and self.idle_moments == "drop":
                self._drop_moments(params)
                if self.offloader is not None:
                    self.offloader.forget(index)
        for p in self._outside:
            self._set([p], id(p) in self._always)
        if self.offloader is not None:
            self.offloader.set_active(active)

    def open_all_blocks(self) -> None:
        """Let every block take gradients, idle ones too, to be measured (the probe, a re-probe
        step): moments and the offloader's active set stay as they are; `activate` freezes the
        idle blocks again."""
        for params in self._blocks:
            self._set(params, True)

    def restore(self) -> None:
        """Give back the ``requires_grad`` flags the user had before training."""
        for params in (*self._blocks, self._outside):
            self._set(params, True)

    def _set(self, params: Sequence[nn.Parameter], trainable: bool) -> None:
        for p in params:
            p.requires_grad_(trainable and id(p) not in self._user_frozen)
            if not p.requires_grad:
                p.grad = None

    def _drop_moments(self, params: Sequence[nn.Parameter]) -> None:
        for opt in self.optimizers:
            for p in params:
                opt.state.pop(p, None)
