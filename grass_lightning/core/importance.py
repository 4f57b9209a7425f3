"""How important each block is: the mean gradient norm (MGN), refreshed by an EMA.

Per step, block l with N_l parameters gives r_l = sqrt(||g_l||^2 / N_l), the RMS of its
gradient (read per micro-batch: :mod:`grass_lightning.core.probe`). Over a window the mean of r_l is m_l (window MGN). After probing, m_l of every
block is the probe mean; each refresh blends in the new window for the blocks measured in it,
m_l <- ema * m_l(window) + (1 - ema) * m_l(old); blocks not measured keep their estimate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class ImportanceEstimate:
    """Per-block MGN estimate with window means, EMA refresh and non-finite skipping.

    ``estimate`` is NaN for a block never measured yet; `filled` gives those blocks the largest
    known value, so an unmeasured block is sampled at least as readily as the best known one.

    Args:
        num_blocks: number of blocks.
        ema: weight of the newest window in a refresh, in (0, 1].
    """

    def __init__(self, num_blocks: int, ema: float) -> None:
        self.ema = ema
        self.estimate = torch.full((num_blocks,), math.nan, dtype=torch.float64)
        # Window statistics stay on the gradients' device: recording never waits for the GPU.
        self.window_sum = torch.zeros(num_blocks)
        self.window_count = torch.zeros(num_blocks, dtype=torch.int64)
        self.nonfinite = torch.zeros((), dtype=torch.int64)
        self._index: dict[tuple[int, ...], torch.Tensor] = {}  # on-device block indices, made once per set

    def record(self, blocks: Sequence[int], rms: torch.Tensor) -> None:
        """Add one step's r_l for ``blocks``; a non-finite value is skipped and counted."""
        if not len(blocks):
            return
        device = rms.device
        self.window_sum = self.window_sum.to(device)
        self.window_count = self.window_count.to(device)
        self.nonfinite = self.nonfinite.to(device)
        key = tuple(blocks)
        if key not in self._index or self._index[key].device != device:
            self._index = {key: torch.as_tensor(key, device=device)}  # a host-to-device copy waits for the GPU
        index = self._index[key]
        finite = rms.detach().isfinite()
        self.window_sum.index_add_(0, index, torch.where(finite, rms.detach(), 0.0).float())
        self.window_count.index_add_(0, index, finite.long())
        self.nonfinite += (~finite).sum()

    def window_mean(self) -> torch.Tensor:
        """m_l over the current window; NaN for blocks without a finite measurement."""
        count = self.window_count.cpu()
        mean = self.window_sum.cpu().double() / count.clamp(min=1)
        return torch.where(count > 0, mean, torch.full_like(mean, math.nan))

    def refresh(self) -> None:
        """Blend the window into the estimate for the blocks measured in it, then reset it.

        A block measured for the first time takes its window mean as is.
        """
        window = self.window_mean()
        seen = self.window_count.cpu() > 0
        blended = torch.where(
            self.estimate.isnan(), window, self.ema * window + (1 - self.ema) * self.estimate
        )
        self.estimate = torch.where(seen, blended, self.estimate)
        self.window_sum.zero_()
        self.window_count.zero_()

    def filled(self) -> torch.Tensor:
        """The estimate with unmeasured blocks set to the largest known value (1 if none)."""
        known = self.estimate[~self.estimate.isnan()]
        fill = known.max() if known.numel() else torch.tensor(1.0, dtype=torch.float64)
        return torch.where(self.estimate.isnan(), fill, self.estimate)

    def state_dict(self) -> dict:
        return {
            "estimate": self.estimate.clone(),
            "window_sum": self.window_sum.cpu().clone(),
            "window_count": self.window_count.cpu().clone(),
            "nonfinite": int(self.nonfinite),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["estimate"].shape != self.estimate.shape:
            raise ValueError(
                f"Importance state has {state['estimate'].numel()} blocks, the model has "
                f"{self.estimate.numel()}: the checkpoint belongs to another model."
            )
        self.estimate = state["estimate"].clone().to(torch.float64)
        self.window_sum = state["window_sum"].clone().float()
        self.window_count = state["window_count"].clone().to(torch.int64)
        self.nonfinite = torch.tensor(int(state["nonfinite"]))
