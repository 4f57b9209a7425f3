"""Per-block optimizer moments in host memory, brought to the device only when needed (plain PyTorch).

Two policies over one host-buffer helper (`host_moments`): `park` keeps idle blocks' moments on
the host, `stream` (the paper's) every block's, streamed through the optimizer step. Build one
with `make_offloader`; `GrassSchedule` does, from its ``offload`` argument.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch.optim import Optimizer

from grass_lightning.core.offload.host_moments import CopyStream, HostMoments
from grass_lightning.core.offload.offloader import MomentOffloader
from grass_lightning.core.offload.park import ParkOffloader
from grass_lightning.core.offload.stream import StreamOffloader

OFFLOADERS = {"park": ParkOffloader, "stream": StreamOffloader}
OFFLOAD_MODES = tuple(OFFLOADERS)


def check_offload(offload: str, idle_moments: str | None = None) -> None:
    """Raise for an unknown mode, or for ``park`` with ``idle_moments="drop"`` (nothing left to park)."""
    if offload not in ("none", *OFFLOAD_MODES):
        raise ValueError(f"offload={offload!r} is not one of 'none', 'park', 'stream'.")
    if offload == "park" and idle_moments == "drop":
        raise ValueError(
            "offload='park' with idle_moments='drop': park keeps idle blocks' moments in host memory, "
            "but 'drop' frees them. Set idle_moments='keep', or use offload='stream'."
        )


def make_offloader(offload: str, blocks: Sequence[Sequence[nn.Parameter]], optimizer: Optimizer) -> MomentOffloader | None:
    """The offloader for ``offload`` ('none': None), over ``blocks``' moments in ``optimizer``."""
    check_offload(offload)
    return OFFLOADERS[offload](blocks, optimizer) if offload != "none" else None


__all__ = ["OFFLOAD_MODES", "CopyStream", "HostMoments", "MomentOffloader", "ParkOffloader", "StreamOffloader",
           "check_offload", "make_offloader"]
