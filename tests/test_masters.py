"""fp32 master weights for bf16 parameters, in plain PyTorch: why they are needed (pure bf16 AdamW
loses small updates), that they follow the fp32 trajectory, that they exist only for what trains,
and that they survive offloading and checkpoints."""

import copy

import pytest
import torch

from grass_lightning import GrassConfig, GrassSchedule, find_blocks
from grass_lightning.core.masters import MASTER, MasterWeights, keep_fp32_state
from tests.helpers.models import ScaledBlocks, tiny_hf

LR = 5e-5


def _bf16_exact_llama():
    """A tiny Llama whose fp32 weights are bf16 values, so the fp32 and bf16 runs start equal."""
    model = tiny_hf("llama")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    return model


def _moved_share(model, start) -> float:
    """Share of weights whose bf16 value differs from the start's."""
    moved = total = 0
    for p, q in zip(model.parameters(), start.parameters()):
        moved += int((p.detach().bfloat16() != q.detach().bfloat16()).sum())
        total += p.numel()
    return moved / total


def _train(model, optimizer, steps=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (4, 12), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_pure_bf16_adamw_leaves_most_small_updates_unmade_and_masters_make_them():
    """At lr 5e-5 a step is below half a bf16 ulp of most weights: pure bf16 AdamW leaves them
    where they were; with fp32 masters as many bf16 values move as in fp32 training."""
    start = _bf16_exact_llama()
    fp32, naive, masters = copy.deepcopy(start), copy.deepcopy(start).bfloat16(), copy.deepcopy(start).bfloat16()
    optimizers = [torch.optim.AdamW(m.parameters(), lr=LR) for m in (fp32, naive, masters)]
    MasterWeights(optimizers[2])
    for model, optimizer in zip((fp32, naive, masters), optimizers):
        _train(model, optimizer)
    share_fp32, share_naive, share_masters = (_moved_share(m, start) for m in (fp32, naive, masters))
    assert share_fp32 > 0.8
    assert share_naive < 0.7 * share_fp32  # 0.54 against 0.95 when written
    assert share_masters > 0.95 * share_fp32
    assert {p.dtype for p in masters.parameters()} == {torch.bfloat16}
    state = optimizers[2].state[masters.model.layers[0].mlp.up_proj.weight]
    assert {key: t.dtype for key, t in state.items() if key != "step"} == dict.fromkeys(("exp_avg", "exp_avg_sq", MASTER),
                                                                                          torch.float32)


def test_masters_follow_the_fp32_trajectory_exactly_given_the_same_gradients():
    """Fed the same gradients, the master is the fp32 run's weight bit for bit after every step,
    and the bf16 weight is that value rounded to nearest."""
    start = _bf16_exact_llama()
    fp32, half = copy.deepcopy(start), copy.deepcopy(start).bfloat16()
    opt32 = torch.optim.AdamW(fp32.parameters(), lr=LR, weight_decay=0.1)
    opt16 = torch.optim.AdamW(half.parameters(), lr=LR, weight_decay=0.1)
    MasterWeights(opt16)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        ids = torch.randint(0, 64, (4, 12), generator=g)
        fp32(input_ids=ids, labels=ids).loss.backward()
        for p, q in zip(fp32.parameters(), half.parameters()):
            q.grad = p.grad.bfloat16()
            p.grad = q.grad.float()  # the same (bf16-representable) gradient for both
        opt32.step(), opt16.step()
        opt32.zero_grad(), opt16.zero_grad()
        for p, q in zip(fp32.parameters(), half.parameters()):
            assert torch.equal(opt16.state[q][MASTER], p.detach())
            assert torch.equal(q.detach(), p.detach().bfloat16())


def _bf16_schedule(offload="none", idle_moments="drop", **config):
    torch.manual_seed(0)
    model = ScaledBlocks(scales=(0.1, 0.2, 1.0, 3.0, 0.5, 2.0), width=16).bfloat16()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    config = GrassConfig(**{**dict(num_active=2, sampling_period=3, refresh_interval=3, probe_steps=2,
                                   idle_moments=idle_moments), **config})
    schedule = GrassSchedule(find_blocks(model, "body.layers"), [optimizer], config, seed=0, offload=offload)
    schedule.start()
    return model, optimizer, schedule


def _bf16_steps(model, optimizer, schedule, steps, generator=None):
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=g).bfloat16()
        active = list(schedule.active)
        schedule.before_backward()
        torch.nn.functional.mse_loss(model(x), x.sum(-1).sin()).backward()
        schedule.measure()
        optimizer.step()
        optimizer.zero_grad()
        schedule.end_step()
        yield active


def test_masters_and_moments_exist_only_for_the_trainable_set():
    """12 bytes per trained parameter (fp32 master, exp_avg, exp_avg_sq) for the active blocks and
    the head, none for idle blocks or the frozen embeddings; a leaving block's master goes with its
    moments."""
    model, optimizer, schedule = _bf16_schedule()
    layout = schedule.active_set.layout
    held, trained = [], []

    def count(optimizer, args, kwargs):  # right after each step, before the schedule's next draw
        held.append(sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items() if k != "step"))
        params = [p for i in schedule.active for p in layout.block_params(i)] + list(model.out.parameters())
        trained.append(params if not schedule.probing else [])
        assert set(optimizer.state) == set(trained[-1])

    optimizer.register_step_post_hook(count)
    list(_bf16_steps(model, optimizer, schedule, 8))
    assert held[:2] == [0, 0]  # probe steps update nothing
    assert held[2:] == [12 * sum(p.numel() for p in params) for params in trained[2:]]
    assert len({tuple(map(id, params)) for params in trained[2:]}) > 1  # a draw happened: departed blocks freed
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert sum(m.master_bytes() for m in schedule.masters) == 4 * sum(p.numel() for p in optimizer.state)


def test_master_weights_false_and_fp32_weights_make_no_masters():
    model, optimizer, schedule = _bf16_schedule(master_weights=False)
    list(_bf16_steps(model, optimizer, schedule, 4))
    assert schedule.masters == [] and optimizer.state
    assert {t.dtype for s in optimizer.state.values() for k, t in s.items() if k != "step"} == {torch.bfloat16}
    model = ScaledBlocks()
    optimizer = torch.optim.AdamW(model.parameters())
    assert GrassSchedule(find_blocks(model, "body.layers"), [optimizer], GrassConfig(), 0).masters == []


@pytest.mark.parametrize("offload", ["park", "stream"])
def test_offload_moves_masters_with_the_moments_and_changes_no_number(offload):
    plain = _bf16_schedule(idle_moments="keep")
    offloaded = _bf16_schedule(offload=offload, idle_moments="keep")
    for (model, optimizer, schedule) in (plain, offloaded):
        list(_bf16_steps(model, optimizer, schedule, 10))
    assert all(torch.equal(p, q) for p, q in zip(plain[0].parameters(), offloaded[0].parameters()))
    sa, sb = plain[1].state_dict()["state"], offloaded[1].state_dict()["state"]  # parked ones served from the host
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert any(MASTER in s for s in sb.values())
    schedule = offloaded[2]
    idle = [b for b in range(6) if b not in schedule.active[: 1 if offload == "stream" else 2]]
    host = schedule.offloader.host
    for block in idle:
        for slot in host.slots.get(block, []):
            assert slot.tensor.untyped_storage().nbytes() == 0  # masters and moments both parked
    assert any(slot.key == MASTER for slots in host.slots.values() for slot in slots)


@pytest.mark.parametrize("offload", ["none", "park", "stream"])
def test_a_checkpoint_resumes_bit_exactly_masters_included(offload):
    """6 steps, save, load into a fresh model, optimizer and schedule, 6 more: equal to 12 straight.
    The loaded moments and masters stay fp32 (torch's load_state_dict would cast them to bf16)."""
    straight = _bf16_schedule(offload=offload, idle_moments="keep")
    list(_bf16_steps(*straight, 12))
    first = _bf16_schedule(offload=offload, idle_moments="keep")
    g = torch.Generator().manual_seed(0)
    list(_bf16_steps(*first, 6, generator=g))
    saved = copy.deepcopy((first[0].state_dict(), first[1].state_dict(), first[2].state_dict()))
    model, optimizer, schedule = _bf16_schedule(offload=offload, idle_moments="keep")
    model.load_state_dict(saved[0])
    optimizer.load_state_dict(saved[1])
    schedule.load_state_dict(saved[2])
    schedule.start()
    loaded = optimizer.state_dict()["state"]
    assert any(MASTER in s for s in loaded.values())
    assert {t.dtype for s in loaded.values() for k, t in s.items() if k != "step"} == {torch.float32}
    list(_bf16_steps(model, optimizer, schedule, 6, generator=g))
    assert schedule.history == straight[2].history
    assert all(torch.equal(p, q) for p, q in zip(straight[0].parameters(), model.parameters()))
    sa, sb = straight[1].state_dict()["state"], optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


def test_load_state_dict_casts_fp32_state_to_bf16_unless_kept():
    model = ScaledBlocks().bfloat16()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    MasterWeights(optimizer)
    model(torch.randn(8, 4).bfloat16()).square().mean().backward()
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    plain, kept = (torch.optim.AdamW(model.parameters(), lr=LR) for _ in range(2))
    keep_fp32_state(kept)
    plain.load_state_dict(saved)
    kept.load_state_dict(saved)
    assert {t.dtype for s in plain.state.values() for k, t in s.items() if k != "step"} == {torch.bfloat16}
    for i, p in enumerate(model.parameters()):
        for key in ("exp_avg", "exp_avg_sq", MASTER):
            assert torch.equal(kept.state[p][key], saved["state"][i][key])


def test_a_step_that_raises_leaves_no_parameter_in_fp32_after_close():
    model = ScaledBlocks().bfloat16()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    masters = MasterWeights(optimizer)

    def out_of_memory(*_):
        raise RuntimeError("out of memory")

    optimizer.register_step_pre_hook(out_of_memory)  # after the masters' pre-hook: the step fails
    model(torch.randn(8, 4).bfloat16()).square().mean().backward()
    with pytest.raises(RuntimeError, match="out of memory"):
        optimizer.step()
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # mid-step: the masters stand in
    masters.close()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.grad.dtype for p in model.parameters()} == {torch.bfloat16}
