"""``park``: the moments of *idle* blocks wait in host memory.

A block's moments come to the device when it joins the active set and go back when it leaves,
so copies happen only at draws, and the new active set is known a whole forward+backward before
its first optimizer step: the copies overlap with that compute. Device-resident moments: the
active blocks'. Needs ``idle_moments="keep"`` (with ``"drop"`` nothing is left to park).
"""

from __future__ import annotations

from grass_lightning.core.offload.offloader import MomentOffloader


class ParkOffloader(MomentOffloader):
    mode = "park"

    def resident_blocks(self, active: list[int]) -> list[int]:
        return active

    def ready(self, step_kwargs: dict) -> None:
        for block in self.active:  # their uploads began at the draw
            self.host.wait(block)
