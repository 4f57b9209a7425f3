"""GRASS hyper-parameters, their recommended defaults, and their validation.

The paper published no defaults; these are what we recommend and why:

- ``num_active=2``: LISA's and the paper's choice for small models; the active set's weights,
  gradients and moments are the whole trainable footprint, so memory grows with it.
- ``sampling_period=50``: the paper's sensitivity study found 25-50 best and 5 too noisy; a
  block needs a few dozen steps of Adam to make progress before it is swapped out.
- ``probe_steps=10``: ten full backward passes rank the blocks well enough; each costs about a
  full fine-tuning step and updates nothing. Left unset (None) it is 10, or 0 with
  ``sampler="uniform"``, which reads no importance.
- ``refresh_interval=50``: equal to ``sampling_period``, so each refresh covers exactly the
  blocks trained in the period that just ended.
- ``temperature=0.5``: with ``"max"`` normalisation the least important block keeps at least
  exp(-2) = 13.5% of the most important one's probability: importance steers, nothing starves.
- ``ema=0.5``: a block comes back only every few periods; its newest window is as telling as
  everything measured before.
- ``train_embeddings=False``: input embeddings get sparse gradients, their Adam moments are
  vocabulary-sized (70% of what LISA trains at 8B), and freezing them lets backward stop at
  the lowest active block. Set True to match LISA and the paper.
- ``train_head=True``: the final norm and LM/task head adapt the output to the task cheaply.
- ``reprobe_steps=0``: the paper's rule, a refresh re-measures only the blocks just trained. Set
  it to 1-2 to measure every block in the last steps of each refresh window instead, so that
  the refresh compares all blocks at one point of training (gradient norms drift 20-40x over a
  run, and blocks not drawn early otherwise keep probe-time values); see `GrassSchedule`.
- ``idle_moments="drop"``: bounded optimizer memory without offloading. ``"keep"`` keeps Adam
  continuity but, on a plain strategy, memory grows toward full fine-tuning.
- ``master_weights=True``: with half-precision weights (``bf16-true``) the trained parameters
  get fp32 master weights and fp32 moments, as BAdam's active block does; without them AdamW
  leaves most small updates below half a bf16 ulp (`grass_lightning.core.masters`). They cost
  12 bytes per *trained* parameter, a fraction of the model. False is pure bf16, as LMFlow runs LISA.
- ``recompute="idle"``: memory is why one picks GRASS. Without it a probe step, or any draw
  that includes a low block, holds every block's activations and sets the run's peak (0.72x
  full fine-tuning's on SmolLM2-135M, above BAdam's and LISA's); with it the whole-run peak is
  0.48x, at about a fifth more time per step (one more forward of the frozen blocks backward
  passes through). ``"none"`` is the fastest, ``"probe"`` covers only the probe (BENCHMARKS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from grass_lightning.core.active_set import IDLE_MOMENTS
from grass_lightning.core.checks import is_number, require_bool, require_choice, require_int
from grass_lightning.core.recompute import RECOMPUTE
from grass_lightning.core.sampling import NORMALIZATIONS, SAMPLERS


@dataclass(frozen=True)
class GrassConfig:
    """Validated GRASS hyper-parameters; every error names the argument and its value.

    Args:
        num_active: blocks trained at once (gamma).
        sampling_period: optimizer steps between draws of the active set (T_s).
        probe_steps: initial steps that measure every block and update nothing (T_p); must be
            0 with ``sampler="uniform"``, which reads no importance. None: 10, or 0 when uniform.
        refresh_interval: optimizer steps between importance refreshes (T_u).
        temperature: softmax temperature over the normalised importance (tau).
        ema: weight of the newest window in a refresh (alpha), in (0, 1].
        sampler: ``"grass"`` (importance), ``"uniform"`` (LISA) or ``"static"`` (probe once,
            never refresh: the paper's ablation).
        normalization: ``"max"`` or ``"zscore"`` normalisation of the importance before the softmax.
        train_embeddings: always train the input embeddings.
        train_head: always train the final norm and LM/task head.
        idle_moments: ``"drop"`` frees a leaving block's Adam moments (memory bounded by the
            active set); ``"keep"`` keeps them for its return.
        reprobe_steps: 0 (the paper's rule) refreshes only the blocks just trained; k > 0 makes
            the last k steps of each refresh window re-probe steps, which measure every block
            (and still train the active set), so a refresh compares all blocks at one point of
            training.
        recompute: blocks that backward passes through without training them recompute their
            activations instead of holding them: ``"none"``; ``"probe"``, in probe and re-probe
            steps (which train nothing, or only the active set); ``"idle"``, in every step.
        master_weights: trained half-precision (bf16) parameters step through fp32 master
            weights and fp32 moments, written back rounded to nearest; no effect on fp32 weights.
    """

    num_active: int = 2
    sampling_period: int = 50
    probe_steps: int | None = None
    refresh_interval: int = 50
    temperature: float = 0.5
    ema: float = 0.5
    sampler: str = "grass"
    normalization: str = "max"
    train_embeddings: bool = False
    train_head: bool = True
    idle_moments: str = "drop"
    reprobe_steps: int = 0
    recompute: str = "idle"
    master_weights: bool = True

    def __post_init__(self) -> None:
        if self.probe_steps is None:
            object.__setattr__(self, "probe_steps", 0 if self.sampler == "uniform" else 10)
        for name in ("num_active", "sampling_period", "refresh_interval"):
            require_int(name, getattr(self, name), minimum=1)
        require_int("probe_steps", self.probe_steps, minimum=0)
        require_int("reprobe_steps", self.reprobe_steps, minimum=0)
        if self.reprobe_steps > self.refresh_interval:
            raise ValueError(
                f"reprobe_steps={self.reprobe_steps} exceeds refresh_interval={self.refresh_interval}: the "
                f"re-probe is the last steps of each refresh window."
            )
        if self.reprobe_steps and self.sampler != "grass":
            raise ValueError(
                f"reprobe_steps={self.reprobe_steps} with sampler={self.sampler!r}: only sampler='grass' "
                f"refreshes importance; set reprobe_steps=0."
            )
        if not is_number(self.temperature) or not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature={self.temperature!r} must be a finite number > 0.")
        if not is_number(self.ema) or not 0 < self.ema <= 1:
            raise ValueError(f"ema={self.ema!r} must lie in (0, 1]: the weight of the newest window.")
        require_choice("sampler", self.sampler, SAMPLERS)
        require_choice("normalization", self.normalization, NORMALIZATIONS)
        require_choice("idle_moments", self.idle_moments, IDLE_MOMENTS)
        require_choice("recompute", self.recompute, RECOMPUTE)
        for name in ("train_embeddings", "train_head", "master_weights"):
            require_bool(name, getattr(self, name))
        if self.sampler == "static" and self.probe_steps == 0:
            raise ValueError(
                "sampler='static' with probe_steps=0: the static sampler draws from the probe's "
                "estimate for the whole run, so it needs probe_steps >= 1."
            )
        if self.sampler == "uniform" and self.probe_steps > 0:
            raise ValueError(
                f"sampler='uniform' with probe_steps={self.probe_steps}: uniform sampling (LISA) reads no "
                f"importance, so the probe's steps would update nothing; set probe_steps=0."
            )

    def check_blocks(self, num_blocks: int, path: str) -> None:
        """Raise if the model has fewer blocks than ``num_active``."""
        if self.num_active > num_blocks:
            raise ValueError(
                f"num_active={self.num_active} exceeds the {num_blocks} blocks found at {path!r}."
            )


SETTINGS = tuple(f.name for f in fields(GrassConfig))
