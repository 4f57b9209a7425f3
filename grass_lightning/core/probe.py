"""Reading per-block gradient norms out of backward, one backward pass at a time.

Probe and refreshes must measure the same quantity, or the blocks measured only by the probe
and those refreshed later meet in one softmax at different scales; so must one device and many,
or the same config samples differently on 1 and on 4 devices (and a resume on another world
size blends both into one EMA). With gradient accumulation over n backward passes per step, the
probe cannot read the accumulated gradient without holding a full fine-tuning's worth of
gradients until the step. So every path reads each pass's gradient as it arrives (a hook on the
parameter, before it is accumulated, before DDP all-reduces it and still loss-scaled under fp16
AMP) and estimates

    r_l = sqrt(sum_i ||G_l,i||^2 / (M N_l)),

the RMS of one micro-batch's gradient G_l,i = n g_l,i (the loss is divided by n for
accumulation), averaged over the M = n x ranks micro-batches of the step: the readings of every
process are summed across processes, and a loss scale is divided out. What it estimates is
s_l^2 + sigma_l^2 / b per parameter (b: the micro-batch size; s_l: the mean gradient; sigma_l^2:
the per-example variance), not the step gradient's s_l^2 + sigma_l^2 / (M b): a block with noisy
gradients reads high however many micro-batches or devices a step spans, which is what the
paper's rule (one device, no accumulation) reads too. Correcting it would need the finished
gradient, which the probe frees in backward.

While probing on one process, a second hook frees each gradient once accumulated, so gradient
memory stays at one parameter's worth and the step updates nothing. Under DDP the gradient must
stay for the all-reduce, and under fp16 AMP for the scaler's inf check; the schedule drops it at
the step instead.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import torch
from torch import nn


class GradientProbe:
    """Streams per-block squared gradient norms out of backward.

    Args:
        blocks: parameters of each block, in block order.
        indices: the blocks to read; their frozen parameters are not read.
        free: blocks whose gradients are dropped once read: all of them while probing (measure,
            update nothing), the idle ones in a re-probe step (measure them, train the active set).
        targets: per block, the tensors its parameters' gradients arrive at in backward, where
            they differ from the parameters (FSDP2's unsharded copies: :mod:`grass_lightning.core.sharding`).
    """

    def __init__(self, blocks: Sequence[Sequence[nn.Parameter]], indices: Sequence[int],
                 free: Collection[int] = (), targets: Sequence[Sequence[nn.Parameter]] | None = None) -> None:
        self._numel = [sum(p.numel() for p in ps) for ps in blocks]
        self._device = blocks[0][0].device
        self._sq: list[torch.Tensor | float] = [0.0] * len(blocks)
        self._passes = 0
        self._handles = []
        targets = blocks if targets is None else targets
        for index in indices:
            for p, target in zip(blocks[index], targets[index], strict=True):
                if p.requires_grad:  # the parameter's flag: FSDP2 copies it to the target at its next all-gather
                    target.requires_grad_(True)
                    self._handles.append(target.register_hook(self._reader(index)))
                    if index in free:
                        self._handles.append(target.register_post_accumulate_grad_hook(_free))

    def _reader(self, index: int):
        def read(grad: torch.Tensor) -> None:
            self._sq[index] = self._sq[index] + torch.linalg.vector_norm(grad, dtype=torch.float32).square()

        return read

    def begin_backward(self) -> None:
        """Announce one backward pass of the current step."""
        self._passes += 1

    def take(self, scale: float = 1.0,
             across: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[list[int], torch.Tensor]:
        """The blocks read since the last call and their r_l (on their device); then reset.

        Args:
            scale: the loss scale the gradients were read under (fp16 AMP), divided out.
            across: sums a tensor over the processes of a data-parallel run (every process calls
                this in the same step), so that each reads the same r_l.

        A block that received no gradient (a skipped backward, a frozen block) is not in the list:
        it counts as unmeasured, not as a zero.
        """
        read = [i for i, s in enumerate(self._sq) if isinstance(s, torch.Tensor)]
        passes = max(self._passes, 1)
        if across is None:  # sum_i ||n g_i||^2 / n = n sum_i ||g_i||^2
            rms = [(passes * self._sq[i] / self._numel[i]).sqrt() / scale for i in read]
        else:  # every process takes part, with or without readings; sums made on the device, no copy
            device = self._sq[read[0]].device if read else self._device
            zero = torch.zeros((), device=device)
            sq = torch.stack([s if isinstance(s, torch.Tensor) else zero for s in self._sq])
            counted = torch.stack([zero + passes if isinstance(s, torch.Tensor) else zero for s in self._sq])
            totals = across(torch.stack([passes**2 * sq / scale**2, counted]))  # and the micro-batches summed
            rms = [(totals[0, i] / totals[1, i] / self._numel[i]).sqrt() for i in read]
        self._sq = [0.0] * len(self._sq)
        self._passes = 0
        return read, torch.stack(rms) if rms else torch.empty(0)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _free(param: nn.Parameter) -> None:
    param.grad = None
