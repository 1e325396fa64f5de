"""The closing chapter's verdict rows: computed from scores, kept per chapter, replaced on a rerun."""
from __future__ import annotations

import numpy as np
import pytest

from safetybook import results, stats

RNG = np.random.default_rng(7)


def _scores(n: int = 40):
    before = RNG.random(n)
    return before, np.clip(before - 0.3, 0, 1), np.clip(before + RNG.normal(0, 0.02, n), 0, 1)


def _record(name: str, before, after, control_after, better="lower", chapter="02_input", stage="input"):
    return results.record(chapter, stage, name, control="random", measure="refusal", better=better,
                          before=before, after=after, control_after=control_after, cost="none")


def test_the_verdict_follows_the_interval_against_the_control(monkeypatch, tmp_path):
    monkeypatch.setenv("SAFETYBOOK_CACHE", str(tmp_path))
    before, after, control = _scores()
    lower = _record("lowers refusal", before, after, control)
    assert lower.verdict == "helps" and lower.against_control.high < 0
    assert lower.effect.estimate == pytest.approx(after.mean() - before.mean())
    assert _record("same, wrong way", before, after, control, better="higher").verdict == "hurts"
    # an edit that does what its control does earns nothing, whatever it does to the scores
    assert _record("as good as chance", before, after, after.copy()).verdict == "no clear effect"
    # an edit that changes nothing is no gain, even beside a control that makes things worse
    worse = np.clip(before + 0.3, 0, 1)
    null = _record("does nothing", before, before + RNG.normal(0, 0.01, len(before)), worse)
    assert null.against_control.high < 0 and null.verdict == "no clear effect"


def test_rows_come_back_in_stage_order_and_a_rerun_replaces_its_row(monkeypatch, tmp_path):
    monkeypatch.setenv("SAFETYBOOK_CACHE", str(tmp_path))
    before, after, control = _scores()
    _record("gate", before, after, control, chapter="04_generation", stage="generation")
    _record("repair", before, control, control, chapter="01_training", stage="training")
    _record("repair", before, after, control, chapter="01_training", stage="training")
    rows = results.recorded()
    assert [r.enhancement for r in rows] == ["repair", "gate"]
    assert rows[0].verdict == "helps"  # the second call replaced the first
    assert rows[0].effect == stats.paired_difference(after, before)


def test_unknown_stage_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("SAFETYBOOK_CACHE", str(tmp_path))
    before, after, control = _scores(5)
    with pytest.raises(ValueError, match="unknown stage"):
        _record("x", before, after, control, stage="deployment")


def test_runs_widen_the_interval_by_their_spread(monkeypatch, tmp_path):
    """Scores given as [run, prompt] arrays (several seeds) put the seeds' spread into the interval: runs
    that agree give about the one-run interval; runs that disagree give a wider one, around their mean."""
    monkeypatch.setenv("SAFETYBOOK_CACHE", str(tmp_path))
    before, after, control = _scores()
    one = _record("one run", before, after, control)
    agree = _record("runs agree", before, np.stack([after] * 3), np.stack([control] * 3))
    assert agree.n == len(before)
    assert agree.against_control.estimate == pytest.approx(one.against_control.estimate)
    assert agree.against_control.high - agree.against_control.low == pytest.approx(
        one.against_control.high - one.against_control.low, rel=0.3)
    spread = np.stack([np.clip(after + shift, 0, 1) for shift in (-0.25, 0.0, 0.25)])
    disagree = _record("runs disagree", before, spread, np.stack([control] * 3))
    assert disagree.against_control.estimate == pytest.approx(spread.mean(1).mean() - control.mean())
    assert disagree.against_control.high - disagree.against_control.low > 2 * (
        one.against_control.high - one.against_control.low)
