"""What every offload policy does around the optimizer: hooks, the active set, lifetime.

The optimizer is driven through its own hooks, so ``optimizer.step()`` stays the call to make:
a step pre-hook runs the policy's `ready` after the closure (when gradients are final:
measured, clipped, unscaled), a post-hook its `after_step`. ``optimizer.state_dict()`` serves
parked moments from host memory, and ``optimizer.load_state_dict`` re-parks what it loaded.
A policy says which blocks stay resident for an active set, and what happens around the step.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch.optim import Optimizer

from grass_lightning.core.offload.host_moments import HostMoments
from grass_lightning.core.step_hooks import after_closure


class MomentOffloader:
    """Keeps the optimizer moments of blocks in host memory; `ParkOffloader` and
    `StreamOffloader` say when they come to the device.

    Args:
        blocks: the parameters of each block.
        optimizer: the one optimizer over them (Adam-like: per-parameter state).
    """

    mode: str

    def __init__(self, blocks: Sequence[Sequence[nn.Parameter]], optimizer: Optimizer) -> None:
        self.host = HostMoments(blocks, optimizer)
        self.active: list[int] = []
        self._stepping = False  # inside a step the policy makes itself: the hooks stand aside
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
            optimizer.register_state_dict_post_hook(lambda _, state_dict: self.host.serve_parked(state_dict)),
            optimizer.register_load_state_dict_post_hook(lambda _: self.attach()),
        ]
        self.attach()

    def attach(self) -> None:
        """Index the optimizer's state and send every block that should not be resident to the host.

        Runs at construction and after ``optimizer.load_state_dict`` (which builds new state
        tensors on the parameters' device; Lightning then moves them there again, a no-op).
        """
        self.host.index_all()
        self.set_active(self.active)

    def set_active(self, active: Sequence[int]) -> None:
        """Announce the active set of the coming steps; starts the copies it needs."""
        self.active = list(active)
        keep = self.resident_blocks(self.active)
        for block in [b for b in self.host.resident if b not in keep]:
            self.host.download(block)
        for block in keep:
            self.host.upload(block)

    def forget(self, block: int) -> None:
        """The optimizer dropped this block's moments (``idle_moments="drop"``)."""
        self.host.forget(block)

    def device_bytes(self) -> int:
        """Bytes of block moments allocated on the training device right now."""
        return self.host.device_bytes()

    def host_bytes(self) -> int:
        """Bytes of the host buffers that hold block moments."""
        return self.host.host_bytes()

    def close(self) -> None:
        """Remove the hooks and put parked moments back into ``optimizer.state`` as ordinary host
        tensors (Lightning moves all state to the CPU at teardown; pinned buffers are freed)."""
        if not self._handles:
            return
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.host.release()

    # -- the policy --------------------------------------------------------------------------

    def resident_blocks(self, active: list[int]) -> list[int]:
        """The blocks whose moments should be on the device while ``active`` trains."""
        raise NotImplementedError

    def ready(self, step_kwargs: dict) -> None:
        """Gradients are final and the step is about to run."""

    def after_step(self, optimizer: Optimizer) -> None:
        """The optimizer step has run."""

    # -- hooks -------------------------------------------------------------------------------

    def _before_step(self, optimizer: Optimizer, args: tuple, kwargs: dict):
        if self._stepping:
            return None
        # after the closure: forward, backward and (under Lightning) measuring and clipping
        return after_closure(args, kwargs, self.ready)

    def _after_step(self, optimizer: Optimizer, args: tuple, kwargs: dict) -> None:
        if not self._stepping:
            self.after_step(optimizer)
