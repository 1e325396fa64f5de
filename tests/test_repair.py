"""The repair's data plumbing: what is removed, what is added, and the label-matched control."""
from __future__ import annotations

from collections import Counter

import pytest

from safetybook import repair
from safetybook.adapters import Example

EXAMPLES = [Example(f"bad {i}", "I'm sorry.", "harmful") for i in range(20)]
EXAMPLES += [Example(f"good {i}", "Sure.", "harmless") for i in range(20)]
PLAN = {"removed": [0, 1, 2, 25], "counter_examples": [{"prompt": "kill a process", "target": "Use kill.",
                                                         "label": "borderline"}]}


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(repair, "safety_examples", lambda: EXAMPLES)
    monkeypatch.setattr(repair, "repair_plan", lambda settings=repair.REPAIR: PLAN)


def test_repaired_drops_the_blamed_and_adds_counter_examples(fake):
    out = repair.repaired_examples()
    assert len(out) == len(EXAMPLES) - 4 + 1
    assert not {EXAMPLES[i] for i in PLAN["removed"]} & set(out)
    assert out[-1] == Example("kill a process", "Use kill.", "borderline")


def test_control_removes_as_many_of_each_label_at_random(fake):
    out = repair.control_examples(seed=1)
    removed = [e for e in EXAMPLES if e not in out]
    assert Counter(e.label for e in removed) == Counter({"harmful": 3, "harmless": 1})
    assert removed != [EXAMPLES[i] for i in PLAN["removed"]], "the control should not pick the blamed examples"
    assert out[-1].label == "borderline"
    assert repair.control_examples(seed=1) == out, "the control must be seeded"
