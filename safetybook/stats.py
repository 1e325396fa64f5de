"""Intervals and verdicts: every effect the book claims comes with its 95 % interval.

An effect is measured on prompts, and often on a retrained model, so its uncertainty has two
sources: *which prompts* were drawn (the test set is a sample of all the prompts one could write)
and *which training run* was drawn (a seed, or a random control's draw). The bootstrap here
resamples both, the way they were drawn:

- ``paired_difference``: two measurements of the **same** prompts (a model before and after an
  edit). Prompts are resampled together, so what the two share (a prompt that every model finds
  hard) cancels out. Treating them as independent samples would overstate the noise.
- ``seeded_difference``: the same, when each side is several training runs: runs are resampled
  within each side, then prompts (still paired across the sides).
- ``paired_auroc_difference``: two scorers (a probe and a baseline, say) of the same prompts.
- ``share``, ``mean``, ``auroc``: one measurement, with its interval.

``verdict`` turns an interval into exactly one word: **"helps"** when all of it lies on the better
side of zero, **"hurts"** when all of it lies on the worse side, else **"no clear effect"**.

Every function is deterministic (a fixed seed), so an executed chapter prints the same interval
every time.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
BOOTSTRAP = 10_000
VERDICTS = ("helps", "no clear effect", "hurts")


@dataclass(frozen=True)
class Interval:
    """An estimate with its ``level`` confidence interval ``[low, high]``."""

    estimate: float
    low: float
    high: float
    level: float = LEVEL

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def signed(self) -> str:
        """A difference, signed, to three decimals: '+0.057 [+0.018, +0.103]'."""
        return f"{self.estimate:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"

    def points(self) -> str:
        """The interval of a share or a difference of shares, in percentage points: '-12 [-20, -4]'."""
        return f"{100 * self.estimate:+.0f} [{100 * self.low:+.0f}, {100 * self.high:+.0f}] points"

    def percent(self) -> str:
        """The interval of a share in per cent: '12 % [8, 18]'."""
        return f"{100 * self.estimate:.0f} % [{100 * self.low:.0f}, {100 * self.high:.0f}]"

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def _statistic(kind: str, threshold: float):
    if kind == "mean":
        return lambda x: x.mean(-1)
    if kind == "share":
        return lambda x: (x > threshold).mean(-1)
    raise ValueError(f"unknown statistic {kind!r}: use 'mean' or 'share'")


def _percentiles(estimate: float, draws: np.ndarray, level: float) -> Interval:
    tail = (1 - level) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return Interval(float(estimate), float(low), float(high), level)


def _array(x: Sequence[float], name: str) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    if a.ndim != 1 or len(a) == 0:
        raise ValueError(f"{name}: expected a non-empty list of per-prompt scores")
    return a


def share(scores: Sequence[float], threshold: float = 0.5, level: float = LEVEL) -> Interval:
    """The share of ``scores`` above ``threshold``, with its Wilson score interval (exact enough
    for small sets, and never outside [0, 1])."""
    x = _array(scores, "scores")
    n, k = len(x), int((x > threshold).sum())
    z = _z(level)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), level)


def mean(scores: Sequence[float], level: float = LEVEL, seed: int = 0) -> Interval:
    """The mean of ``scores`` with a bootstrap percentile interval over the prompts."""
    x = _array(scores, "scores")
    idx = np.random.default_rng(seed).integers(0, len(x), (BOOTSTRAP, len(x)))
    return _percentiles(x.mean(), x[idx].mean(-1), level)


def paired_difference(
    after: Sequence[float], before: Sequence[float], statistic: str = "mean", threshold: float = 0.5,
    level: float = LEVEL, seed: int = 0,
) -> Interval:
    """``statistic(after) - statistic(before)`` for two measurements of the same prompts (in the same
    order), with a bootstrap interval that resamples prompts jointly."""
    a, b = _array(after, "after"), _array(before, "before")
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same prompts: {len(a)} against {len(b)}")
    stat = _statistic(statistic, threshold)
    idx = np.random.default_rng(seed).integers(0, len(a), (BOOTSTRAP, len(a)))
    return _percentiles(stat(a) - stat(b), stat(a[idx]) - stat(b[idx]), level)


def unpaired_difference(
    after: Sequence[float], before: Sequence[float], statistic: str = "mean", threshold: float = 0.5,
    level: float = LEVEL, seed: int = 0,
) -> Interval:
    """``statistic(after) - statistic(before)`` for two independent samples (different prompts)."""
    a, b = _array(after, "after"), _array(before, "before")
    stat = _statistic(statistic, threshold)
    rng = np.random.default_rng(seed)
    ia, ib = rng.integers(0, len(a), (BOOTSTRAP, len(a))), rng.integers(0, len(b), (BOOTSTRAP, len(b)))
    return _percentiles(stat(a) - stat(b), stat(a[ia]) - stat(b[ib]), level)


def selectivity(
    target: tuple[Sequence[float], Sequence[float]], costs: Sequence[tuple[Sequence[float], Sequence[float]]],
    level: float = LEVEL, seed: int = 0,
) -> Interval:
    """How selective an edit is: its mean gain where it should act minus its mean gain where it should not.

    ``target`` and each of ``costs`` are ``(after, before)`` scores of one prompt set, each set scored twice
    on the same prompts. The estimate is ``gain(target) - mean over costs of gain(cost)``, with
    ``gain = mean(after - before)``: above 0 when the edit moves the target more than the other sets.
    The sets hold different prompts: the bootstrap resamples each set's prompts on its own, paired
    within the set."""
    rng = np.random.default_rng(seed)

    def gains(after, before, name):
        a, b = _array(after, f"{name} after"), _array(before, f"{name} before")
        if len(a) != len(b):
            raise ValueError(f"{name}: paired scores need the same prompts: {len(a)} against {len(b)}")
        d = a - b
        return d.mean(), d[rng.integers(0, len(d), (BOOTSTRAP, len(d)))].mean(-1)

    if not costs:
        raise ValueError("selectivity needs at least one set where the edit should not act")
    estimate, draws = gains(*target, "target")
    cost = [gains(after, before, f"cost {i}") for i, (after, before) in enumerate(costs)]
    estimate -= np.mean([c[0] for c in cost])
    draws = draws - np.mean([c[1] for c in cost], axis=0)
    return _percentiles(estimate, draws, level)


def seeded_difference(
    after_runs: Sequence[Sequence[float]], before_runs: Sequence[Sequence[float]], statistic: str = "mean",
    threshold: float = 0.5, level: float = LEVEL, seed: int = 0,
) -> Interval:
    """The difference of ``statistic`` between two sets of training runs (seeds, or a control's random
    draws), each run scored on the same prompts. The estimate averages over runs; the interval
    resamples runs within each side, then prompts, paired across the sides. With one run per side
    it is ``paired_difference``."""
    a = np.asarray(after_runs, dtype=float)
    b = np.asarray(before_runs, dtype=float)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or a.size == 0 or b.size == 0:
        raise ValueError("seeded scores: expected [run, prompt] arrays on the same prompts")
    stat = _statistic(statistic, threshold)
    rng = np.random.default_rng(seed)
    n = a.shape[1]
    ra = rng.integers(0, len(a), (BOOTSTRAP, len(a)))
    rb = rng.integers(0, len(b), (BOOTSTRAP, len(b)))
    idx = rng.integers(0, n, (BOOTSTRAP, n))
    draws = np.empty(BOOTSTRAP)
    for i in range(BOOTSTRAP):  # runs first, then prompts: [runs, prompts] for each side
        draws[i] = stat(a[ra[i]][:, idx[i]]).mean() - stat(b[rb[i]][:, idx[i]]).mean()
    return _percentiles(stat(a).mean() - stat(b).mean(), draws, level)


def auroc(positive: Sequence[float], negative: Sequence[float], level: float = LEVEL, seed: int = 0) -> Interval:
    """The area under the ROC curve of scores that should be higher for ``positive`` than for
    ``negative`` (ties count half), with a bootstrap interval that resamples each class."""
    p, q = _array(positive, "positive"), _array(negative, "negative")
    rng = np.random.default_rng(seed)
    ip = rng.integers(0, len(p), (BOOTSTRAP, len(p)))
    iq = rng.integers(0, len(q), (BOOTSTRAP, len(q)))
    draws = np.array([_auc(p[i], q[j]) for i, j in zip(ip, iq)])
    return _percentiles(_auc(p, q), draws, level)


def paired_auroc_difference(
    positive_a: Sequence[float], negative_a: Sequence[float], positive_b: Sequence[float], negative_b: Sequence[float],
    level: float = LEVEL, seed: int = 0,
) -> Interval:
    """``AUROC(a) - AUROC(b)`` for two scorers of the **same** prompts (in the same order): each class's
    prompts are resampled once for both scorers, so that a prompt hard for both cancels out."""
    pa, qa = _array(positive_a, "positive_a"), _array(negative_a, "negative_a")
    pb, qb = _array(positive_b, "positive_b"), _array(negative_b, "negative_b")
    if len(pa) != len(pb) or len(qa) != len(qb):
        raise ValueError("paired AUROCs need the same prompts scored by both: "
                         f"{len(pa)}/{len(qa)} against {len(pb)}/{len(qb)}")
    rng = np.random.default_rng(seed)
    ip = rng.integers(0, len(pa), (BOOTSTRAP, len(pa)))
    iq = rng.integers(0, len(qa), (BOOTSTRAP, len(qa)))
    draws = np.array([_auc(pa[i], qa[j]) - _auc(pb[i], qb[j]) for i, j in zip(ip, iq)])
    return _percentiles(_auc(pa, qa) - _auc(pb, qb), draws, level)


def _auc(p: np.ndarray, q: np.ndarray) -> float:
    """P(a positive's score > a negative's), ties counting half (the Mann-Whitney statistic)."""
    qs = np.sort(q)
    below, up_to = np.searchsorted(qs, p, side="left"), np.searchsorted(qs, p, side="right")
    return float((below + 0.5 * (up_to - below)).sum() / (len(p) * len(q)))


def verdict(effect: Interval, better: str = "lower") -> str:
    """'helps', 'no clear effect' or 'hurts' for an effect whose ``better`` direction is 'lower' (less
    over-refusal, say) or 'higher' (more refusal of harmful prompts): decided by the interval alone."""
    if better not in ("lower", "higher"):
        raise ValueError(f"better must be 'lower' or 'higher', not {better!r}")
    sign = -1 if better == "lower" else 1
    if sign * effect.low > 0 and sign * effect.high > 0:
        return "helps"
    if sign * effect.low < 0 and sign * effect.high < 0:
        return "hurts"
    return "no clear effect"


def target(effect: Interval, bound: float, at_least: bool) -> str:
    """'met' or 'missed' when the whole interval lies on one side of ``bound`` (``at_least``: the effect
    should reach it; else it should stay at or below it), 'open' when the interval straddles it."""
    ok = effect.low >= bound if at_least else effect.high <= bound
    bad = effect.high < bound if at_least else effect.low > bound
    return "met" if ok else "missed" if bad else "open"


def _z(level: float) -> float:
    """The standard normal quantile for a two-sided ``level`` interval."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + level / 2)
