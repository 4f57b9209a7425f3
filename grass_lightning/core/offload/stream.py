"""``stream`` (the paper's): the moments of *every* block, active ones included, live in host memory.

The optimizer step updates the active blocks one at a time: block i+1's moments are prefetched
while block i steps, block i's are written back right after, and the next step's first block
comes back during its forward+backward. Device-resident moments: about two blocks' worth,
whatever the number of active blocks. The step itself (the pre-hook, after the closure) sees
no block gradients and updates only what lies outside the blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch.optim import Optimizer

from grass_lightning.core.offload.offloader import MomentOffloader


class StreamOffloader(MomentOffloader):
    mode = "stream"

    def __init__(self, blocks: Sequence[Sequence[nn.Parameter]], optimizer: Optimizer) -> None:
        self._hidden: dict[nn.Parameter, object] = {}  # block gradients kept from the optimizer's own step
        self._step_kwargs: dict = {}
        super().__init__(blocks, optimizer)

    def resident_blocks(self, active: list[int]) -> list[int]:
        return active[:1]  # prefetched for the next step

    def ready(self, step_kwargs: dict) -> None:
        self._step_kwargs = step_kwargs
        self._hidden = {p: p.grad for params in self.host.blocks for p in params if p.grad is not None}
        for p in self._hidden:
            p.grad = None

    def after_step(self, optimizer: Optimizer) -> None:
        host, hidden, self._hidden = self.host, self._hidden, {}
        stepped = {p: p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None}
        for p in stepped:  # the parameters outside the blocks took their step already
            p.grad = None
        with_grads = {b for b, params in enumerate(host.blocks) if any(p in hidden for p in params)}
        order = [b for b in self.active if b in with_grads] + sorted(with_grads - set(self.active))
        self._stepping = True
        try:
            for i, block in enumerate(order):
                host.upload(block)
                if i + 1 < len(order):
                    host.upload(order[i + 1])  # prefetch while this block steps
                host.wait(block)
                for p in host.blocks[block]:
                    p.grad = hidden.get(p)
                optimizer.step(**self._step_kwargs)
                for p in host.blocks[block]:
                    p.grad = None
                host.download(block)
        finally:
            self._stepping = False
            for p, grad in (*hidden.items(), *stepped.items()):
                p.grad = grad
        if self.active:
            host.upload(self.active[0])  # the next step's first block, during its forward+backward
