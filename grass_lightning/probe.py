"""Probing every block without holding every block's gradient.

While probing, all blocks need a gradient but none is updated. Instead of keeping a full
fine-tuning's worth of gradients until the optimizer step, a post-accumulate-grad hook on each
block parameter reads the squared norm of its gradient the moment it is ready and frees it, so
gradient memory stays at one parameter's worth.

With gradient accumulation over n backward passes per step, each pass is read on its own:
r_l = sqrt(n * sum_i ||g_l,i||^2 / N_l). That is the RMS of one micro-batch's gradient at
the scale of a full step's gradient (exact for n = 1, and in the noise-free limit; micro-batch
noise raises it a little). Refreshes after probing always read the exact accumulated gradient.

Not for loss-scaled (fp16 AMP) training: the gradients seen here are still scaled, and a
GradScaler refuses a step in which no gradient is left; read finished gradients there instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class GradientProbe:
    """Streams per-block squared gradient norms out of backward and frees the gradients.

    Args:
        blocks: parameters of each block, in block order; frozen ones are not read.
    """

    def __init__(self, blocks: Sequence[Sequence[nn.Parameter]]) -> None:
        self._numel = [sum(p.numel() for p in ps) for ps in blocks]
        self._sq: list[torch.Tensor | float] = [0.0] * len(blocks)
        self._passes = 0
        self._handles = [
            p.register_post_accumulate_grad_hook(self._reader(index))
            for index, params in enumerate(blocks)
            for p in params
            if p.requires_grad
        ]

    def _reader(self, index: int):
        def read_and_free(param: nn.Parameter) -> None:
            norm = torch.linalg.vector_norm(param.grad, dtype=torch.float32)
            self._sq[index] = self._sq[index] + norm.square()
            param.grad = None

        return read_and_free

    def begin_backward(self) -> None:
        """Announce one backward pass of the current step."""
        self._passes += 1

    def take(self) -> tuple[list[int], torch.Tensor]:
        """The blocks read since the last call and their r_l (on their device); then reset."""
        read = [i for i, s in enumerate(self._sq) if isinstance(s, torch.Tensor)]
        passes = max(self._passes, 1)
        rms = torch.stack([(passes * self._sq[i] / self._numel[i]).sqrt() for i in read]) if read else torch.empty(0)
        self._sq = [0.0] * len(self._sq)
        self._passes = 0
        return read, rms

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
