"""Which blocks train next: sampling probabilities and draws of the active set.

Raw gradient RMS values are tiny (1e-5..1e-3), so softmax(m / tau) of them is uniform; GRASS
softmaxes a *normalised* MGN. ``"max"`` divides by the largest block, so m_hat lies in
(0, 1] and ``temperature`` bounds starvation: p_min / p_max >= exp(-1 / temperature).
``"zscore"`` standardises, so ``temperature`` counts standard deviations instead.
"""

from __future__ import annotations

import torch

SAMPLERS = ("grass", "uniform", "static")
NORMALIZATIONS = ("max", "zscore")


def normalize(importance: torch.Tensor, how: str = "max") -> torch.Tensor:
    """Scale-free importance: divided by its max (``"max"``) or standardised (``"zscore"``)."""
    importance = importance.to(torch.float64)
    if how == "max":
        top = importance.max()
        return importance / top if top > 0 else torch.ones_like(importance)
    if how == "zscore":
        std = importance.std(unbiased=False)
        return (importance - importance.mean()) / std if std > 0 else torch.zeros_like(importance)
    raise ValueError(f"normalization={how!r} is not one of {NORMALIZATIONS}.")


def sampling_logits(importance: torch.Tensor, temperature: float, normalization: str = "max") -> torch.Tensor:
    """normalize(m)_l / temperature: the log-probabilities of the draw, up to a constant."""
    return normalize(importance, normalization) / temperature


def sampling_probabilities(
    importance: torch.Tensor, temperature: float, normalization: str = "max"
) -> torch.Tensor:
    """p_l = softmax(normalize(m)_l / temperature)."""
    return torch.softmax(sampling_logits(importance, temperature, normalization), dim=0)


class BlockSampler:
    """Draws ``num_active`` distinct blocks from a probability vector with its own generator.

    The generator is seeded once and saved in checkpoints, so the sequence of active sets is
    reproducible and identical on every rank that holds the same seed and probabilities.
    """

    def __init__(self, num_active: int, seed: int) -> None:
        self.num_active = num_active
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, logits: torch.Tensor) -> list[int]:
        """Sorted block indices drawn without replacement from ``softmax(logits)``.

        At very low temperatures the softmax underflows to exact zeros, and `torch.multinomial`
        then fills the draw with zero-probability blocks. When fewer than ``num_active`` blocks
        keep a positive probability, blocks are drawn one at a time from the softmax of the
        remaining logits instead: the same distribution, without the underflow.
        """
        probabilities = torch.softmax(logits.to(torch.float64), dim=0)
        if int((probabilities > 0).sum()) >= self.num_active:
            picks = torch.multinomial(probabilities, self.num_active, replacement=False, generator=self.generator)
            return sorted(picks.tolist())
        remaining, picks = list(range(len(logits))), []
        for _ in range(self.num_active):
            rest = torch.softmax(logits.to(torch.float64)[remaining], dim=0)
            picks.append(remaining.pop(int(torch.multinomial(rest, 1, generator=self.generator))))
        return sorted(picks)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
