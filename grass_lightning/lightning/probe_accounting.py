"""Probe steps are optimizer steps to Lightning but not updates.

``global_step`` counts them, checkpoints and logs follow them, and they update nothing. So that
``max_steps`` counts updates, as for LISA or full fine-tuning, the fit is extended by the probe's
steps (a run bounded by ``max_epochs`` alone: by the updates those epochs make plus the probe's
steps, with the epochs that takes; ``max_steps=0`` stays 0), and the LR schedulers are held where
they were during the probe, so the first update runs at the schedule's first learning rate.
"""

from __future__ import annotations

import copy
import math

from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_warn


class ProbeAccounting:
    """Extends a fit by its probe steps and holds its LR schedulers through them; gives the
    Trainer its own ``max_steps`` and ``max_epochs`` back at `restore`."""

    def __init__(self) -> None:
        self._user_max_steps: int | None = None
        self._user_max_epochs: int | None = None
        self._lr_before: list[tuple[dict, list[float]]] | None = None

    @property
    def extended(self) -> bool:
        return self._user_max_steps is not None

    def extend(self, trainer: Trainer, probe_steps: int) -> None:
        """At fit start: add the probe's steps to the fit, so that they take no update from it."""
        loop = trainer.fit_loop
        if not probe_steps:
            return
        if trainer.max_steps > 0:
            self._user_max_steps = trainer.max_steps
            loop.epoch_loop.max_steps = trainer.max_steps + probe_steps
        elif trainer.max_steps == -1 and (trainer.max_epochs or 0) > 0:
            total = trainer.estimated_stepping_batches  # the optimizer steps max_epochs makes
            if math.isinf(total):
                rank_zero_warn(f"GrassCallback: a run bounded by max_epochs over data of unknown length: the probe's "
                               f"{probe_steps} steps come out of its updates. Set max_steps to count updates.")
                return
            self._user_max_steps, self._user_max_epochs = trainer.max_steps, trainer.max_epochs
            loop.epoch_loop.max_steps = int(total) + probe_steps
            loop.max_epochs = trainer.max_epochs + math.ceil(probe_steps / max(1, int(total) // trainer.max_epochs))

    def start(self) -> None:
        """At train start (a resumed fit takes a new snapshot)."""
        self._lr_before = None

    def before_batch(self, trainer: Trainer, probing: bool) -> None:
        """Before a batch: after a probe step, undo what schedulers Lightning steps after the
        batch's end did (ReduceLROnPlateau, an epoch's end); while probing, keep a snapshot."""
        if self._lr_before is not None:
            self.hold(trainer)
            if not probing:
                self._lr_before = None
        if probing and self._lr_before is None:
            self._lr_before = [
                (copy.deepcopy(config.scheduler.state_dict()), [g["lr"] for g in config.scheduler.optimizer.param_groups])
                for config in trainer.lr_scheduler_configs
            ]

    def hold(self, trainer: Trainer) -> None:
        """Undo what LR schedulers did since the snapshot (after a probe step, Lightning or the
        module stepped them by now)."""
        for config, (state, lrs) in zip(trainer.lr_scheduler_configs, self._lr_before or []):
            config.scheduler.load_state_dict(copy.deepcopy(state))
            for group, lr in zip(config.scheduler.optimizer.param_groups, lrs):
                group["lr"] = lr

    def restore(self, trainer: Trainer) -> None:
        """Give the Trainer its ``max_steps`` and ``max_epochs`` back."""
        if self._user_max_steps is not None:
            trainer.fit_loop.epoch_loop.max_steps = self._user_max_steps
            self._user_max_steps = None
        if self._user_max_epochs is not None:
            trainer.fit_loop.max_epochs = self._user_max_epochs
            self._user_max_epochs = None
