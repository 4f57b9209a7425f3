"""GrassSchedule driven by a plain PyTorch loop: phases, who changes, sampling, idle moments."""

import copy

import pytest
import torch
from torch import nn

from grass_lightning import GrassConfig, GrassSchedule, find_blocks
from tests.helpers.loop import plain_steps
from tests.helpers.models import ScaledBlocks, regression_batch


def _make(seed=0, free_in_backward=True, **config):
    torch.manual_seed(0)
    model = ScaledBlocks()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    defaults = dict(num_active=1, sampling_period=2, refresh_interval=2, probe_steps=3)
    schedule = GrassSchedule(find_blocks(model, "body.layers"), [optimizer], GrassConfig(**{**defaults, **config}), seed,
                             free_in_backward=free_in_backward)
    schedule.start()
    return model, optimizer, schedule


def _blocks_of(names):
    return {int(n.split(".")[2]) for n in names if n.startswith("body.layers.")}


def test_probing_updates_nothing_then_only_active_blocks_and_the_head_change():
    model, optimizer, schedule = _make(probe_steps=3)
    steps = list(plain_steps(model, optimizer, schedule, 20))
    for active, probing, changed in steps[:3]:
        assert probing and changed == set()
    for active, probing, changed in steps[3:]:
        assert not probing
        assert _blocks_of(changed) == set(active)
        assert {"out.weight", "out.bias"} <= changed  # train_head=True
        assert not {"embed.weight", "embed.bias"} & changed  # train_embeddings=False


def test_active_set_is_redrawn_every_sampling_period_after_the_probe():
    model, optimizer, schedule = _make(probe_steps=3, sampling_period=4, refresh_interval=2)
    list(plain_steps(model, optimizer, schedule, 15))
    assert [step for step, _ in schedule.history] == [3, 7, 11, 15]


def test_probe_sets_the_estimate_of_every_block_and_refreshes_touch_only_active_ones():
    model, optimizer, schedule = _make(probe_steps=2, sampling_period=5, refresh_interval=5)
    estimates = []
    for active, probing, _ in plain_steps(model, optimizer, schedule, 7):
        estimates.append((schedule.step, schedule.importance.estimate.clone()))
    after_probe = dict(estimates)[2]
    assert not after_probe.isnan().any()
    after_refresh = dict(estimates)[7]
    (active,) = schedule.history[0][1]
    moved = (after_refresh != after_probe).nonzero().flatten().tolist()
    assert moved == [active]


def test_uniform_sampler_trains_every_block():
    model, optimizer, schedule = _make(sampler="uniform", probe_steps=0, sampling_period=1)
    trained = set()
    for _, _, changed in plain_steps(model, optimizer, schedule, 30):
        trained |= _blocks_of(changed)
    assert trained == {0, 1, 2, 3}
    assert schedule.importance.estimate.isnan().all()  # LISA measures nothing: its step time is LISA's


def test_grass_chooses_blocks_with_larger_gradients_more_often():
    # ScaledBlocks multiplies block outputs by (0.1, 0.2, 1.0, 3.0): gradients grow with the scale.
    counts = {}
    for sampler in ("grass", "uniform"):
        model, optimizer, schedule = _make(sampler=sampler, probe_steps=3 if sampler == "grass" else 0,
                                           sampling_period=1, refresh_interval=1)
        list(plain_steps(model, optimizer, schedule, 300))
        counts[sampler] = torch.bincount(torch.tensor([a[0] for _, a in schedule.history]), minlength=4)
    grass = counts["grass"]
    assert grass[3] > grass[2] > max(grass[0], grass[1])
    assert grass[3] > 1.5 * counts["uniform"][3]


def test_static_sampler_never_refreshes_after_the_probe():
    model, optimizer, schedule = _make(sampler="static", probe_steps=3, sampling_period=1, refresh_interval=1)
    steps = plain_steps(model, optimizer, schedule, 20)
    for _ in range(4):
        next(steps)
    frozen = (schedule.importance.estimate.clone(), schedule.probabilities.clone())
    list(steps)
    assert torch.equal(schedule.importance.estimate, frozen[0]) and torch.equal(schedule.probabilities, frozen[1])


def test_same_seed_same_run_other_seed_other_blocks():
    histories = []
    for seed in (0, 0, 1):
        model, optimizer, schedule = _make(seed=seed, sampling_period=1, refresh_interval=1)
        list(plain_steps(model, optimizer, schedule, 25))
        histories.append(schedule.history)
    assert histories[0] == histories[1] and histories[0] != histories[2]


def test_an_optimizer_built_after_freezing_is_refused():
    model = ScaledBlocks()
    for p in model.body.layers[1:].parameters():
        p.requires_grad_(False)
    for p in model.body.layers[2].parameters():
        p.requires_grad_(True)  # the user unfroze block 2 again after building the optimizer
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad and p.dim() > 1])
    with pytest.raises(ValueError, match=r"body\.layers\.0\.0\.bias is in no optimizer"):
        GrassSchedule(find_blocks(model, "body.layers"), [optimizer], GrassConfig(), seed=0)


def test_user_frozen_parameters_stay_frozen():
    model = ScaledBlocks()
    optimizer = torch.optim.AdamW(model.parameters())
    model.body.layers[0][0].bias.requires_grad_(False)
    schedule = GrassSchedule(find_blocks(model, "body.layers"), [optimizer],
                             GrassConfig(num_active=4, probe_steps=1), seed=0)
    schedule.start()
    list(plain_steps(model, optimizer, schedule, 3))
    assert not model.body.layers[0][0].bias.requires_grad
    schedule.close()
    assert not model.body.layers[0][0].bias.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "body.layers.0.0.bias")


def _state_bytes(optimizer):
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim() > 0)


def test_drop_bounds_optimizer_state_by_the_active_set():
    model, optimizer, schedule = _make(num_active=2, sampling_period=1, idle_moments="drop", probe_steps=1)
    block_bytes = max(sum(p.numel() for p in b.parameters()) for b in model.body.layers) * 4 * 2  # fp32 m and v
    head_bytes = sum(p.numel() for p in model.out.parameters()) * 4 * 2
    peak = 0

    def measure(schedule, optimizer):
        nonlocal peak
        peak = max(peak, _state_bytes(optimizer))

    list(plain_steps(model, optimizer, schedule, 40, after_backward=measure))
    assert len({b for _, a in schedule.history for b in a}) == 4  # every block came and went
    assert 0 < peak <= 2 * block_bytes + head_bytes
    assert _state_bytes(optimizer) <= 2 * block_bytes + head_bytes


def test_keep_resumes_a_returning_block_from_its_previous_moments():
    model, optimizer, schedule = _make(num_active=1, sampling_period=1, idle_moments="keep", probe_steps=1)
    params = {i: list(b.parameters()) for i, b in enumerate(model.body.layers)}
    keys = ("step", "exp_avg", "exp_avg_sq")
    parked, returns = {}, 0

    def check(schedule, optimizer):
        nonlocal returns
        if schedule.probing:
            return
        (active,) = schedule.active
        if active in parked:  # a returning block: its moments are those it left with
            for p, saved in zip(params[active], parked.pop(active)):
                assert all(torch.equal(optimizer.state[p][k], v) for k, v in zip(keys, saved))
            returns += 1
        for b in range(4):  # snapshot every idle block that has moments
            if b != active and params[b][0] in optimizer.state:
                parked.setdefault(b, [tuple(optimizer.state[p][k].clone() for k in keys) for p in params[b]])

    list(plain_steps(model, optimizer, schedule, 40, after_backward=check))
    assert returns > 5
    total = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.embed.parameters())
    assert _state_bytes(optimizer) == total * 4 * 2  # every block's moments kept


def test_state_dict_round_trip_resumes_exactly():
    model, optimizer, schedule = _make(sampling_period=3, refresh_interval=2, probe_steps=4)
    list(plain_steps(model, optimizer, schedule, 2))  # stop mid-probe
    saved = copy.deepcopy((schedule.state_dict(), model.state_dict(), optimizer.state_dict()))
    list(plain_steps(model, optimizer, schedule, 12, seed=5))

    model2, optimizer2, schedule2 = _make(seed=99, sampling_period=3, refresh_interval=2, probe_steps=4)
    model2.load_state_dict(saved[1])
    optimizer2.load_state_dict(saved[2])
    schedule2.load_state_dict(saved[0])
    schedule2.start()
    list(plain_steps(model2, optimizer2, schedule2, 12, seed=5))
    assert schedule2.history == schedule.history and len(schedule.history) == 4
    assert torch.equal(schedule2.importance.estimate, schedule.importance.estimate)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_a_nonfinite_reading_in_backward_is_skipped_and_counted():
    model, optimizer, schedule = _make(num_active=4, sampling_period=1, refresh_interval=1, probe_steps=2)
    list(plain_steps(model, optimizer, schedule, 5))
    before = schedule.importance.estimate.clone()
    x, y = regression_batch(torch.Generator().manual_seed(0))
    schedule.before_backward()
    nn.functional.mse_loss(model(x), y * float("nan")).backward()
    schedule.measure()
    optimizer.zero_grad()
    schedule.end_step()
    assert int(schedule.importance.nonfinite) == 4
    assert torch.equal(schedule.importance.estimate, before) and torch.isfinite(schedule.probabilities).all()


@pytest.mark.parametrize("free_in_backward", [True, False], ids=["one-process", "data-parallel"])
def test_a_step_without_backward_leaves_the_active_blocks_unmeasured(free_in_backward):
    """A skipped batch (training_step returned None) is no evidence of a zero gradient."""
    model, optimizer, schedule = _make(num_active=2, sampling_period=100, refresh_interval=1, probe_steps=1,
                                       free_in_backward=free_in_backward)
    list(plain_steps(model, optimizer, schedule, 3))
    before = schedule.importance.estimate.clone()
    schedule.measure()  # the optimizer step fires with no backward and no gradients
    optimizer.step()
    schedule.end_step()
    assert torch.equal(schedule.importance.estimate, before)


@pytest.mark.parametrize("free_in_backward", [True, False], ids=["one-process", "data-parallel"])
def test_a_block_without_gradient_in_the_probe_stays_unmeasured_on_every_path(free_in_backward):
    """One rule on one process and under DDP: no gradient means not measured (NaN), which
    `filled` ranks with the best known block, never a zero that starves it."""
    model, optimizer, schedule = _make(num_active=1, probe_steps=2, free_in_backward=free_in_backward)
    for p in model.body.layers[2].parameters():
        p.requires_grad_(False)  # e.g. a block that the loss does not reach
    list(plain_steps(model, optimizer, schedule, 2))
    estimate = schedule.importance.estimate
    assert estimate[2].isnan() and not estimate[[0, 1, 3]].isnan().any()


def _drifting_run(reprobe_steps, steps=30, jump_at=14, factor=30.0, free_in_backward=True):
    """Gradients grow 30x mid-run (the loss is multiplied; AdamW's updates do not change)."""
    model, optimizer, schedule = _make(num_active=1, sampling_period=2, refresh_interval=4, probe_steps=2,
                                       reprobe_steps=reprobe_steps, free_in_backward=free_in_backward)
    list(plain_steps(model, optimizer, schedule, steps, loss_scale=lambda step: factor if step >= jump_at else 1.0))
    return schedule


@pytest.mark.parametrize("free_in_backward", [True, False], ids=["one-process", "data-parallel"])
def test_reprobe_keeps_the_true_order_of_blocks_when_the_gradient_scale_grows_30x(free_in_backward):
    # ScaledBlocks' blocks have gradients in the order of their output scales 0.1 < 0.2 < 1 < 3
    paper = _drifting_run(reprobe_steps=0, free_in_backward=free_in_backward)
    assert paper.importance.estimate.argsort().tolist() != [0, 1, 2, 3]  # stale blocks ranked by their old scale
    corrected = _drifting_run(reprobe_steps=1, free_in_backward=free_in_backward)
    assert corrected.importance.estimate.argsort().tolist() == [0, 1, 2, 3]


def test_reprobe_steps_measure_every_block_train_only_the_active_set_and_drop_idle_gradients():
    model, optimizer, schedule = _make(num_active=1, sampling_period=4, refresh_interval=4, probe_steps=2,
                                       reprobe_steps=2)
    reprobing, idle_grads = [], []

    def look(schedule, optimizer):
        reprobing.append(schedule.reprobing)
        idle = [b for b in range(4) if b not in schedule.active]
        idle_grads.append(any(p.grad is not None for b in idle for p in model.body.layers[b].parameters()))

    recorded = []
    original = schedule.importance.record
    schedule.importance.record = lambda blocks, rms: (recorded.append(list(blocks)), original(blocks, rms))
    steps = list(plain_steps(model, optimizer, schedule, 14, after_backward=look))
    assert reprobing == [False] * 2 + [False, False, True, True] * 3  # the last 2 of each window of 4
    for (active, probing, changed), again in zip(steps[2:], reprobing[2:]):
        assert _blocks_of(changed) == set(active)  # a re-probe step still trains the active set, only it
    assert not any(idle_grads[2:])  # read and dropped in backward
    assert recorded == [[0, 1, 2, 3]] * 2 + [[0, 1, 2, 3]] * 6  # probe, then only the re-probe steps, every block
    assert all(p.requires_grad == (b in schedule.active) for b in range(4) for p in model.body.layers[b].parameters())


def test_a_resume_inside_a_reprobe_opens_the_idle_blocks_again():
    model, optimizer, schedule = _make(num_active=1, sampling_period=4, refresh_interval=4, probe_steps=2,
                                       reprobe_steps=2)
    list(plain_steps(model, optimizer, schedule, 5))  # the next step is the window's 3rd: a re-probe
    assert schedule.reprobing
    state = copy.deepcopy(schedule.state_dict())
    model2, optimizer2, resumed = _make(num_active=1, sampling_period=4, refresh_interval=4, probe_steps=2,
                                        reprobe_steps=2)
    resumed.load_state_dict(state)
    resumed.start()
    assert resumed.reprobing and all(p.requires_grad for p in model2.body.layers.parameters())


def test_activate_trains_the_chosen_blocks_until_the_next_draw():
    model, optimizer, schedule = _make(probe_steps=1, sampling_period=3)
    with pytest.raises(RuntimeError, match="activate\\(\\) while probing"):
        schedule.activate([0])
    steps = plain_steps(model, optimizer, schedule, 1)
    next(steps)  # the probe step; the first draw follows
    schedule.activate([0])
    trained = [(active, _blocks_of(changed)) for active, _, changed in plain_steps(model, optimizer, schedule, 5)]
    assert trained[0] == ([0], {0}) and schedule.history[1] == (1, [0])
    assert trained[2][0] == [0] and len(schedule.history) == 3  # the sampler draws again at its period


def test_processes_that_draw_different_active_sets_fail_loudly_at_that_draw():
    """`across` sums over processes; here the other process always trains block 0 only, so the
    first draw that is not [0] on this one must raise (ranks would silently diverge under DDP, or
    hang in FSDP2's collectives)."""
    def across(t):  # this process's tensor plus another's: block 0 active, one process counted
        other = torch.zeros_like(t)
        if t.numel() == 5:  # the draw check's mask: 4 blocks and the process count
            other[0] = other[-1] = 1.0
        return t + other

    torch.manual_seed(0)
    model = ScaledBlocks()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = GrassConfig(num_active=1, sampling_period=1, refresh_interval=1, probe_steps=0, sampler="uniform")
    schedule = GrassSchedule(find_blocks(model, "body.layers"), [optimizer], config, seed=1, free_in_backward=False,
                             across=across)
    with pytest.raises(RuntimeError, match=r"different active sets from the sampler \(this one \[[123]\]; per block, "
                                           r"how many processes train it: \[1, "):
        schedule.start()
        for _ in range(20):  # uniform draws over 4 blocks: one is not [0] long before 20
            assert schedule.active == [0]
            schedule.end_step()
