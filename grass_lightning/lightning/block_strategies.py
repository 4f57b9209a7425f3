"""Which Lightning strategies can train a few blocks at a time: one check for a strategy object
(the callback's ``setup``) or a name as ``Trainer(strategy=...)`` takes it (a caller's early check).

FSDP2 through `ModelParallelStrategy` with data parallelism only (``tensor_parallel_size=1``)
works: the module shards each block with ``fully_shard`` (:mod:`grass_lightning.core.sharding`),
and a frozen block's shards get no gradient and no moments. FSDP1 (`FSDPStrategy`) and DeepSpeed
own flattened parameters and optimizer partitions, so a block can be neither frozen alone nor have
its moments released; tensor parallelism splits a block's weights across ranks. DDP must be told
that frozen blocks produce no gradients (``find_unused_parameters=True``).
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

from grass_lightning.lightning.compat import ddp_kwargs, tensor_parallel_size

_SHARDING = (DeepSpeedStrategy, FSDPStrategy)


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
            f"{cls.__name__} shards flattened parameters and optimizer state itself, so single blocks cannot be "
            f"frozen and their moments released. To shard, use FSDP2: ModelParallelStrategy(tensor_parallel_size=1) "
            f"with fully_shard per block in configure_model (train.py: trainer=fsdp); otherwise "
            f"'ddp_find_unused_parameters_true' for several devices, or a single device."
        )
    if issubclass(cls, ModelParallelStrategy):
        tensor_parallel = "auto" if isinstance(strategy, str) else tensor_parallel_size(strategy)
        if tensor_parallel != 1:
            raise ValueError(
                f"ModelParallelStrategy with tensor_parallel_size={tensor_parallel!r}: tensor parallelism splits "
                f"a block's weights across ranks, which GRASS does not support. Shard by data parallelism only: "
                f"ModelParallelStrategy(data_parallel_size=<devices x nodes>, tensor_parallel_size=1) "
                f"(train.py: trainer=fsdp)."
            )
    if issubclass(cls, DDPStrategy) and not find_unused:
        raise ValueError(
            f"{cls.__name__} without find_unused_parameters=True: frozen blocks produce no gradients; use "
            f"'ddp_find_unused_parameters_true' or DDPStrategy(find_unused_parameters=True)."
        )


def _default_find_unused(cls: type) -> bool:
    parameter = inspect.signature(cls.__init__).parameters.get("find_unused_parameters")
    return bool(parameter.default) if parameter is not None and parameter.default is not inspect.Parameter.empty else False
