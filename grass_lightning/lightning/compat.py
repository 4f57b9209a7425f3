"""Every use of Lightning's private API, in one place; `tests/test_compat.py` pins each, and
pyproject.toml bounds ``lightning`` to the minor versions CI tests (``>=2.6.6,<2.7``)."""

from __future__ import annotations

from contextlib import contextmanager

from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy


def optimizer_unscales_itself(optimizer) -> bool:
    """Whether an optimizer unscales fp16 gradients inside its step (``AdamW(fused=True)``), so
    Lightning leaves them scaled until then."""
    return _optimizer_handles_unscaling(optimizer)


def ddp_kwargs(strategy: DDPStrategy) -> dict:
    """The keyword arguments a DDP strategy passes to ``DistributedDataParallel``."""
    return getattr(strategy, "_ddp_kwargs", {})


def tensor_parallel_size(strategy: ModelParallelStrategy) -> int | str:
    """The tensor-parallel size a `ModelParallelStrategy` was given (``"auto"``: every process of
    a node, once its environment is set up)."""
    return strategy._tensor_parallel_size


@contextmanager
def ddp_kwargs_set(strategy: DDPStrategy, **kwargs):
    """``strategy``'s DistributedDataParallel arguments with ``kwargs`` for the wraps made inside."""
    own = strategy._ddp_kwargs
    before = {key: own[key] for key in kwargs if key in own}
    own.update(kwargs)
    try:
        yield
    finally:
        for key in kwargs:
            own.pop(key, None)
        own.update(before)
