"""Reading per-block gradient norms out of backward, one backward pass at a time.

Probe and refreshes must measure the same quantity, or the blocks measured only by the probe
and those refreshed later meet in one softmax at different scales. With gradient accumulation
over n backward passes per step, the probe cannot read the accumulated gradient without holding
a full fine-tuning's worth of gradients until the step. So both read each pass's gradient as it
arrives (a hook on the parameter, before it is accumulated) and estimate

    r_l = sqrt(n * sum_i ||g_l,i||^2 / N_l),

the RMS of one micro-batch's gradient at the scale of a full step's gradient: exact for n = 1,
and slightly above the accumulated gradient's RMS by the micro-batch noise otherwise, for probe
and refreshes alike. While probing, a second hook frees each gradient once accumulated, so
gradient memory stays at one parameter's worth and the step updates nothing.

Not for loss-scaled (fp16 AMP) or multi-process training: the gradients seen in backward are
still scaled, or not yet all-reduced. Read the finished gradients there instead.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from torch import nn


class GradientProbe:
    """Streams per-block squared gradient norms out of backward.

    Args:
        blocks: parameters of each block, in block order.
        indices: the blocks to read; their frozen parameters are not read.
        free: blocks whose gradients are dropped once read: all of them while probing (measure,
            update nothing), the idle ones in a re-probe step (measure them, train the active set).
    """

    def __init__(self, blocks: Sequence[Sequence[nn.Parameter]], indices: Sequence[int],
                 free: Collection[int] = ()) -> None:
        self._numel = [sum(p.numel() for p in ps) for ps in blocks]
        self._sq: list[torch.Tensor | float] = [0.0] * len(blocks)
        self._passes = 0
        self._handles = []
        for index in indices:
            for p in blocks[index]:
                if p.requires_grad:
                    self._handles.append(p.register_hook(self._reader(index)))
                    if index in free:
                        self._handles.append(p.register_post_accumulate_grad_hook(_free))

    def _reader(self, index: int):
        def read(grad: torch.Tensor) -> None:
            self._sq[index] = self._sq[index] + torch.linalg.vector_norm(grad, dtype=torch.float32).square()

        return read

    def begin_backward(self) -> None:
        """Announce one backward pass of the current step."""
        self._passes += 1

    def take(self) -> tuple[list[int], torch.Tensor]:
        """The blocks read since the last call and their r_l (on their device); then reset.

        A block that received no gradient (a skipped backward, a frozen block) is not in the list:
        it counts as unmeasured, not as a zero.
        """
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


def _free(param: nn.Parameter) -> None:
    param.grad = None
