"""Resuming an FSDP2 run from Lightning's distributed checkpoint when its optimizer held state for
only some parameters (GRASS: the active blocks and the head).

To load optimizer state, torch's ``set_optimizer_state_dict`` first gives the empty optimizer
state for every parameter that requires a gradient (a zero-gradient step), then reads each of
those from the checkpoint, and fails on the first it does not hold ("Missing key in checkpoint
state_dict"). So while the strategy loads a distributed checkpoint, only the parameters it holds
optimizer state for require gradients. The path is known only to the strategy's
``load_checkpoint`` (after ``on_fit_start``), so the callback wraps that method for the fit.
A full (single-file) checkpoint needs none of this.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint import FileSystemReader


def load_as_saved(strategy: ModelParallelStrategy) -> Callable[[], None]:
    """Make ``strategy.load_checkpoint`` load a distributed checkpoint with only the parameters it
    holds optimizer state for requiring gradients; returns what undoes the wrap."""
    load = strategy.load_checkpoint

    def load_checkpoint(checkpoint_path, *args, **kwargs):
        give_back = _require_grad_as_saved(strategy.lightning_module, Path(checkpoint_path))
        try:
            return load(checkpoint_path, *args, **kwargs)
        finally:
            give_back()

    strategy.load_checkpoint = load_checkpoint
    return lambda: vars(strategy).pop("load_checkpoint", None)


def _require_grad_as_saved(module: LightningModule, path: Path) -> Callable[[], None]:
    flags = {name: (p, p.requires_grad) for name, p in module.named_parameters()}
    if path.is_dir():  # Lightning saves optimizer i's state as "optimizer_<i>", torch as "state.<parameter>.<field>"
        keys = FileSystemReader(path).read_metadata().state_dict_metadata
        saved = {key.split(".state.", 1)[1].rsplit(".", 1)[0] for key in keys
                 if key.startswith("optimizer_") and ".state." in key}
        for name, (p, _) in flags.items():
            p.requires_grad_(name in saved)

    def give_back() -> None:
        for p, flag in flags.values():
            p.requires_grad_(flag)

    return give_back
