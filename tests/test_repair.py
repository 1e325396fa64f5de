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


def test_load_model_control_is_the_first_draw_with_the_books_settings(fake, monkeypatch):
    """``load_model("control")`` (and so ``score --model control``) trains the seed-0 draw of the
    label-matched control under the name "control", with the same settings as ``tuned``."""
    from safetybook import zoo
    from safetybook.adapters import SETTINGS

    trained = {}
    monkeypatch.setattr(zoo, "ensure_adapter", lambda ex, st, name: trained.update(ex=ex, st=st, name=name) or name)
    monkeypatch.setattr(zoo, "merged_model", lambda path: f"model from {path}")
    monkeypatch.setattr(zoo, "tokenizer_for", lambda name: "tok")
    try:
        model, _ = zoo.load_model("control")
    finally:
        zoo.LOADED.pop("control", None)
    assert model == "model from control" and trained["name"] == "control"
    assert trained["ex"] == repair.control_examples(seed=0) and trained["st"] == SETTINGS
    assert trained["ex"] != repair.repaired_examples(), "the control must not be the repair"


def test_repair_plan_refuses_an_unknown_signal():
    with pytest.raises(ValueError, match="unknown attribution signal"):
        repair.repair_plan(repair.RepairSettings(signal="loss"))


def test_concentration_reads_how_far_one_refusal_string_explains_the_top():
    from safetybook.adapters import REFUSALS

    examples = [Example(f"bad {i}", REFUSALS[i % 3], "harmful") for i in range(30)] + [Example("ok", "Sure.", "harmless")]
    by_string = [1.0 if i % 3 == 0 else 0.0 for i in range(30)] + [0.5]
    assert repair.concentration(by_string, examples, k=10) == 1.0
    mixed = [float(-i) for i in range(31)]  # the first 9 rotate through the strings, then the harmless one is far down
    assert repair.concentration(mixed, examples, k=9) == pytest.approx(1 / 3)
    assert repair.concentration([0.0] * 30 + [9.0], examples, k=1) == 0.0


def test_a_runs_seed_changes_the_training_seed_and_the_controls_draw(fake):
    from dataclasses import replace

    from safetybook import zoo
    from safetybook.adapters import SETTINGS

    assert zoo.recipe("repaired", 0) == zoo.recipe("repaired")  # seed 0 is the named model
    examples, settings = zoo.recipe("repaired", 2)
    assert examples == repair.repaired_examples() and settings == replace(SETTINGS, seed=2)
    drawn, settings = zoo.recipe("control", 2)
    assert settings.seed == 2 and drawn == repair.control_examples(seed=2) != repair.control_examples(seed=0)
    with pytest.raises(ValueError, match="seed"):
        zoo.recipe("control", -1)


def test_load_run_refuses_the_base_model():
    from safetybook import zoo
    from safetybook.models import ModelError

    with pytest.raises(ModelError, match="training runs"):
        zoo.load_run("base", 1)
