"""The importance formulas against hand-computed values."""

import math

import pytest
import torch

from grass_lightning.core.importance import ImportanceEstimate


def test_window_mean_and_first_refresh_take_the_mean():
    est = ImportanceEstimate(3, ema=0.25)
    est.record([0, 1], torch.tensor([1.0, 2.0]))
    est.record([0, 1], torch.tensor([3.0, 6.0]))
    window = est.window_mean()
    assert window[:2].tolist() == [2.0, 4.0] and math.isnan(window[2])
    est.refresh()
    assert est.estimate[:2].tolist() == [2.0, 4.0]
    assert math.isnan(est.estimate[2])  # never measured


def test_refresh_blends_only_blocks_measured_in_the_window():
    est = ImportanceEstimate(3, ema=0.25)
    est.record([0, 1, 2], torch.tensor([4.0, 8.0, 1.0]))
    est.refresh()
    est.record([1], torch.tensor([0.0]))
    est.record([1], torch.tensor([4.0]))
    est.refresh()
    # block 1: 0.25 * mean(0, 4) + 0.75 * 8 = 0.5 + 6 = 6.5; blocks 0 and 2 keep theirs
    assert est.estimate.tolist() == [4.0, 6.5, 1.0]
    assert est.window_count.sum() == 0


def test_nonfinite_values_are_skipped_and_counted():
    est = ImportanceEstimate(2, ema=0.5)
    est.record([0, 1], torch.tensor([2.0, float("nan")]))
    est.record([0, 1], torch.tensor([float("inf"), 3.0]))
    est.refresh()
    assert est.estimate.tolist() == [2.0, 3.0]
    assert int(est.nonfinite) == 2


def test_filled_gives_unmeasured_blocks_the_largest_known_value():
    est = ImportanceEstimate(3, ema=0.5)
    assert est.filled().tolist() == [1.0, 1.0, 1.0]  # nothing known: uniform
    est.record([0, 1], torch.tensor([0.5, 2.0]))
    est.refresh()
    assert est.filled().tolist() == [0.5, 2.0, 2.0]


def test_state_round_trip_is_exact_and_checks_the_block_count():
    est = ImportanceEstimate(3, ema=0.5)
    est.record([0, 2], torch.tensor([0.1, float("nan")]))
    est.refresh()
    est.record([1], torch.tensor([0.7]))
    other = ImportanceEstimate(3, ema=0.5)
    other.load_state_dict(est.state_dict())
    assert torch.equal(other.estimate.nan_to_num(-1), est.estimate.nan_to_num(-1))
    assert torch.equal(other.window_sum, est.window_sum) and torch.equal(other.window_count, est.window_count)
    assert int(other.nonfinite) == 1
    with pytest.raises(ValueError, match="3 blocks, the model has 4"):
        ImportanceEstimate(4, ema=0.5).load_state_dict(est.state_dict())
