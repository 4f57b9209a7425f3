"""Per-block optimizer moments in host memory, brought to the device only when needed (plain PyTorch).

Two modes:

- ``park``: the moments of *idle* blocks wait in host memory. A block's moments come to the
  device when it joins the active set and go back when it leaves, so copies happen only at
  draws, and the new active set is known a whole forward+backward before its first optimizer
  step: the copies overlap with that compute. Device-resident moments: the active blocks'.
- ``stream`` (the paper's): the moments of *every* block, active ones included, live in host
  memory. The optimizer step updates the active blocks one at a time: block i+1's moments are
  prefetched while block i steps, block i's are written back right after. Device-resident
  moments: about two blocks' worth, whatever the number of active blocks.

Mechanics: each block has one flat host buffer (pinned on CUDA, where the pinned allocator
rounds every allocation up to a power of two, hence one per block rather than per tensor). The
tensors in ``optimizer.state`` stay the same objects: offloading copies one to its slice of the
host buffer and frees its device storage (``resize_(0)``); bringing it back re-allocates the
storage and copies into it. So LR schedulers, ``optimizer.state_dict()`` (parked moments are
served from the host buffers by a hook) and Lightning's checkpointing keep working, and moments
keep their dtype. Copies run on a side CUDA stream ordered by events; nothing synchronizes the
device during training. On CPU the same code runs without pinning or streams.

The optimizer is driven through its own hooks, so ``optimizer.step()`` stays the call to make:
a step pre-hook runs after the closure (when gradients are final: measured, clipped, unscaled),
and in stream mode hides the block gradients from the step, which then updates only what lies
outside the blocks; the post-hook steps the blocks one at a time.

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

OFFLOAD_MODES = ("park", "stream")
_ALIGN = 64  # bytes: every moment's slice of a host buffer starts aligned for any dtype


def check_offload(offload: str, idle_moments: str) -> None:
    """Raise for an unknown mode, or for ``park`` with ``idle_moments="drop"`` (nothing left to park)."""
    if offload not in ("none", *OFFLOAD_MODES):
        raise ValueError(f"offload={offload!r} is not one of 'none', 'park', 'stream'.")
    if offload == "park" and idle_moments == "drop":
        raise ValueError(
            "offload='park' with idle_moments='drop': park keeps idle blocks' moments in host memory, "
            "but 'drop' frees them. Set idle_moments='keep', or use offload='stream'."
        )


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


class MomentOffloader:
    """Keeps the optimizer moments of blocks in host memory; see the module docstring.

    Args:
        blocks: the parameters of each block.
        optimizer: the one optimizer over them (Adam-like: per-parameter state).
        mode: ``"park"`` or ``"stream"``.
    """

    def __init__(self, blocks: Sequence[Sequence[nn.Parameter]], optimizer: Optimizer, mode: str) -> None:
        if mode not in OFFLOAD_MODES:
            raise ValueError(f"offload={mode!r} is not one of {OFFLOAD_MODES}.")
        self.blocks = [list(params) for params in blocks]
        self.optimizer = optimizer
        self.mode = mode
        self.device = self.blocks[0][0].device
        self._copies = CopyStream(self.device)
        self._pin = self.device.type == "cuda"
        self.active: list[int] = []
        self._slots: dict[int, list[_Slot]] = {}
        self._host: dict[int, torch.Tensor] = {}
        self._resident: dict[int, torch.cuda.Event | None] = {}  # block -> its upload's event (None: done)
        self._hidden: dict[nn.Parameter, torch.Tensor] = {}
        self._step_kwargs: dict = {}
        self._stepping = False
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
            optimizer.register_state_dict_post_hook(self._state_dict),
            optimizer.register_load_state_dict_post_hook(lambda _: self.attach()),
        ]
        self.attach()

    def attach(self) -> None:
        """Index the optimizer's state and send every block that should not be resident to the host.

        Runs at construction and after ``optimizer.load_state_dict`` (which builds new state
        tensors on the parameters' device; Lightning then moves them there again, a no-op).
        """
        self._copies.synchronize()
        self._slots.clear()
        self._resident.clear()
        for block in range(len(self.blocks)):
            if self._index(block):
                self._resident[block] = None  # everything the optimizer holds is on the device now
        self.set_active(self.active)

    def set_active(self, active: Sequence[int]) -> None:
        """Announce the active set of the coming steps; starts the copies it needs."""
        self.active = list(active)
        keep = set(self.active) if self.mode == "park" else set(self.active[:1])  # stream: prefetch the first
        for block in [b for b in self._resident if b not in keep]:
            self._download(block)
        for block in keep:
            self._upload(block)

    def forget(self, block: int) -> None:
        """The optimizer dropped this block's moments (``idle_moments="drop"``): drop the host copy too.

        An upload into them may still be in flight (stream mode prefetches the next step's first
        block, and the draw may then drop it): the compute stream waits for it before the memory
        goes back to the allocator, which would otherwise hand it out while the copy writes.
        """
        self._wait(block)
        self._resident.pop(block, None)
        self._slots.pop(block, None)
        self._host.pop(block, None)

    def device_bytes(self) -> int:
        """Bytes of block moments allocated on the training device right now."""
        return sum(t.untyped_storage().nbytes() for params in self.blocks for p in params for _, t in self._moments(p))

    def host_bytes(self) -> int:
        """Bytes of the host buffers that hold block moments."""
        return sum(buffer.numel() for buffer in self._host.values())

    def close(self) -> None:
        """Remove the hooks and put parked moments back into ``optimizer.state`` as ordinary host
        tensors (Lightning moves all state to the CPU at teardown; pinned buffers are freed)."""
        if not self._handles:
            return
        self._copies.synchronize()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for block, slots in self._slots.items():
            if block not in self._resident:
                for slot in slots:
                    self.optimizer.state[slot.param][slot.key] = self._host_view(block, slot).clone()
        self._slots.clear()
        self._host.clear()
        self._resident.clear()

    # -- the optimizer step ------------------------------------------------------------------

    def _before_step(self, optimizer: Optimizer, args: tuple, kwargs: dict):
        if self._stepping:
            return None
        kwargs = dict(kwargs)  # args[0] is the optimizer itself, args[1] a positional closure
        closure = kwargs.pop("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._ready(kwargs)
            return None

        def closure_then_ready():
            loss = closure()  # forward, backward and (under Lightning) measuring and clipping
            self._ready(kwargs)
            return loss

        return args[:1], {**kwargs, "closure": closure_then_ready}

    def _ready(self, step_kwargs: dict) -> None:
        """Gradients are final: wait for the moments this step needs; stream mode hides block gradients."""
        if self.mode == "park":
            for block in self.active:
                self._wait(block)
            return
        self._step_kwargs = step_kwargs
        self._hidden = {p: p.grad for params in self.blocks for p in params if p.grad is not None}
        for p in self._hidden:
            p.grad = None

    def _after_step(self, optimizer: Optimizer, args: tuple, kwargs: dict) -> None:
        if self._stepping or self.mode != "stream":
            return
        hidden, self._hidden = self._hidden, {}
        stepped = {p: p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None}
        for p in stepped:  # the parameters outside the blocks took their step already
            p.grad = None
        with_grads = {b for b, params in enumerate(self.blocks) if any(p in hidden for p in params)}
        order = [b for b in self.active if b in with_grads] + sorted(with_grads - set(self.active))
        self._stepping = True
        try:
            for i, block in enumerate(order):
                self._upload(block)
                if i + 1 < len(order):
                    self._upload(order[i + 1])  # prefetch while this block steps
                self._wait(block)
                for p in self.blocks[block]:
                    p.grad = hidden.get(p)
                optimizer.step(**self._step_kwargs)
                for p in self.blocks[block]:
                    p.grad = None
                self._download(block)
        finally:
            self._stepping = False
            for p, grad in (*hidden.items(), *stepped.items()):
                p.grad = grad
        if self.active:
            self._upload(self.active[0])  # the next step's first block, during its forward+backward

    # -- moving one block ----------------------------------------------------------------------

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
        self._slots[block] = slots
        buffer = self._host.get(block)
        if slots and (buffer is None or buffer.numel() < offset):
            self._host[block] = torch.empty(offset, dtype=torch.uint8, pin_memory=self._pin)
        return slots

    def _host_view(self, block: int, slot: _Slot) -> torch.Tensor:
        raw = self._host[block][slot.offset : slot.offset + slot.nbytes]
        return raw.view(slot.tensor.dtype).view(slot.tensor.shape)

    def _download(self, block: int) -> None:
        """Write a resident block's moments to host memory and free their device storage."""
        self._resident.pop(block, None)
        slots = self._index(block)  # the step may just have created them
        with self._copies.side():
            for slot in slots:
                self._host_view(block, slot).copy_(slot.tensor, non_blocking=True)
                self._copies.protect(slot.tensor)  # the allocator waits for the copy before reuse
                slot.tensor.untyped_storage().resize_(0)

    def _upload(self, block: int) -> None:
        """Start bringing a parked block's moments back to the device. A block without moments yet
        counts as resident: the optimizer will create them there."""
        if block in self._resident:
            return
        slots = self._slots.get(block, [])
        self._resident[block] = None
        for slot in slots:  # allocated on the compute stream, which will use them
            slot.tensor.untyped_storage().resize_(slot.nbytes)
        with self._copies.side():
            for slot in slots:
                slot.tensor.copy_(self._host_view(block, slot), non_blocking=True)
            self._resident[block] = self._copies.record()

    def _wait(self, block: int) -> None:
        event = self._resident.get(block)
        if event is not None:
            self._copies.wait(event)
            self._resident[block] = None

    def _state_dict(self, optimizer: Optimizer, state_dict: dict) -> dict:
        """Serve parked moments from their host buffers: their device tensors hold no storage."""
        self._copies.synchronize()
        index = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
        for block, slots in self._slots.items():
            if block in self._resident:
                continue
            for slot in slots:
                i = index[id(slot.param)]
                state_dict["state"][i] = {**state_dict["state"][i], slot.key: self._host_view(block, slot)}
        return state_dict


class CopyStream:
    """Where the offloader's copies run: a side CUDA stream ordered by events, or inline on CPU.

    Every stream operation of the offloader goes through here, so its ordering can be checked
    without a GPU (tests substitute a recording stand-in).
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
