"""Which Lightning strategies can train a few blocks at a time: one check for a strategy object
(the callback's ``setup``) or a name as ``Trainer(strategy=...)`` takes it (a caller's early check).

Sharding strategies (DeepSpeed, FSDP, model parallel) own parameters and optimizer state, so a
block can be neither frozen alone nor have its moments released. DDP must be told that frozen
blocks produce no gradients (``find_unused_parameters=True``).
"""

from __future__ import annotations

import inspect

from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    Strategy,
    StrategyRegistry,
)

from grass_lightning.lightning.compat import ddp_kwargs

_SHARDING = (DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy)


def check_block_strategy(strategy: Strategy | str) -> None:
    """Raise ValueError if GRASS or LISA cannot run under ``strategy``: an object, or a name as
    ``Trainer(strategy=...)`` takes it (names Lightning resolves itself, such as "auto", pass)."""
    if isinstance(strategy, str):
        if strategy not in StrategyRegistry:
            return
        entry = StrategyRegistry[strategy]
        cls = entry["strategy"]
        find_unused = entry["init_params"].get("find_unused_parameters", _default_find_unused(cls))
    else:
        cls = type(strategy)
        find_unused = ddp_kwargs(strategy).get("find_unused_parameters", False)
    if issubclass(cls, _SHARDING):
        raise ValueError(
            f"{cls.__name__} shards parameters and optimizer state itself, so single blocks cannot be frozen "
            f"and their moments released; use 'ddp_find_unused_parameters_true' for several GPUs, or a single "
            f"device."
        )
    if issubclass(cls, DDPStrategy) and not find_unused:
        raise ValueError(
            f"{cls.__name__} without find_unused_parameters=True: frozen blocks produce no gradients; use "
            f"'ddp_find_unused_parameters_true' or DDPStrategy(find_unused_parameters=True)."
        )


def _default_find_unused(cls: type) -> bool:
    parameter = inspect.signature(cls.__init__).parameters.get("find_unused_parameters")
    return bool(parameter.default) if parameter is not None and parameter.default is not inspect.Parameter.empty else False
