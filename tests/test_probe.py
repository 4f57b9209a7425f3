"""Reading per-block gradient norms in backward: the probe frees each gradient at once, refreshes
read the same quantity and leave the gradients for the step."""

import pytest
import torch

from grass_lightning.core.probe import GradientProbe
from tests.helpers.models import ScaledBlocks, gradient_rms, regression_batch


def _blocks(model):
    return [list(block.parameters()) for block in model.body.layers]


def test_probe_reads_the_norms_that_backward_produced_and_frees_the_gradients():
    model = ScaledBlocks()
    x, y = regression_batch(torch.Generator().manual_seed(0))
    torch.nn.functional.mse_loss(model(x), y).backward()
    expected = torch.stack([gradient_rms(ps) for ps in _blocks(model)])
    model.zero_grad(set_to_none=True)

    probe = GradientProbe(_blocks(model), range(4), free=range(4))
    probe.begin_backward()
    torch.nn.functional.mse_loss(model(x), y).backward()
    read, rms = probe.take()
    assert read == [0, 1, 2, 3]
    assert rms.tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    assert all(p.grad is None for ps in _blocks(model) for p in ps)
    probe.remove()


def test_probe_holds_at_most_one_parameter_gradient_at_a_time():
    model = ScaledBlocks(width=32)
    largest = max(p.numel() for ps in _blocks(model) for p in ps)
    live = []

    def count(_):
        live.append(sum(p.grad.numel() for ps in _blocks(model) for p in ps if p.grad is not None))

    handles = [p.register_post_accumulate_grad_hook(count) for ps in _blocks(model) for p in ps]
    probe = GradientProbe(_blocks(model), range(4), free=range(4))  # registered after: runs after `count` on each param
    x, y = regression_batch(torch.Generator().manual_seed(0))
    torch.nn.functional.mse_loss(model(x), y).backward()
    assert max(live) <= largest
    for h in handles:
        h.remove()
    probe.remove()


def test_accumulated_probe_rescales_each_pass_to_a_full_step():
    model = ScaledBlocks()
    g = torch.Generator().manual_seed(0)
    batches = [regression_batch(g) for _ in range(2)]
    per_pass = []
    for x, y in batches:  # what each micro-batch alone contributes, loss divided by 2
        model.zero_grad(set_to_none=True)
        (torch.nn.functional.mse_loss(model(x), y) / 2).backward()
        per_pass.append(torch.stack([gradient_rms(ps) ** 2 * sum(p.numel() for p in ps) for ps in _blocks(model)]))
    model.zero_grad(set_to_none=True)
    numel = torch.tensor([sum(p.numel() for p in ps) for ps in _blocks(model)], dtype=torch.float32)
    expected = (2 * (per_pass[0] + per_pass[1]) / numel).sqrt()

    probe = GradientProbe(_blocks(model), range(4), free=range(4))
    for x, y in batches:
        probe.begin_backward()
        (torch.nn.functional.mse_loss(model(x), y) / 2).backward()
    _, rms = probe.take()
    assert rms.tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    # With identical micro-batches the rescaled value is exactly the accumulated gradient's RMS.
    x, y = batches[0]
    for _ in range(2):
        probe.begin_backward()
        (torch.nn.functional.mse_loss(model(x), y) / 2).backward()
    _, same = probe.take()
    probe.remove()
    torch.nn.functional.mse_loss(model(x), y).backward()
    full = torch.stack([gradient_rms(ps) for ps in _blocks(model)])
    assert same.tolist() == pytest.approx(full.tolist(), rel=1e-5)


def test_removed_probe_leaves_gradients_alone():
    model = ScaledBlocks()
    probe = GradientProbe(_blocks(model), range(4), free=range(4))
    probe.remove()
    x, y = regression_batch(torch.Generator().manual_seed(0))
    torch.nn.functional.mse_loss(model(x), y).backward()
    assert all(p.grad is not None for ps in _blocks(model) for p in ps)
    read, _ = probe.take()
    assert read == []


def test_training_reads_measure_what_the_probe_measures_and_keep_the_gradients():
    """Under accumulation the probe cannot read the accumulated gradient without holding it, so a
    refresh reads the same per-pass estimate: same data, same weights, same numbers."""
    model = ScaledBlocks()
    g = torch.Generator().manual_seed(0)
    batches = [regression_batch(g, n=4) for _ in range(3)]

    def read(free, indices):
        probe = GradientProbe(_blocks(model), indices, free=indices if free else ())
        for x, y in batches:
            probe.begin_backward()
            (torch.nn.functional.mse_loss(model(x), y) / 3).backward()
        read, rms = probe.take()
        probe.remove()
        return read, rms

    probed = read(True, range(4))
    for p in model.body.layers[0].parameters():
        p.requires_grad_(False)  # a frozen block, as in training
    model.zero_grad(set_to_none=True)
    trained = read(False, [1, 3])
    assert trained[0] == [1, 3]
    assert trained[1].tolist() == pytest.approx(probed[1][[1, 3]].tolist(), rel=1e-6)
    accumulated = torch.stack([gradient_rms(list(model.body.layers[i].parameters())) for i in (1, 3)])
    assert accumulated.gt(0).all()  # the gradients stay for the optimizer step
    assert not torch.allclose(accumulated, trained[1], rtol=0.01)  # micro-batch noise: not the accumulated RMS


def test_a_block_without_gradient_is_not_read():
    model = ScaledBlocks()
    probe = GradientProbe(_blocks(model), range(4))
    probe.begin_backward()  # a skipped backward: nothing arrives
    read, rms = probe.take()
    assert read == [] and rms.numel() == 0
    probe.remove()


def test_probe_reads_bf16_gradients_in_fp32():
    p = torch.nn.Parameter(torch.zeros(4096, dtype=torch.bfloat16))
    probe = GradientProbe([[p]], [0])
    probe.begin_backward()
    (p.float() * 3.0).sum().backward()  # every gradient 3: its square summed overflows nothing in fp32
    _, rms = probe.take()
    assert rms.dtype == torch.float32 and rms.item() == pytest.approx(3.0)
    probe.remove()


def test_a_loss_scale_is_divided_out_of_the_readings():
    model = ScaledBlocks()
    x, y = regression_batch(torch.Generator().manual_seed(0))
    probe = GradientProbe(_blocks(model), range(4))
    probe.begin_backward()
    torch.nn.functional.mse_loss(model(x), y).backward()
    _, plain = probe.take()
    model.zero_grad(set_to_none=True)
    probe.begin_backward()
    (torch.nn.functional.mse_loss(model(x), y) * 1024.0).backward()  # as fp16 AMP scales it
    _, scaled = probe.take(scale=1024.0)
    probe.remove()
    assert scaled.tolist() == pytest.approx(plain.tolist(), rel=1e-5)


def test_readings_summed_across_processes_are_the_mean_over_every_micro_batch():
    """Two "ranks" of 2 micro-batches each read what one process with all 4 micro-batches reads:
    the mean squared RMS of a micro-batch's gradient, whatever the split."""
    g = torch.Generator().manual_seed(0)
    batches = [regression_batch(g, n=4) for _ in range(4)]

    def readings(model, part):
        probe = GradientProbe(_blocks(model), range(4), free=range(4))
        for x, y in part:
            probe.begin_backward()
            (torch.nn.functional.mse_loss(model(x), y) / len(part)).backward()
        probe.remove()  # its readings stay for take(); the next "rank" reads alone
        return probe

    model = ScaledBlocks()
    _, one = readings(model, batches).take()
    ranks = [readings(model, batches[:2]), readings(model, batches[2:])]
    pending = []  # each rank's tensor; the sum is given back to each, as an all-reduce does

    def across(totals):
        pending.append(totals)
        return totals if len(pending) < 2 else pending[0] + pending[1]

    ranks[0].take(across=across)  # its sum is incomplete here: only the second rank's call sees both
    read, two = ranks[1].take(across=across)
    assert read == [0, 1, 2, 3] and two.tolist() == pytest.approx(one.tolist(), rel=1e-5)
