"""The plain PyTorch loop that a user without Lightning writes around a `GrassSchedule`."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from tests.helpers.models import regression_batch


def plain_steps(model: nn.Module, optimizer: torch.optim.Optimizer, schedule, steps: int, seed: int = 0,
                generator: torch.Generator | None = None, after_backward: Callable | None = None,
                loss_scale: Callable[[int], float] | None = None, clip: float | None = None,
                use_closure: bool = False) -> Iterator[tuple[list[int], bool, set[str]]]:
    """Train ``steps`` regression batches; yield, per step, the active set and phase it ran with
    and the names of the parameters it changed.

    ``after_backward(schedule, optimizer)`` runs between backward and `measure`; ``loss_scale``
    multiplies the loss of step i (a drifting gradient scale); ``clip`` clips the gradient norm
    after `measure`; ``use_closure`` runs forward and backward inside ``optimizer.step``.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    for step in range(steps):
        x, y = regression_batch(g)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        active, probing = list(schedule.active), schedule.probing

        def closure():
            schedule.before_backward()
            loss = nn.functional.mse_loss(model(x), y) * (loss_scale(step) if loss_scale else 1.0)
            loss.backward()
            if after_backward is not None:
                after_backward(schedule, optimizer)
            schedule.measure()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            return loss

        if use_closure:
            optimizer.step(closure)
        else:
            closure()
            optimizer.step()
        optimizer.zero_grad()
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        schedule.end_step()
        yield active, probing, changed
