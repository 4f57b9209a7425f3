"""Sampling probabilities, draw frequencies and determinism."""

import itertools
import math

import pytest
import torch

from grass_lightning.core.sampling import BlockSampler, normalize, sampling_logits, sampling_probabilities


def test_max_normalisation_and_softmax_by_hand():
    p = sampling_probabilities(torch.tensor([1e-4, 2e-4, 4e-4]), temperature=0.5)
    # m_hat = [0.25, 0.5, 1] -> exp(m_hat / 0.5) = exp([0.5, 1, 2])
    w = [math.exp(0.5), math.exp(1.0), math.exp(2.0)]
    assert p.tolist() == pytest.approx([x / sum(w) for x in w])


def test_zscore_normalisation_by_hand():
    m_hat = normalize(torch.tensor([1.0, 2.0, 3.0]), "zscore")
    std = math.sqrt(2 / 3)
    assert m_hat.tolist() == pytest.approx([-1 / std, 0.0, 1 / std])


def test_max_normalisation_bounds_starvation_by_temperature():
    p = sampling_probabilities(torch.tensor([1e-9, 1.0, 1.0, 1.0]), temperature=0.5)
    assert p.min() / p.max() >= math.exp(-1 / 0.5) - 1e-9


def test_equal_importance_gives_uniform_probabilities():
    for how in ("max", "zscore"):
        assert sampling_probabilities(torch.full((5,), 3e-5), 0.1, how).tolist() == pytest.approx([0.2] * 5)


def test_single_draw_frequencies_match_the_probabilities():
    logits = sampling_logits(torch.tensor([1.0, 2.0, 3.0, 6.0]), temperature=0.5)
    p = torch.softmax(logits, 0)
    sampler = BlockSampler(1, seed=0)
    n = 20000
    counts = torch.zeros(4)
    for _ in range(n):
        counts[sampler.draw(logits)[0]] += 1
    # Binomial standard error is at most 0.0036 here; allow 4 of them.
    assert (counts / n).tolist() == pytest.approx(p.tolist(), abs=0.015)


def _inclusion_probabilities(p, k):
    """Exact P(block in the draw) for k successive draws without replacement."""
    incl = [0.0] * len(p)
    for order in itertools.permutations(range(len(p)), k):
        prob, left = 1.0, 1.0
        for i in order:
            prob *= p[i] / left
            left -= p[i]
        for i in order:
            incl[i] += prob
    return incl


def test_pair_draw_frequencies_match_exact_inclusion_probabilities():
    logits = sampling_logits(torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0]), temperature=0.5)
    p = torch.softmax(logits, 0)
    sampler = BlockSampler(2, seed=1)
    n = 10000
    counts = torch.zeros(5)
    for _ in range(n):
        drawn = sampler.draw(logits)
        assert len(set(drawn)) == 2  # without replacement
        counts[drawn] += 1
    assert (counts / n).tolist() == pytest.approx(_inclusion_probabilities(p.tolist(), 2), abs=0.02)


def test_draws_are_deterministic_under_a_seed_and_resume_from_saved_state():
    p = torch.zeros(8, dtype=torch.float64)  # uniform
    a, b = BlockSampler(3, seed=42), BlockSampler(3, seed=42)
    first = [a.draw(p) for _ in range(5)]
    assert first == [b.draw(p) for _ in range(5)]
    assert first != [BlockSampler(3, seed=43).draw(p) for _ in range(5)]
    state = a.state_dict()
    later = [a.draw(p) for _ in range(5)]
    c = BlockSampler(3, seed=0)
    c.load_state_dict(state)
    assert [c.draw(p) for _ in range(5)] == later


def test_unknown_normalisation_is_refused():
    with pytest.raises(ValueError, match="normalization='rank'"):
        normalize(torch.ones(3), "rank")


def test_an_extreme_temperature_never_draws_a_zero_probability_block():
    """exp underflows to exact zeros at tau=1e-4; torch.multinomial then fills a draw of three with
    zero-probability blocks at random. The draw follows the remaining logits instead: at such a
    temperature the most important blocks in order, every time."""
    logits = sampling_logits(torch.tensor([1.0, 0.5, 0.1, 0.0, 0.3]), temperature=1e-4)
    assert (torch.softmax(logits, 0) > 0).sum() == 1
    sampler = BlockSampler(3, seed=0)
    assert all(sampler.draw(logits) == [0, 1, 4] for _ in range(50))


def test_the_underflow_path_keeps_the_distribution_of_drawing_without_replacement():
    logits = torch.tensor([2000.0, 1.0, 0.0, 0.0], dtype=torch.float64)  # block 0 certain, then softmax([1, 0, 0])
    sampler = BlockSampler(2, seed=3)
    n = 6000
    counts = torch.zeros(4)
    for _ in range(n):
        drawn = sampler.draw(logits)
        assert drawn[0] == 0
        counts[drawn[1]] += 1
    expected = torch.softmax(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), 0)
    assert (counts[1:] / n).tolist() == pytest.approx(expected.tolist(), abs=0.025)
