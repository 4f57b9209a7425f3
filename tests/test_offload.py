"""MomentOffloader in a plain PyTorch loop on CPU: same numbers as without offload, only the
allowed blocks' moments allocated on the device, checkpoints that load with or without it."""

import copy
import weakref

import pytest
import torch
from torch import nn

from grass_lightning import GrassConfig, GrassSchedule, find_blocks
from grass_lightning.core.offload import CopyStream, StreamOffloader
from tests.helpers.loop import plain_steps
from tests.helpers.models import ScaledBlocks, regression_batch

CONFIG = dict(num_active=2, sampling_period=3, refresh_interval=3, probe_steps=2, idle_moments="keep")


def _make(offload, seed=0, **config):
    torch.manual_seed(0)
    model = ScaledBlocks(scales=(0.1, 0.2, 1.0, 3.0, 0.5, 2.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = GrassSchedule(find_blocks(model, "body.layers"), [optimizer], GrassConfig(**{**CONFIG, **config}),
                             seed, offload=offload)
    schedule.start()
    return model, optimizer, schedule


def _block_bytes(optimizer, block):
    return sum(t.untyped_storage().nbytes() for p in block.parameters()
               for k, t in optimizer.state.get(p, {}).items() if k != "step")


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        for key in sa["state"][i]:
            assert torch.equal(sa["state"][i][key], sb["state"][i][key]), (i, key)


@pytest.mark.parametrize("offload", ["park", "stream"])
@pytest.mark.parametrize("use_closure", [False, True], ids=["step", "closure"])
def test_training_with_offload_is_bit_identical_to_training_without(offload, use_closure):
    plain = _make("none")
    offloaded = _make(offload)
    list(plain_steps(*plain, 20, clip=0.05))
    list(plain_steps(*offloaded, 20, clip=0.05, use_closure=use_closure))
    assert plain[2].history == offloaded[2].history and len(plain[2].history) >= 6
    assert all(torch.equal(a, b) for a, b in zip(plain[0].parameters(), offloaded[0].parameters()))
    _same_state(plain[1], offloaded[1])


@pytest.mark.parametrize("offload", ["park", "stream"])
def test_only_the_allowed_blocks_moments_are_on_the_device(offload):
    model, optimizer, schedule = _make(offload, sampling_period=1, refresh_interval=1, sampler="uniform", probe_steps=0)
    block_bytes = {i: sum(p.numel() * 4 * 2 for p in b.parameters()) for i, b in enumerate(model.body.layers)}
    seen = []

    def count(schedule):
        resident = {i for i, b in enumerate(model.body.layers) if _block_bytes(optimizer, b)}
        seen.append(resident)
        allowed = set(schedule.active) if offload == "park" else set(schedule.active[:1])  # stream: one prefetched
        assert resident <= allowed, (resident, schedule.active)
        assert schedule.offloader.device_bytes() == sum(block_bytes[i] for i in resident)

    peak = 0

    def watch(optimizer, args, kwargs):  # inside stream's block-by-block steps
        nonlocal peak
        peak = max(peak, sum(1 for b in model.body.layers if _block_bytes(optimizer, b)))

    optimizer.register_step_pre_hook(watch)
    for _ in plain_steps(model, optimizer, schedule, 25):
        count(schedule)
    assert any(seen[-10:]), "no block was ever resident"
    if offload == "stream":
        assert peak <= 2
    visited = {b for _, active in schedule.history for b in active}
    assert len(visited) == 6
    assert schedule.offloader.host_bytes() >= sum(block_bytes[b] for b in visited)


@pytest.mark.parametrize("offload", ["park", "stream"])
def test_checkpoint_save_load_resume_is_exact_and_portable_across_offload_settings(offload):
    reference = _make("none")
    list(plain_steps(*reference, 16, seed=3))

    first = _make(offload)
    list(plain_steps(*first, 7, seed=3))  # mid sampling-period
    saved = copy.deepcopy((first[0].state_dict(), first[1].state_dict(), first[2].state_dict()))
    assert all(t.untyped_storage().nbytes() for s in saved[1]["state"].values() for t in s.values())

    for resume_with in (offload, "none"):
        model, optimizer, schedule = _make(resume_with, seed=42)
        model.load_state_dict(saved[0])
        optimizer.load_state_dict(copy.deepcopy(saved[1]))
        schedule.load_state_dict(saved[2])
        schedule.start()
        g = torch.Generator().manual_seed(3)
        for _ in range(7):
            regression_batch(g)  # the batches the first run already consumed
        list(plain_steps(model, optimizer, schedule, 9, generator=g))
        assert schedule.history == reference[2].history
        assert all(torch.equal(a, b) for a, b in zip(reference[0].parameters(), model.parameters()))
        _same_state(reference[1], optimizer)

    # and a checkpoint written without offload resumes with it
    model, optimizer, schedule = _make(offload, seed=42)
    plain = _make("none")
    list(plain_steps(*plain, 7, seed=3))
    model.load_state_dict(plain[0].state_dict())
    optimizer.load_state_dict(copy.deepcopy(plain[1].state_dict()))
    schedule.load_state_dict(plain[2].state_dict())
    schedule.start()
    assert schedule.offloader.device_bytes() <= sum(_block_bytes(optimizer, model.body.layers[b]) for b in schedule.active)


def test_stream_with_drop_bounds_host_and_device_memory_by_the_active_set():
    plain = _make("none", idle_moments="drop")
    model, optimizer, schedule = _make("stream", idle_moments="drop")
    list(plain_steps(*plain, 20))
    list(plain_steps(model, optimizer, schedule, 20))
    assert all(torch.equal(a, b) for a, b in zip(plain[0].parameters(), model.parameters()))
    largest = max(sum(p.numel() * 4 * 2 for p in b.parameters()) for b in model.body.layers)
    assert 0 < schedule.offloader.host_bytes() <= 2 * (largest + 2 * 64)  # the active blocks' only (+ alignment)


class _RecordingCopies(CopyStream):
    """Stands in for the side CUDA stream on CPU: numbers the events it records and logs what the
    compute stream is made to wait for (the copies themselves run inline)."""

    def __init__(self, log: list) -> None:
        super().__init__(torch.device("cpu"))
        self.log, self.events = log, 0

    def record(self):
        self.events += 1
        return self.events

    def wait(self, event) -> None:
        self.log.append(("wait", event))


def test_stream_with_drop_waits_for_a_prefetch_before_releasing_its_memory():
    """Stream mode prefetches the next step's first block at the end of a step; when the draw that
    follows drops that block, its device memory goes back to the allocator. The compute stream
    must wait for the prefetch first, or the next forward pass can be handed memory that the copy
    is still writing (a CUDA race)."""
    model, optimizer, schedule = _make("stream", idle_moments="drop", num_active=1, sampling_period=1,
                                       sampler="uniform", probe_steps=0)
    log = []
    offloader = schedule.offloader
    offloader.host.copies = _RecordingCopies(log)
    g = torch.Generator().manual_seed(0)
    dropped = 0
    for _ in range(30):
        x, y = regression_batch(g)
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        first = schedule.active[0]
        prefetch = offloader.host.resident.get(first)  # the upload started for the next step, still "in flight"
        for slot in offloader.host.slots.get(first, []):
            weakref.finalize(slot.tensor, log.append, ("release", first, prefetch))
        schedule.end_step()
        if first not in schedule.active and prefetch is not None:
            dropped += 1
            released = log.index(("release", first, prefetch))
            assert ("wait", prefetch) in log[:released], log[-6:]
    assert dropped >= 5


def test_close_gives_the_optimizer_its_moments_back_as_host_tensors():
    model, optimizer, schedule = _make("stream")
    list(plain_steps(model, optimizer, schedule, 12))
    expected = copy.deepcopy(optimizer.state_dict())
    schedule.close()
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_state_dict_post_hooks
    for p, state in optimizer.state.items():
        for key, t in state.items():
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    _same_state_dicts(expected, optimizer.state_dict())


def _same_state_dicts(a, b):
    for i in a["state"]:
        for key in a["state"][i]:
            assert torch.equal(a["state"][i][key], b["state"][i][key])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(offload="cpu"), "offload='cpu' is not one of 'none', 'park', 'stream'"),
        (dict(offload="park", idle_moments="drop"), "offload='park' with idle_moments='drop'.*idle_moments='keep'"),
    ],
)
def test_bad_offload_settings_are_refused(kwargs, message):
    offload = kwargs.pop("offload")
    with pytest.raises(ValueError, match=message):
        _make(offload, **kwargs)


def test_offload_needs_a_single_optimizer():
    model = ScaledBlocks()
    optimizers = [torch.optim.AdamW(model.body.parameters()), torch.optim.AdamW([*model.embed.parameters(), *model.out.parameters()])]
    with pytest.raises(ValueError, match="offload='stream' needs exactly one optimizer; the module has 2"):
        GrassSchedule(find_blocks(model, "body.layers"), optimizers, GrassConfig(), 0, offload="stream")


def test_moments_keep_their_dtype_in_a_bf16_model():
    torch.manual_seed(0)
    model = ScaledBlocks().to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    offloader = StreamOffloader([list(b.parameters()) for b in model.body.layers], optimizer)
    x = torch.randn(8, 4, dtype=torch.bfloat16)
    model(x).square().mean().backward()
    optimizer.step()
    state = optimizer.state_dict()["state"]
    assert {t.dtype for s in state.values() for k, t in s.items() if k != "step"} == {torch.bfloat16}
    assert offloader.device_bytes() == 0
