"""Running code when an optimizer's gradients are final: after its step's closure, before the update.

Lightning (and any closure-style caller) runs forward, backward, clipping and its callbacks'
``on_before_optimizer_step`` inside the closure that ``optimizer.step(closure)`` calls, so a step
pre-hook that must see final gradients (the offloaders', the master weights') runs after it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def after_closure(args: tuple, kwargs: dict, ready: Callable[[dict[str, Any]], None]) -> tuple[tuple, dict] | None:
    """For a step pre-hook: run ``ready(step_kwargs)`` now if the step has no closure, else after it
    (``step_kwargs``: the step's keyword arguments but the closure).

    Returns what the hook returns: None, or the step's arguments with the closure wrapped.
    ``args[0]`` is the optimizer itself, ``args[1]`` a positional closure.
    """
    kwargs = dict(kwargs)
    closure = kwargs.pop("closure", args[1] if len(args) > 1 else None)
    if closure is None:
        ready(kwargs)
        return None

    def closure_then_ready():
        loss = closure()
        ready(kwargs)
        return loss

    return args[:1], {**kwargs, "closure": closure_then_ready}
