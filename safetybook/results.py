"""What each stage chapter measured of its safety enhancement, for the closing chapter's verdict table.

A chapter calls ``record`` once per enhancement with the per-prompt scores it measured: before the
edit, after it, and after its control (the same edit with its informative part replaced by
chance). ``record`` computes the intervals (``stats.paired_difference``) and the verdict, so no
chapter types either. The rows are kept as JSON in the cache folder, one file per chapter, and the
closing chapter reads them back with ``recorded``. Running a chapter again replaces its rows.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from . import stats
from .cache import cache_dir, read_json, write_json
from .data import TOOL_STAGES as STAGES  # the workflow stages in the survey's order (the table's row order)


@dataclass(frozen=True)
class Row:
    """One enhancement, measured on held-out prompts beside its control."""

    chapter: str
    stage: str
    enhancement: str
    control: str
    measure: str  #: what the scores are, e.g. "refusal of borderline test prompts"
    n: int  #: prompts in the paired comparison
    better: str  #: "lower" or "higher": which way the measure should move
    effect: stats.Interval  #: after − before, on the same prompts
    control_effect: stats.Interval  #: control − before, on the same prompts
    against_control: stats.Interval  #: after − control: what the interpretation itself earned
    cost: str  #: the cost on harmless prompts, in words with its numbers
    verdict: str  #: ``combined_verdict`` of ``effect`` and ``against_control``
    diagnosis: str = ""  #: for a null or negative result: why it did not work
    try_next: str = ""  #: and what to try next
    statistic: str = "mean"  #: "mean" (mean score) or "share" (share above 0.5)

    def shown(self, interval: stats.Interval) -> str:
        """An interval of this row, as a share in points or as a mean score."""
        if self.statistic == "share":
            return interval.points()
        return f"{interval.estimate:+.3f} [{interval.low:+.3f}, {interval.high:+.3f}]"


def combined_verdict(effect: stats.Interval, against_control: stats.Interval, better: str) -> str:
    """'helps' only when the enhancement beats doing nothing *and* beats its control (a control that
    makes things worse must not make a null effect look like a gain); 'hurts' when it makes things
    worse than doing nothing; else 'no clear effect'."""
    alone = stats.verdict(effect, better)
    if alone == "hurts":
        return "hurts"
    return "helps" if alone == "helps" and stats.verdict(against_control, better) == "helps" else "no clear effect"


def _difference(a, b, statistic: str) -> stats.Interval:
    """``a − b`` on the same prompts. A side given as a [run, prompt] array is several training runs (seeds,
    or a control's draws): then the interval resamples the runs too (``stats.seeded_difference``)."""
    if np.ndim(a) == 2 or np.ndim(b) == 2:
        return stats.seeded_difference(np.atleast_2d(a), np.atleast_2d(b), statistic)
    return stats.paired_difference(a, b, statistic)


def _interval(x: dict) -> stats.Interval:
    return stats.Interval(**x)


def record(
    chapter: str,
    stage: str,
    enhancement: str,
    *,
    control: str,
    measure: str,
    better: str,
    before: Sequence[float],
    after: Sequence[float],
    control_after: Sequence[float],
    cost: str,
    diagnosis: str = "",
    try_next: str = "",
    statistic: str = "mean",
) -> Row:
    """Compute one enhancement's row from per-prompt scores on the same prompts (in the same order) and
    keep it for the closing chapter. ``statistic`` is 'mean' (the mean score) or 'share' (above 0.5).
    Where a model was retrained over several seeds, pass its scores as a [run, prompt] array: its
    intervals then hold the seeds' variance as well as the prompts'."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: use one of {', '.join(STAGES)}")
    against = _difference(after, control_after, statistic)
    effect = _difference(after, before, statistic)
    row = Row(
        chapter=chapter, stage=stage, enhancement=enhancement, control=control, measure=measure,
        n=np.shape(before)[-1], better=better,
        effect=effect,
        control_effect=_difference(control_after, before, statistic),
        against_control=against, cost=cost, verdict=combined_verdict(effect, against, better), diagnosis=diagnosis,
        try_next=try_next, statistic=statistic,
    )
    path = cache_dir("results") / f"{chapter}.json"
    rows = [r for r in read_json(path) or [] if r["enhancement"] != enhancement]
    write_json(path, rows + [asdict(row)])
    return row


def recorded() -> list[Row]:
    """Every kept row, in the order of the stages, then of the chapters and their calls."""
    rows = []
    for path in sorted(cache_dir("results").glob("*.json")):
        for r in read_json(path) or []:
            fields = {k: _interval(v) if k in ("effect", "control_effect", "against_control") else v
                      for k, v in r.items()}
            rows.append(Row(**fields))
    return sorted(rows, key=lambda r: STAGES.index(r.stage))
