"""GRASS step by step, in plain PyTorch: probe, then train sampled active sets.

One training step with a schedule, with or without Lightning::

    schedule.start()                  # once, after the optimizer exists
    for batch in data:
        schedule.before_backward()    # per backward pass (probing counts them)
        loss(batch).backward()
        schedule.measure()            # gradients complete and unscaled
        optimizer.step(); optimizer.zero_grad()
        schedule.end_step()           # maybe refresh importance, maybe draw a new active set

Steps 0..probe_steps-1 measure every block and update nothing: they are not updates, so an
LR schedule should not advance during them (`GrassCallback` holds it back). Then, every
``refresh_interval`` steps the importance estimate blends in the blocks measured since the
last refresh, and every ``sampling_period`` steps a new active set is drawn (after the refresh
when both fall on one step, so the draw sees the newest estimate).

What a refresh blends in: by the paper's rule (``reprobe_steps=0``) the blocks trained in the
window, measured in every step of it; idle blocks keep their old values, measured when the
gradients had another scale. With ``reprobe_steps=k`` the last k steps of each window are
re-probe steps instead: every block takes a gradient, idle blocks' gradients are read and
dropped in backward (the probe's memory rule), the active set still trains, and the refresh
blends in those k steps' readings of every block, all taken at one point of training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.optim import Optimizer

from grass_lightning.core.active_set import ActiveSet
from grass_lightning.core.blocks import BlockLayout
from grass_lightning.core.config import GrassConfig
from grass_lightning.core.importance import ImportanceEstimate
from grass_lightning.core.masters import HALF, MasterWeights
from grass_lightning.core.offload import check_offload, make_offloader
from grass_lightning.core.probe import GradientProbe
from grass_lightning.core.recompute import BlockRecompute
from grass_lightning.core.sampling import BlockSampler, sampling_logits
from grass_lightning.core.sharding import check_sharding, gradient_targets, is_sharded


class GrassSchedule:
    """Owns importance, sampling and the active set over the optimizer steps of one run.

    Args:
        layout: the model's blocks and always-trained parameters.
        optimizers: optimizers built over all of the model's parameters.
        config: validated hyper-parameters.
        seed: seed of the block sampler.
        free_in_backward: free the gradients of blocks that only are measured (every block while
            probing, the idle ones in a re-probe step) in backward, as they are read (low memory).
            False, as DDP (it all-reduces them) and fp16 AMP (its scaler checks them) need, drops
            them in `measure` instead.
        across: sums a tensor over the processes of a data-parallel run, so that every process
            reads the same importance (:mod:`grass_lightning.core.probe`), and checks that every
            draw gave each process the same active set; None on one process.
        offload: ``"none"``, or keep block moments in host memory: ``"park"`` (idle blocks') or
            ``"stream"`` (all blocks'), see :mod:`grass_lightning.core.offload`. Needs one optimizer.

    With half-precision blocks and ``config.master_weights``, trained parameters step through
    fp32 masters (:mod:`grass_lightning.core.masters`), which the offloader moves with the moments.

    Blocks sharded by FSDP2 (:mod:`grass_lightning.core.sharding`) are read at their unsharded
    copies; building the schedule then all-gathers each block once, on every rank. A gradient
    freed there in backward is never reduce-scattered: FSDP2 skips parameters without one.
    """

    def __init__(
        self,
        layout: BlockLayout,
        optimizers: Sequence[Optimizer],
        config: GrassConfig,
        seed: int,
        free_in_backward: bool = True,
        across: Callable[[torch.Tensor], torch.Tensor] | None = None,
        offload: str = "none",
    ) -> None:
        config.check_blocks(len(layout), layout.path)
        check_offload(offload, config.idle_moments)
        if offload != "none" and len(optimizers) != 1:
            raise ValueError(f"offload={offload!r} needs exactly one optimizer; the module has {len(optimizers)}.")
        self.config = config
        self._blocks = [layout.block_params(i) for i in range(len(layout))]
        every = [p for params in self._blocks for p in params]
        check_sharding(every, offload, config.master_weights)
        sharded = is_sharded(every)
        self.offloader = make_offloader(offload, self._blocks, optimizers[0])  # the schedule's: `close` closes it
        try:
            always = layout.always_trained(config.train_embeddings, config.train_head)
            self.active_set = ActiveSet(layout, optimizers, always, config.idle_moments, self.offloader)
        except ValueError:  # an optimizer that misses a block: leave it without the offloader's hooks
            if self.offloader is not None:
                self.offloader.close()
            raise
        # after the offloader: the masters' step hooks must see the gradients its hooks leave
        half = any(p.dtype in HALF for params in self._blocks for p in params)
        self.masters = [MasterWeights(opt) for opt in optimizers] if config.master_weights and half else []
        self.recompute = BlockRecompute(layout.blocks) if config.recompute != "none" else None
        self.importance = ImportanceEstimate(len(layout), config.ema)
        self.sampler = BlockSampler(config.num_active, seed)
        self._targets = gradient_targets(layout.blocks) if sharded else None
        self.free_in_backward = free_in_backward
        self._across = across
        self.step = 0
        self.active: list[int] = []
        self.history: list[tuple[int, list[int]]] = []
        self.logits = torch.zeros(len(layout), dtype=torch.float64)  # uniform until the probe ends
        self._probe: GradientProbe | None = None
        self._idle_open = False  # idle blocks take gradients: a re-probe step

    @property
    def probing(self) -> bool:
        return self.step < self.config.probe_steps

    @property
    def probabilities(self) -> torch.Tensor:
        """p_l, the chance of each block in the next draw."""
        return torch.softmax(self.logits, dim=0)

    def start(self) -> None:
        """Apply the current phase to the model: begin probing, or (re)activate the active set."""
        if self.probing:
            self.active_set.only_blocks()
            self._listen(range(len(self._blocks)), free=range(len(self._blocks)))
            self._recompute(range(len(self._blocks)))
        elif not self.active:
            self._draw()
        else:
            self._activate()

    def before_backward(self) -> None:
        """Announce a backward pass (readings of accumulated micro-batches are rescaled by their count)."""
        if self._probe is not None:
            self._probe.begin_backward()

    def measure(self, scale: float = 1.0) -> None:
        """Record r_l from this step's readings (before the optimizer step); ``scale`` is the loss
        scale of its backward passes (fp16 AMP), 1 without one.

        While probing, every block's gradient is gone after this, so the step updates nothing; in
        a re-probe step, the idle blocks'. A block that received no gradient in the step (a
        skipped backward) stays unmeasured.
        """
        if self._probe is not None:
            self.importance.record(*self._probe.take(scale, self._across))
        if not self.free_in_backward and (self.probing or self.reprobing):
            for index in self._idle():
                for p in self._blocks[index]:
                    p.grad = None

    def end_step(self) -> None:
        """Close an optimizer step: refresh the importance and draw a new active set when due."""
        self.step += 1
        if self.probing:
            return
        updates = self.step - self.config.probe_steps
        if updates == 0:  # the probe just ended
            self._refresh()
            self._draw()
        elif self._reads_training_steps and updates % self.config.refresh_interval == 0:
            self._refresh()
        if updates and updates % self.config.sampling_period == 0:
            self._draw()
        elif self.reprobing != self._idle_open:
            self._activate()  # a re-probe begins or ends

    def close(self) -> None:
        """Remove probe hooks, give the model back its ``requires_grad`` flags and its optimizer
        its parked moments (as host tensors)."""
        self._remove_probe()
        self.active_set.restore()
        if self.recompute is not None:
            self.recompute.remove()
        for masters in self.masters:
            masters.close()
        self.masters = []
        if self.offloader is not None:
            self.offloader.close()
            self.offloader = None

    @property
    def reprobing(self) -> bool:
        """Whether the step about to be taken is a re-probe step (every block measured)."""
        if self.probing or not self.config.reprobe_steps:
            return False
        position = (self.step - self.config.probe_steps) % self.config.refresh_interval
        return position >= self.config.refresh_interval - self.config.reprobe_steps

    def _idle(self) -> list[int]:
        """Blocks outside the active set (all of them while probing)."""
        return [b for b in range(len(self._blocks)) if self.probing or b not in self.active]

    @property
    def _reads_training_steps(self) -> bool:
        """Whether the sampler reads training steps (a constant of the config): uniform (LISA) and
        static never use a new measurement."""
        return self.config.sampler == "grass"

    def _listen(self, blocks: Sequence[int], free: Sequence[int] = ()) -> None:
        """Read the gradients of ``blocks`` in backward from now on, freeing those of ``free``."""
        self._remove_probe()
        self._probe = GradientProbe(self._blocks, list(blocks), free if self.free_in_backward else (), self._targets)

    def _remove_probe(self) -> None:
        if self._probe is not None:
            self._probe.remove()
            self._probe = None

    def _refresh(self) -> None:
        self.importance.refresh()
        if self.config.sampler != "uniform":
            self.logits = sampling_logits(self.importance.filled(), self.config.temperature, self.config.normalization)

    def activate(self, blocks: Sequence[int]) -> None:
        """Train ``blocks`` instead of the drawn active set until the next draw (a user's or a
        benchmark's choice, e.g. the deepest draw; the sampler's stream is untouched)."""
        if self.probing:
            raise RuntimeError("activate() while probing: the probe measures every block and trains none.")
        self.active = sorted(set(blocks))
        self._check_ranks_agree("activate()")
        self.history.append((self.step, list(self.active)))
        self._activate()

    def _draw(self) -> None:
        self.active = self.sampler.draw(self.logits)
        self._check_ranks_agree("the sampler")
        self.history.append((self.step, list(self.active)))
        self._activate()

    def _check_ranks_agree(self, source: str) -> None:
        """Raise if another process's active set differs from this one's (one small all-reduce per
        draw): ranks training different blocks would silently diverge (DDP) or hang (FSDP2)."""
        if self._across is None:
            return
        mask = torch.zeros(len(self._blocks) + 1, device=self._blocks[0][0].device)
        mask[self.active] = 1.0
        mask[-1] = 1.0  # counts the processes
        total = self._across(mask.clone())  # an all-reduce may sum in place
        if not torch.equal(total[:-1], mask[:-1] * total[-1]):
            raise RuntimeError(
                f"Step {self.step}: the processes got different active sets from {source} (this one {self.active}; "
                f"per block, how many processes train it: {total[:-1].int().tolist()} of {int(total[-1])}). Every "
                f"process must seed the sampler alike (GrassCallback(seed=...) or seed_everything before fit) and "
                f"read the same importance."
            )

    def _activate(self) -> None:
        self.active_set.activate(self.active)
        self._idle_open = self.reprobing
        if self._idle_open:
            self.active_set.open_all_blocks()
            self._listen(range(len(self._blocks)), free=self._idle())
        elif self._reads_training_steps and not self.config.reprobe_steps:
            self._listen(self.active)
        else:
            self._remove_probe()
        self._recompute(self._idle() if self._idle_open or self.config.recompute == "idle" else ())

    def _recompute(self, blocks: Sequence[int]) -> None:
        """Recompute ``blocks`` in backward from now on (if this schedule recomputes)."""
        if self.recompute is not None:
            self.recompute.set(set(blocks))

    def state_dict(self) -> dict:
        """Everything an exact resume needs, as plain types and tensors."""
        return {
            "step": self.step,
            "active": list(self.active),
            "history": [[step, list(active)] for step, active in self.history],
            "logits": self.logits.clone(),
            "importance": self.importance.state_dict(),
            "sampler": self.sampler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.active = [int(b) for b in state["active"]]
        self.history = [(int(step), [int(b) for b in active]) for step, active in state["history"]]
        # checkpoints written before logits were kept hold the probabilities
        self.logits = state["logits"].clone() if "logits" in state else state["probabilities"].log()
        self.logits = self.logits.to(torch.float64)
        self.importance.load_state_dict(state["importance"])
        self.sampler.load_state_dict(state["sampler"])
