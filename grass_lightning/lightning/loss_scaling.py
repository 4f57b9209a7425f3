"""Whether a Trainer scales the loss (fp16 AMP): then gradients seen in backward are scaled.

Both the callback (importance must not read scaled gradients) and the module (its finiteness
check must unscale first) ask it, so it lives apart from either.
"""

from __future__ import annotations

from lightning.pytorch import Trainer


def loss_scaler(trainer: Trainer):
    """The trainer's enabled fp16 gradient scaler, or None."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None
