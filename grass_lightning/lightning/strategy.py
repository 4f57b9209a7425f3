"""Lightning strategies that keep GRASS's per-block Adam moments in host memory.

Usage::

    Trainer(strategy="grass_offload", callbacks=[GrassCallback(idle_moments="keep")])   # park mode
    Trainer(strategy=GrassOffloadStrategy(offload="stream"), callbacks=[GrassCallback()])
    Trainer(strategy="grass_offload_ddp", devices=4, callbacks=[GrassCallback(idle_moments="keep")])

Thin adapters: a strategy carries the offload mode. `GrassCallback` reads it and builds its
`GrassSchedule` with it; the schedule owns the :mod:`grass_lightning.core.offload` offloader over
the run's blocks (plain PyTorch) and closes it at train end, when parked moments return to the
optimizer, before Lightning's teardown moves all optimizer state to the CPU. Lightning moves all
optimizer state to the device after ``setup`` and after loading a checkpoint; the offloader is
built after both (at train start) and re-parks after any later ``optimizer.load_state_dict``.

Registered names: ``grass_offload`` and ``grass_offload_ddp`` (park), ``grass_offload_stream`` and
``grass_offload_ddp_stream``.
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, StrategyRegistry
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from grass_lightning.core.offload import OFFLOAD_MODES


class OffloadingStrategy:
    """What both strategies add to Lightning's: the offload mode, for GrassCallback to read. The
    callback marks the strategy it offloads through (``offloaded_by``); the strategy never
    imports the callback."""

    offload: str
    offloaded_by: object | None = None

    def _init_offload(self, offload: str) -> None:
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload={offload!r} is not one of {OFFLOAD_MODES}.")
        self.offload = offload

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.offloaded_by is None:
            rank_zero_warn(f"{type(self).__name__} found no GrassCallback: no optimizer state is offloaded.")


class GrassOffloadStrategy(OffloadingStrategy, SingleDeviceStrategy):
    """One device; block moments in host memory.

    Args:
        offload: ``"park"`` (idle blocks' moments on the host; needs ``idle_moments="keep"``) or
            ``"stream"`` (all blocks' moments on the host, streamed through the step).
        device: the training device; ``None`` takes the Trainer's ``accelerator``/``devices``.
    """

    def __init__(self, offload: str = "park", device: str | torch.device | None = None, **kwargs) -> None:
        super().__init__(device=device if device is not None else "cpu", **kwargs)
        self._init_offload(offload)
        # Lightning fills `parallel_devices` from Trainer(devices=...) when it is empty.
        self.parallel_devices = [torch.device(device)] if device is not None else None

    @property
    @override
    def root_device(self) -> torch.device:
        return self.parallel_devices[0] if self.parallel_devices else self._root_device

    @override
    def setup_environment(self) -> None:
        if self.parallel_devices and len(self.parallel_devices) > 1:
            raise ValueError(
                f"GrassOffloadStrategy runs on one device; got devices={self.parallel_devices}. "
                f"Use strategy='grass_offload_ddp' for several."
            )
        super().setup_environment()


class GrassOffloadDDPStrategy(OffloadingStrategy, DDPStrategy):
    """Lightning's DDP (``find_unused_parameters=True``: frozen blocks have no gradients); each
    rank keeps its block moments in its host memory.

    Args:
        offload: ``"park"`` or ``"stream"``, as for `GrassOffloadStrategy`.
        **kwargs: passed to `DDPStrategy`.
    """

    def __init__(self, offload: str = "park", find_unused_parameters: bool = True, **kwargs) -> None:
        super().__init__(find_unused_parameters=find_unused_parameters, **kwargs)
        self._init_offload(offload)


for _name, _cls, _mode in (
    ("grass_offload", GrassOffloadStrategy, "park"),
    ("grass_offload_stream", GrassOffloadStrategy, "stream"),
    ("grass_offload_ddp", GrassOffloadDDPStrategy, "park"),
    ("grass_offload_ddp_stream", GrassOffloadDDPStrategy, "stream"),
):
    if _name not in StrategyRegistry:
        StrategyRegistry.register(_name, _cls, description=f"{_cls.__name__} in {_mode} mode", offload=_mode)
