"""DDP's gradient buckets sized to what trains: re-wrap the model when the trainable set changes.

DDP sizes its all-reduce buckets when it wraps the model, for every parameter that requires a
gradient then, and all-reduces whole buckets every step (a frozen parameter's share as zeros).
Lightning wraps before training starts, when every block still requires one, so under plain DDP
a GRASS run would hold a full fine-tuning's worth of gradient buckets (4 bytes per fp32
parameter) and send them all every step. Re-wrapping, by Lightning's own `configure_ddp`, after
each change of the trainable set (the probe's start and end, a draw, a re-probe step) gives
buckets the size of what trains. Each wrap broadcasts the weights from rank 0; they are equal on
every rank already (every rank applies the same all-reduced gradients), so only time is spent.
"""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy, Strategy
from torch.nn.parallel import DistributedDataParallel


class DDPBuckets:
    """Re-wraps ``strategy``'s model when the parameters requiring gradients change."""

    def __init__(self) -> None:
        self._wrapped_for: frozenset[int] | None = None

    def fit(self, strategy: Strategy) -> bool:
        """Re-wrap if the trainable set changed since the last wrap; whether it did."""
        if not isinstance(strategy, DDPStrategy) or not isinstance(strategy.model, DistributedDataParallel):
            return False
        module = strategy.lightning_module
        trainable = frozenset(id(p) for p in module.parameters() if p.requires_grad)
        if trainable == self._wrapped_for:
            return False
        strategy.model = module  # unwrapped: configure_ddp wraps a LightningModule
        strategy.configure_ddp()
        self._wrapped_for = trainable
        return True


def bucket_bytes(strategy: Strategy) -> int:
    """Bytes in DDP's gradient buckets (0 when the model is not DDP-wrapped)."""
    if not isinstance(strategy.model, DistributedDataParallel):
        return 0
    sizes = strategy.model._get_ddp_logging_data().get("bucket_sizes", "")
    return sum(int(size) for size in str(sizes).split(",") if size)
