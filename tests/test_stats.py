"""The intervals cover what they claim to, pairing narrows them, and verdicts follow the interval."""
from __future__ import annotations

import numpy as np
import pytest

from safetybook import stats

RNG = np.random.default_rng(12345)


def _coverage(make_interval, truth: float, trials: int = 300) -> float:
    return float(np.mean([make_interval(i).contains(truth) for i in range(trials)]))


def test_share_interval_covers_the_true_share():
    p = 0.3
    rate = _coverage(lambda i: stats.share(RNG.random(40) < p, threshold=0.5), p)
    assert 0.91 <= rate <= 0.99, f"Wilson interval covered {rate:.0%} of the time"


def test_mean_interval_covers_the_true_mean():
    rate = _coverage(lambda i: stats.mean(RNG.beta(2, 5, size=50), seed=i), 2 / 7)
    assert 0.90 <= rate <= 0.99, f"bootstrap interval covered {rate:.0%} of the time"


def _correlated(n: int = 60, effect: float = 0.05):
    """Scores of the same prompts before and after an edit: prompt difficulty dominates both."""
    difficulty = RNG.random(n)
    before = np.clip(difficulty + RNG.normal(0, 0.03, n), 0, 1)
    after = np.clip(difficulty - effect + RNG.normal(0, 0.03, n), 0, 1)
    return after, before


def test_paired_interval_covers_and_is_narrower_than_unpaired_on_correlated_scores():
    after, before = _correlated()
    paired = stats.paired_difference(after, before)
    unpaired = stats.unpaired_difference(after, before)
    assert paired.estimate == pytest.approx(unpaired.estimate)
    assert paired.high - paired.low < 0.5 * (unpaired.high - unpaired.low)
    truth = -0.05
    rate = _coverage(lambda i: stats.paired_difference(*_correlated(), seed=i), truth, trials=200)
    assert 0.88 <= rate <= 0.99, f"paired interval covered {rate:.0%} of the time"
    # the unpaired interval, blind to the pairing, cannot tell this effect from zero
    assert unpaired.contains(0.0) and not paired.contains(0.0)


def test_paired_difference_needs_the_same_prompts():
    with pytest.raises(ValueError, match="same prompts"):
        stats.paired_difference([0.1, 0.2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="statistic"):
        stats.paired_difference([0.1], [0.2], statistic="median")


def test_share_difference_counts_scores_above_the_threshold():
    before = np.array([0.9, 0.8, 0.7, 0.2])
    after = np.array([0.1, 0.8, 0.3, 0.2])
    d = stats.paired_difference(after, before, statistic="share")
    assert d.estimate == pytest.approx(-0.5)
    assert d.low <= -0.5 <= d.high


def test_training_seeds_widen_the_interval():
    n = 80
    difficulty = RNG.random(n)
    base = np.clip(difficulty[None] + RNG.normal(0, 0.02, (1, n)), 0, 1)
    # three seeds whose whole level shifts by ±0.1: a real source of variance between runs
    runs = np.clip(difficulty[None] - 0.05 + np.array([[-0.1], [0.0], [0.1]]) + RNG.normal(0, 0.02, (3, n)), 0, 1)
    one_seed = stats.paired_difference(runs[1], base[0])
    seeded = stats.seeded_difference(runs, base)
    assert seeded.estimate == pytest.approx(runs.mean() - base.mean())
    assert seeded.high - seeded.low > 2 * (one_seed.high - one_seed.low)
    same = stats.seeded_difference(runs[1:2], base)
    assert same.estimate == pytest.approx(one_seed.estimate)
    with pytest.raises(ValueError, match="same prompts"):
        stats.seeded_difference(runs[:, :10], base)


def test_auroc_and_its_interval():
    assert stats.auroc([0.9, 0.8], [0.1, 0.2]).estimate == 1.0
    assert stats.auroc([0.5, 0.5], [0.5, 0.5]).estimate == 0.5  # ties count half
    assert stats.auroc([0.1], [0.9]).estimate == 0.0
    truth = 0.76025  # P(N(1,1) > N(0,1)) = Φ(1/√2)
    rate = _coverage(lambda i: stats.auroc(RNG.normal(1, 1, 40), RNG.normal(0, 1, 40), seed=i), truth, trials=150)
    assert 0.88 <= rate <= 0.99, f"AUROC interval covered {rate:.0%} of the time"


def test_paired_auroc_difference_cancels_what_two_scorers_share():
    pos, neg = RNG.normal(1, 1, 60), RNG.normal(0, 1, 60)
    same = stats.paired_auroc_difference(pos, neg, pos, neg)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)
    noisy_pos, noisy_neg = pos + RNG.normal(0, 0.5, 60), neg + RNG.normal(0, 0.5, 60)  # the same scorer, blurred
    diff = stats.paired_auroc_difference(pos, neg, noisy_pos, noisy_neg)
    width = diff.high - diff.low
    alone = [stats.auroc(pos, neg), stats.auroc(noisy_pos, noisy_neg)]
    assert width < min(a.high - a.low for a in alone), (diff, alone)  # unpaired, the noise would add up
    assert diff.estimate == pytest.approx(alone[0].estimate - alone[1].estimate)
    with pytest.raises(ValueError, match="same prompts"):
        stats.paired_auroc_difference(pos, neg, pos[:-1], neg)


@pytest.mark.parametrize(
    ("low", "high", "better", "word"),
    [(-0.2, -0.05, "lower", "helps"), (0.05, 0.2, "lower", "hurts"), (-0.1, 0.1, "lower", "no clear effect"),
     (0.05, 0.2, "higher", "helps"), (-0.2, -0.05, "higher", "hurts"), (-0.1, 0.0, "higher", "no clear effect")],
)
def test_verdict_is_read_off_the_interval(low, high, better, word):
    assert stats.verdict(stats.Interval((low + high) / 2, low, high), better) == word


def test_verdict_rejects_an_unknown_direction():
    with pytest.raises(ValueError, match="better"):
        stats.verdict(stats.Interval(0.0, -1.0, 1.0), "sideways")


def test_intervals_are_reproducible_and_print_in_points():
    x = RNG.random(30)
    assert stats.mean(x) == stats.mean(x)
    d = stats.Interval(-0.12, -0.2, -0.04)
    assert d.points() == "-12 [-20, -4] points"
    assert d.signed() == "-0.120 [-0.200, -0.040]"
    assert stats.Interval(0.057, 0.018, 0.103).signed() == "+0.057 [+0.018, +0.103]"


def test_a_target_is_met_or_missed_only_when_the_whole_interval_is_on_one_side():
    from safetybook.stats import Interval, target

    assert target(Interval(0.12, 0.10, 0.15), 0.1, at_least=True) == "met"
    assert target(Interval(0.05, 0.02, 0.08), 0.1, at_least=True) == "missed"
    assert target(Interval(0.10, 0.08, 0.12), 0.1, at_least=True) == "open"
    assert target(Interval(0.02, 0.01, 0.03), 0.05, at_least=False) == "met"
    assert target(Interval(0.07, 0.06, 0.09), 0.05, at_least=False) == "missed"
    assert target(Interval(0.05, 0.036, 0.064), 0.05, at_least=False) == "open"


def _edited(n: int, gain: float):
    """Scores of ``n`` prompts before and after an edit that moves each by about ``gain``."""
    before = RNG.random(n)
    return before + gain + RNG.normal(0, 0.05, n), before


def test_selectivity_is_the_target_gain_minus_the_mean_cost_gain_and_covers_it():
    target, costs = _edited(36, 0.10), [_edited(24, 0.02), _edited(24, 0.06)]
    s = stats.selectivity(target, costs)
    gain = lambda pair: float(np.mean(pair[0] - pair[1]))
    assert s.estimate == pytest.approx(gain(target) - (gain(costs[0]) + gain(costs[1])) / 2)
    assert s.low < s.estimate < s.high
    rate = _coverage(lambda i: stats.selectivity(_edited(36, 0.10), [_edited(24, 0.02), _edited(24, 0.06)], seed=i),
                     0.06, trials=200)
    assert 0.88 <= rate <= 0.99, f"selectivity interval covered {rate:.0%} of the time"


def test_an_edit_that_moves_everything_alike_is_not_selective():
    s = stats.selectivity(_edited(36, 0.1), [_edited(24, 0.1), _edited(24, 0.1)])
    assert s.contains(0.0)
    assert stats.selectivity(_edited(36, 0.0), [_edited(24, 0.1)]).high < 0, "raising only the others is negative"
    with pytest.raises(ValueError):
        stats.selectivity(_edited(36, 0.1), [])
    with pytest.raises(ValueError):
        stats.selectivity(_edited(36, 0.1), [(np.zeros(3), np.zeros(4))])
