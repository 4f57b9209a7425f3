"""Recompute: blocks backward passes through without training them hold no activations, and the
numbers do not change."""

import copy

import pytest
import torch

from grass_lightning import GrassConfig, GrassSchedule, find_blocks
from grass_lightning.core.recompute import BlockRecompute
from tests.helpers.loop import plain_steps
from tests.helpers.models import ScaledBlocks, hf_loss, tiny_hf


def _saved_bytes(loss_fn) -> tuple[torch.Tensor, int]:
    """The loss, and the bytes autograd saved for backward while computing it."""
    saved = []

    def pack(tensor):
        saved.append(tensor.untyped_storage().nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn()
    return loss, sum(saved)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "opt"])
def test_recomputed_frozen_blocks_save_less_and_give_the_same_gradients(family, mode):
    """In eval mode too: transformers checkpoints a layer only in training mode, and a model left in
    eval mode (as transformers 5 loads it) kept every activation. Eval-mode dropout stays off (OPT's
    layers read their own ``training`` for it): the gradients equal the plain ones."""
    model = tiny_hf(family).train(mode == "train")
    layout = find_blocks(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in layout.block_params(0):  # backward runs through every block, trains block 0
        p.requires_grad_(True)
    batch = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))

    def grads():
        torch.manual_seed(1)  # the same dropout masks in both runs (checkpoint replays them in backward)
        loss, saved = _saved_bytes(lambda: hf_loss(model, batch))
        loss.backward()
        taken = [p.grad.clone() for p in layout.block_params(0)]
        model.zero_grad(set_to_none=True)
        return loss.detach(), saved, taken

    plain_loss, plain_saved, plain_grads = grads()
    recompute = BlockRecompute(layout.blocks)
    recompute.set(range(1, len(layout)))
    loss, saved, taken = grads()
    assert saved < 0.6 * plain_saved  # three of four blocks keep only their input
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    for a, b in zip(taken, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all(module.training == (mode == "train") for module in model.modules())
    recompute.remove()
    assert grads()[1] == plain_saved


def test_a_plain_pytorch_block_is_wrapped_and_unwrapped():
    model = ScaledBlocks()
    blocks = model.body.layers
    recompute = BlockRecompute(blocks)
    recompute.set({1, 2})
    assert "forward" in vars(blocks[1]) and "forward" not in vars(blocks[0])
    x = torch.randn(3, 4)
    _, wrapped = _saved_bytes(lambda: model(x).sum())
    recompute.remove()
    assert all("forward" not in vars(block) for block in blocks)
    _, plain = _saved_bytes(lambda: model(x).sum())
    assert wrapped < plain


def test_a_blocks_own_instance_forward_is_recomputed_and_kept():
    """accelerate's hooks install ``forward`` on the instance; the class's forward bypassed it and
    switching off deleted it for good."""
    model = ScaledBlocks()
    block = model.body.layers[1]
    plain = block.forward
    block.forward = lambda h: 2 * plain(h)  # what a hook would do
    hooked = block.forward
    x = torch.randn(3, 4)
    expected = model(x)
    recompute = BlockRecompute(model.body.layers)
    recompute.set({1})
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    recompute.remove()
    assert vars(block)["forward"] is hooked


class _DropoutBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear, self.dropout = torch.nn.Linear(8, 8), torch.nn.Dropout(0.5)

    def forward(self, h, scale=None):
        return self.dropout(self.linear(h)) * scale


def _keyword_grads(device: str, recompute: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([_DropoutBlock(), _DropoutBlock()]).to(device)
    if recompute:
        BlockRecompute(blocks).set({0, 1})
    h = torch.randn(4, 8, device=device)
    scale = torch.full((8,), 2.0, device=device, requires_grad=True)
    torch.manual_seed(1)
    for block in blocks:
        h = block(h=h, scale=scale)  # every tensor by keyword
    h.square().sum().backward()
    return [scale.grad, *(p.grad for p in blocks.parameters())]


def _assert_keyword_call_replays_dropout(device: str) -> None:
    for a, b in zip(_keyword_grads(device, True), _keyword_grads(device, False)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_a_block_called_by_keyword_replays_its_dropout_masks_in_backward():
    _assert_keyword_call_replays_dropout("cpu")


def test_keyword_tensors_reach_the_checkpoints_device_rng_bookkeeping(monkeypatch):
    """On CPU the masks replay anyway (torch always saves the CPU RNG state); on a GPU only the
    devices of positional tensors get theirs saved. What is checked here on CPU is that the
    keyword tensors are among those torch looks at."""
    import torch.utils.checkpoint as checkpoint

    looked_at, real = [], checkpoint._infer_device_type  # reads the tensors whose devices get RNG states saved
    monkeypatch.setattr(checkpoint, "_infer_device_type", lambda *args: looked_at.append(args) or real(*args))
    block = _DropoutBlock()
    BlockRecompute([block]).set({0})
    h, scale = torch.randn(4, 8, requires_grad=True), torch.ones(8)
    block(h=h, scale=scale).sum().backward()
    assert any(any(a is h for a in args) and any(a is scale for a in args) for args in looked_at)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: torch saves the CUDA RNG state per device of positional arguments")
def test_a_block_called_by_keyword_replays_its_dropout_masks_in_backward_on_cuda():
    _assert_keyword_call_replays_dropout("cuda")


def test_a_model_with_gradient_checkpointing_on_is_left_alone():
    model = tiny_hf("llama")
    model.gradient_checkpointing_enable()
    layout = find_blocks(model)
    recompute = BlockRecompute(layout.blocks)
    recompute.set({0})
    recompute.remove()
    assert not recompute.enabled and all(block.gradient_checkpointing for block in layout.blocks)


def _schedule(model, **config):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = GrassSchedule(find_blocks(model, "body.layers"), [optimizer],
                             GrassConfig(num_active=1, sampling_period=2, refresh_interval=2, probe_steps=2, **config), 0)
    schedule.start()
    return optimizer, schedule


@pytest.mark.parametrize("mode", ["probe", "idle"])
def test_schedule_recomputes_the_probe_and_in_idle_mode_every_untrained_block(mode):
    torch.manual_seed(0)
    model = ScaledBlocks()
    optimizer, schedule = _schedule(model, recompute=mode)
    wrapped = lambda: {i for i, block in enumerate(model.body.layers) if "forward" in vars(block)}  # noqa: E731
    for _ in plain_steps(model, optimizer, schedule, 6):  # after each step: what the next one recomputes
        everything = {0, 1, 2, 3}
        expected = everything if schedule.probing else everything - set(schedule.active) if mode == "idle" else set()
        assert wrapped() == expected
    schedule.close()
    assert wrapped() == set()


def test_schedule_recomputes_every_block_while_probing():
    torch.manual_seed(0)
    model = ScaledBlocks()
    _, schedule = _schedule(model, recompute="probe")
    assert all("forward" in vars(block) for block in model.body.layers)
    schedule.close()


def test_recompute_changes_no_number_of_a_grass_run():
    torch.manual_seed(0)
    model = ScaledBlocks()
    twin = copy.deepcopy(model)
    runs = []
    for m, mode in ((model, "none"), (twin, "idle")):
        optimizer, schedule = _schedule(m, recompute=mode)
        runs.append([active for active, _, _ in plain_steps(m, optimizer, schedule, 8)])
        schedule.close()
    assert runs[0] == runs[1]
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_unknown_recompute_mode_is_refused():
    with pytest.raises(ValueError, match=r"recompute='all' is not one of 'none', 'probe', 'idle'"):
        GrassConfig(recompute="all")
