"""Per-block optimizer moments with a copy in host memory: the mechanics both offload policies share.

Each block has one flat host buffer (pinned on CUDA, where the pinned allocator rounds every
allocation up to a power of two, hence one per block rather than per tensor). The tensors in
``optimizer.state`` stay the same objects: sending a block to the host copies each of its
moments to a slice of the buffer and frees the device storage (``resize_(0)``); bringing it back
re-allocates the storage and copies into it. So LR schedulers, ``optimizer.state_dict()``
(served from the host buffers for parked blocks) and Lightning's checkpointing keep working,
and moments keep their dtype. Copies run on a side CUDA stream ordered by events; nothing
synchronizes the device during training. On CPU the same code runs without pinning or streams.

Only tensors shaped like their parameter move (Adam's ``exp_avg``, ``exp_avg_sq``); scalar step
counters stay where the optimizer keeps them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim import Optimizer

_ALIGN = 64  # bytes: every moment's slice of a host buffer starts aligned for any dtype


class CopyStream:
    """Where the copies run: a side CUDA stream ordered by events, or inline on CPU.

    Every stream operation goes through here, so the ordering can be checked without a GPU
    (tests substitute a recording stand-in).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def side(self):
        """Copies on the side stream, after the work already queued on the compute stream."""
        if self.stream is None:
            yield
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            yield

    def record(self) -> torch.cuda.Event | None:
        """An event marking the copies queued so far (None on CPU: they are done)."""
        return self.stream.record_event() if self.stream is not None else None

    def wait(self, event: torch.cuda.Event) -> None:
        """Make the compute stream wait for ``event``."""
        torch.cuda.current_stream(self.device).wait_event(event)

    def protect(self, tensor: torch.Tensor) -> None:
        """Keep ``tensor``'s memory from reuse until the side stream's queued copies are done."""
        if self.stream is not None:
            tensor.record_stream(self.stream)

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()


@dataclass
class _Slot:
    """One moment tensor of a block and where it lives in the block's host buffer."""

    param: nn.Parameter
    key: str
    tensor: torch.Tensor  # the very object in optimizer.state[param][key]
    offset: int

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


class HostMoments:
    """The blocks' moments, each block either resident on the device or parked in host memory.

    Args:
        blocks: the parameters of each block.
        optimizer: the optimizer that holds their moments (Adam-like: per-parameter state).
    """

    def __init__(self, blocks: Sequence[Sequence[nn.Parameter]], optimizer: Optimizer) -> None:
        self.blocks = [list(params) for params in blocks]
        self.optimizer = optimizer
        self.device = self.blocks[0][0].device
        self.copies = CopyStream(self.device)
        self._pin = self.device.type == "cuda"
        self.slots: dict[int, list[_Slot]] = {}
        self.buffers: dict[int, torch.Tensor] = {}
        self.resident: dict[int, torch.cuda.Event | None] = {}  # block -> its upload's event (None: done)

    def index_all(self) -> None:
        """Re-read the optimizer's state (after construction or ``load_state_dict``): every block
        that has moments now holds them on the device."""
        self.copies.synchronize()
        self.slots.clear()
        self.resident.clear()
        for block in range(len(self.blocks)):
            if self._index(block):
                self.resident[block] = None

    def download(self, block: int) -> None:
        """Write a resident block's moments to host memory and free their device storage."""
        self.resident.pop(block, None)
        slots = self._index(block)  # the step may just have created them
        with self.copies.side():
            for slot in slots:
                self._host_view(block, slot).copy_(slot.tensor, non_blocking=True)
                self.copies.protect(slot.tensor)  # the allocator waits for the copy before reuse
                slot.tensor.untyped_storage().resize_(0)

    def upload(self, block: int) -> None:
        """Start bringing a parked block's moments back to the device. A block without moments yet
        counts as resident: the optimizer will create them there."""
        if block in self.resident:
            return
        slots = self.slots.get(block, [])
        self.resident[block] = None
        for slot in slots:  # allocated on the compute stream, which will use them
            slot.tensor.untyped_storage().resize_(slot.nbytes)
        with self.copies.side():
            for slot in slots:
                slot.tensor.copy_(self._host_view(block, slot), non_blocking=True)
            self.resident[block] = self.copies.record()

    def wait(self, block: int) -> None:
        """Make the compute stream wait until the block's upload has landed."""
        event = self.resident.get(block)
        if event is not None:
            self.copies.wait(event)
            self.resident[block] = None

    def forget(self, block: int) -> None:
        """The optimizer dropped this block's moments: drop the host copy too.

        An upload into them may still be in flight (stream mode prefetches the next step's first
        block, and the draw may then drop it): the compute stream waits for it before the memory
        goes back to the allocator, which would otherwise hand it out while the copy writes.
        """
        self.wait(block)
        self.resident.pop(block, None)
        self.slots.pop(block, None)
        self.buffers.pop(block, None)

    def device_bytes(self) -> int:
        """Bytes of block moments allocated on the training device right now."""
        return sum(t.untyped_storage().nbytes() for params in self.blocks for p in params for _, t in self._moments(p))

    def host_bytes(self) -> int:
        return sum(buffer.numel() for buffer in self.buffers.values())

    def serve_parked(self, state_dict: dict) -> dict:
        """``optimizer.state_dict()`` with parked moments read from their host buffers (their
        device tensors hold no storage)."""
        self.copies.synchronize()
        groups = self.optimizer.param_groups
        index = {id(p): i for i, p in enumerate(p for group in groups for p in group["params"])}
        for block, slots in self.slots.items():
            if block in self.resident:
                continue
            for slot in slots:
                i = index[id(slot.param)]
                state_dict["state"][i] = {**state_dict["state"][i], slot.key: self._host_view(block, slot)}
        return state_dict

    def release(self) -> None:
        """Put parked moments back into ``optimizer.state`` as ordinary host tensors and free the buffers."""
        self.copies.synchronize()
        for block, slots in self.slots.items():
            if block not in self.resident:
                for slot in slots:
                    self.optimizer.state[slot.param][slot.key] = self._host_view(block, slot).clone()
        self.slots.clear()
        self.buffers.clear()
        self.resident.clear()

    def _moments(self, p: nn.Parameter) -> Iterator[tuple[str, torch.Tensor]]:
        for key, value in self.optimizer.state.get(p, {}).items():
            if key != "step" and torch.is_tensor(value) and value.shape == p.shape and value.device == p.device:
                yield key, value

    def _index(self, block: int) -> list[_Slot]:
        """Lay out the block's moments (as the optimizer holds them now) in its host buffer."""
        slots, offset = [], 0
        for p in self.blocks[block]:
            state = self.optimizer.state.get(p, {})
            for key, tensor in list(self._moments(p)):
                storage = tensor.untyped_storage()
                if storage.nbytes() != tensor.numel() * tensor.element_size() or not storage.resizable():
                    tensor = state[key] = tensor.clone(memory_format=torch.contiguous_format)  # e.g. loaded views
                slots.append(_Slot(p, key, tensor, offset))
                offset += -(-slots[-1].nbytes // _ALIGN) * _ALIGN
        self.slots[block] = slots
        buffer = self.buffers.get(block)
        if slots and (buffer is None or buffer.numel() < offset):
            self.buffers[block] = torch.empty(offset, dtype=torch.uint8, pin_memory=self._pin)
        return slots

    def _host_view(self, block: int, slot: _Slot) -> torch.Tensor:
        raw = self.buffers[block][slot.offset : slot.offset + slot.nbytes]
        return raw.view(slot.tensor.dtype).view(slot.tensor.shape)
