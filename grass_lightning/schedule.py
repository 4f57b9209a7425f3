"""GRASS step by step, in plain PyTorch: probe, then train sampled active sets.

One training step with a schedule, with or without Lightning::

    schedule.start()                  # once, after the optimizer exists
    for batch in data:
        schedule.before_backward()    # per backward pass (probing counts them)
        loss(batch).backward()
        schedule.measure()            # gradients complete and unscaled
        optimizer.step(); optimizer.zero_grad()
        schedule.end_step()           # maybe refresh importance, maybe draw a new active set

Steps 0..probe_steps-1 measure every block and update nothing. Then, every
``refresh_interval`` steps the importance estimate blends in the blocks measured since the
last refresh, and every ``sampling_period`` steps a new active set is drawn (after the refresh
when both fall on one step, so the draw sees the newest estimate).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.optim import Optimizer

from grass_lightning.active_set import ActiveSet
from grass_lightning.blocks import BlockLayout
from grass_lightning.config import GrassConfig
from grass_lightning.importance import ImportanceEstimate, block_rms
from grass_lightning.offload import MomentOffloader, check_offload
from grass_lightning.probe import GradientProbe
from grass_lightning.sampling import BlockSampler, sampling_probabilities


class GrassSchedule:
    """Owns importance, sampling and the active set over the optimizer steps of one run.

    Args:
        layout: the model's blocks and always-trained parameters.
        optimizers: optimizers built over all of the model's parameters.
        config: validated hyper-parameters.
        seed: seed of the block sampler.
        probe_by_hooks: read and free each gradient during backward while probing (low memory).
            False reads the finished gradients in `measure` instead, as needed when they are
            all-reduced across processes or loss-scaled (fp16 AMP) during backward.
        offload: ``"none"``, or keep block moments in host memory: ``"park"`` (idle blocks') or
            ``"stream"`` (all blocks'), see :mod:`grass_lightning.offload`. Needs one optimizer.
    """

    def __init__(
        self,
        layout: BlockLayout,
        optimizers: Sequence[Optimizer],
        config: GrassConfig,
        seed: int,
        probe_by_hooks: bool = True,
        offload: str = "none",
    ) -> None:
        config.check_blocks(len(layout), layout.path)
        check_offload(offload, config.idle_moments)
        if offload != "none" and len(optimizers) != 1:
            raise ValueError(f"offload={offload!r} needs exactly one optimizer; the module has {len(optimizers)}.")
        self.config = config
        self.active_set = ActiveSet(
            layout, optimizers, layout.always_trained(config.train_embeddings, config.train_head), config.idle_moments
        )
        self.importance = ImportanceEstimate(len(layout), config.ema)
        self.sampler = BlockSampler(config.num_active, seed)
        self.probe_by_hooks = probe_by_hooks
        self.step = 0
        self.active: list[int] = []
        self.history: list[tuple[int, list[int]]] = []
        self.probabilities = torch.full((len(layout),), 1.0 / len(layout), dtype=torch.float64)
        self._blocks = [layout.block_params(i) for i in range(len(layout))]
        self._probe: GradientProbe | None = None
        self.offloader = MomentOffloader(self._blocks, optimizers[0], offload) if offload != "none" else None
        self.active_set.offloader = self.offloader

    @property
    def probing(self) -> bool:
        return self.step < self.config.probe_steps

    def start(self) -> None:
        """Apply the current phase to the model: begin probing, or (re)activate the active set."""
        if self.probing:
            self.active_set.probe()
            if self.probe_by_hooks and self._probe is None:
                self._probe = GradientProbe(self._blocks)
        else:
            self._remove_probe()  # a schedule loaded past its probe may have started probing
            if not self.active:
                self._draw()
            self.active_set.activate(self.active)

    def before_backward(self) -> None:
        """Announce a backward pass (a probe rescales accumulated micro-batches by their count)."""
        if self._probe is not None:
            self._probe.begin_backward()

    def measure(self) -> None:
        """Record r_l from this step's complete, unscaled gradients (before the optimizer step).

        While probing this also drops every block gradient, so the step updates nothing.
        """
        if self._probe is not None:
            self.importance.record(*self._probe.take())
        elif self.probing:
            blocks = list(range(len(self._blocks)))
            self.importance.record(blocks, self._rms(blocks))
            for params in self._blocks:
                for p in params:
                    p.grad = None
        elif self.config.sampler == "grass":  # uniform (LISA) and static never use a new measurement
            self.importance.record(self.active, self._rms(self.active))

    def end_step(self) -> bool:
        """Close an optimizer step; returns True when a new active set was drawn."""
        self.step += 1
        if self.probing:
            return False
        if self.step == self.config.probe_steps and self.config.probe_steps > 0:
            self._remove_probe()
            self._refresh()
            return self._draw()
        trained = self.step - self.config.probe_steps
        if self.config.sampler == "grass" and trained % self.config.refresh_interval == 0:
            self._refresh()
        if trained % self.config.sampling_period == 0:
            return self._draw()
        return False

    def close(self) -> None:
        """Remove probe hooks, give the model back its ``requires_grad`` flags and its optimizer
        its parked moments (as host tensors)."""
        self._remove_probe()
        self.active_set.restore()
        if self.offloader is not None:
            self.offloader.close()

    def _rms(self, blocks: Sequence[int]) -> torch.Tensor:
        return torch.stack([block_rms(self._blocks[i]) for i in blocks])

    def _remove_probe(self) -> None:
        if self._probe is not None:
            self._probe.remove()
            self._probe = None

    def _refresh(self) -> None:
        self.importance.refresh()
        if self.config.sampler != "uniform":
            self.probabilities = sampling_probabilities(
                self.importance.filled(), self.config.temperature, self.config.normalization
            )

    def _draw(self) -> bool:
        self.active = self.sampler.draw(self.probabilities)
        self.history.append((self.step, list(self.active)))
        self.active_set.activate(self.active)
        return True

    def state_dict(self) -> dict:
        """Everything an exact resume needs, as plain types and tensors."""
        return {
            "step": self.step,
            "active": list(self.active),
            "history": [[step, list(active)] for step, active in self.history],
            "probabilities": self.probabilities.clone(),
            "importance": self.importance.state_dict(),
            "sampler": self.sampler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.active = [int(b) for b in state["active"]]
        self.history = [(int(step), [int(b) for b in active]) for step, active in state["history"]]
        self.probabilities = state["probabilities"].clone().to(torch.float64)
        self.importance.load_state_dict(state["importance"])
        self.sampler.load_state_dict(state["sampler"])
