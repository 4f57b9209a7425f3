"""DDP's gradient buckets sized to what trains: re-wrap the model when the trainable set changes.

DDP sizes its all-reduce buckets when it wraps the model, for every parameter that requires a
gradient then, and all-reduces whole buckets every step (a frozen parameter's share as zeros).
Lightning wraps before training starts, when every block still requires one, so under plain DDP
a GRASS run would hold a full fine-tuning's worth of gradient buckets (4 bytes per fp32
parameter) and send them all every step. Re-wrapping, by Lightning's own `configure_ddp`, before
any step whose trainable set differs from the last wrap's (the probe's start and end, a draw, a
re-probe step, an active set given by hand or loaded from a checkpoint) gives buckets the size
of what trains. A re-wrap skips DDP's broadcast of the weights from rank 0 (``init_sync=False``):
Lightning's first wrap made them equal, and every rank applies the same all-reduced gradients.
"""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy, Strategy
from torch.nn.parallel import DistributedDataParallel

from grass_lightning.lightning.compat import ddp_kwargs_set


class DDPBuckets:
    """Re-wraps ``strategy``'s model when the parameters requiring gradients change.

    A wrapper it did not make (Lightning's, at each fit) was built for whatever required
    gradients then, so it is replaced at the first call."""

    def __init__(self) -> None:
        self._wrapper: DistributedDataParallel | None = None
        self._wrapped_for: frozenset[int] = frozenset()

    def resize(self, strategy: Strategy) -> bool:
        """Re-wrap if the trainable set changed since the last wrap; whether it did."""
        if not isinstance(strategy, DDPStrategy) or not isinstance(strategy.model, DistributedDataParallel):
            return False
        module = strategy.lightning_module
        trainable = frozenset(id(p) for p in module.parameters() if p.requires_grad)
        if strategy.model is self._wrapper and trainable == self._wrapped_for:
            return False
        strategy.model = module  # unwrapped: configure_ddp wraps a LightningModule
        with ddp_kwargs_set(strategy, init_sync=False):
            strategy.configure_ddp()
        self._wrapper, self._wrapped_for = strategy.model, trainable
        return True

    def release(self) -> None:
        """Drop the last wrapper: its gradient buckets, the module and the trainer stay alive
        through it after fit (the strategy unwraps at teardown)."""
        self._wrapper, self._wrapped_for = None, frozenset()
