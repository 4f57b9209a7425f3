"""Probing reads every block's gradient during backward and frees it at once."""

import pytest
import torch

from conftest import ScaledBlocks, regression_batch
from grass_lightning.importance import block_rms
from grass_lightning.probe import GradientProbe


def _blocks(model):
    return [list(block.parameters()) for block in model.body.layers]


def test_probe_reads_the_norms_that_backward_produced_and_frees_the_gradients():
    model = ScaledBlocks()
    x, y = regression_batch(torch.Generator().manual_seed(0))
    torch.nn.functional.mse_loss(model(x), y).backward()
    expected = torch.stack([block_rms(ps) for ps in _blocks(model)])
    model.zero_grad(set_to_none=True)

    probe = GradientProbe(_blocks(model))
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
    probe = GradientProbe(_blocks(model))  # registered after: runs after `count` on each param
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
        per_pass.append(torch.stack([block_rms(ps) ** 2 * sum(p.numel() for p in ps) for ps in _blocks(model)]))
    model.zero_grad(set_to_none=True)
    numel = torch.tensor([sum(p.numel() for p in ps) for ps in _blocks(model)], dtype=torch.float32)
    expected = (2 * (per_pass[0] + per_pass[1]) / numel).sqrt()

    probe = GradientProbe(_blocks(model))
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
    full = torch.stack([block_rms(ps) for ps in _blocks(model)])
    assert same.tolist() == pytest.approx(full.tolist(), rel=1e-5)


def test_removed_probe_leaves_gradients_alone():
    model = ScaledBlocks()
    probe = GradientProbe(_blocks(model))
    probe.remove()
    x, y = regression_batch(torch.Generator().manual_seed(0))
    torch.nn.functional.mse_loss(model(x), y).backward()
    assert all(p.grad is not None for ps in _blocks(model) for p in ps)
    read, _ = probe.take()
    assert read == []
