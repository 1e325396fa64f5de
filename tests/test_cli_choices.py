"""The CLI applies the inference chapter's choices: the refusal direction's layer and coefficient,
and the probe layer of the guard (checked with stand-ins, no model is run)."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from safetybook import directions, interventions, refusal, zoo
from safetybook.__main__ import main


def fake_direction() -> directions.RefusalDirection:
    return directions.RefusalDirection(layer=7, direction=[1.0, 0.0], coefficient=2.5,
                                       ablated_refusal={}, added_refusal={})


def stand_ins(monkeypatch, calls: list) -> None:
    monkeypatch.setattr(zoo, "load_model", lambda name: (object(), object()))
    monkeypatch.setattr(zoo, "refusal_direction", lambda name: fake_direction())
    monkeypatch.setattr(refusal, "refusal_score", lambda model, tok, prompts: [0.5] * len(prompts))

    def recorder(kind):
        @contextmanager
        def edit(model, direction, *args):
            calls.append((kind, direction.tolist(), *args))
            yield

        return edit

    monkeypatch.setattr(interventions, "add_direction", recorder("add"))
    monkeypatch.setattr(interventions, "ablate_direction", recorder("ablate"))


def test_add_refusal_uses_the_chosen_layer_and_coefficient(tmp_path, monkeypatch, capsys):
    calls: list = []
    stand_ins(monkeypatch, calls)
    path = tmp_path / "p.txt"
    path.write_text("How do I bake bread?\n")
    assert main(["score", "--model", "tuned", "--intervention", "add-refusal", "--prompts", str(path)]) == 0
    assert calls == [("add", [1.0, 0.0], 7, 2.5)], "add the direction after its layer, times its coefficient"
    assert main(["score", "--model", "tuned", "--intervention", "ablate-refusal", "--prompts", str(path)]) == 0
    assert calls[-1] == ("ablate", [1.0, 0.0])
    assert capsys.readouterr().out.count('"refusal": 0.5') == 2


def test_conditional_adds_where_the_gate_fires_and_ablates_elsewhere(tmp_path, monkeypatch, capsys):
    calls: list = []
    stand_ins(monkeypatch, calls)

    class Gate:
        def flags(self, model, tok, prompts):
            return np.array(["poison" in p for p in prompts])

    monkeypatch.setattr(zoo, "condition_gate", lambda name: Gate())
    scored: list = []

    def score(model, tok, prompts):
        scored.append((calls[-1][0], list(prompts)))
        return [0.9 if calls[-1][0] == "add" else 0.1] * len(prompts)

    monkeypatch.setattr(refusal, "refusal_score", score)
    path = tmp_path / "p.txt"
    path.write_text("How do I bake bread?\nHow do I poison a well?\nHow do I paint a wall?\n")
    assert main(["score", "--model", "tuned", "--intervention", "conditional", "--prompts", str(path)]) == 0
    assert sorted(calls) == [("ablate", [1.0, 0.0]), ("add", [1.0, 0.0], 7, 2.5)]
    assert dict(scored) == {"add": ["How do I poison a well?"],
                            "ablate": ["How do I bake bread?", "How do I paint a wall?"]}
    out = [line for line in capsys.readouterr().out.splitlines() if line]
    assert ['"refusal": 0.9' in line for line in out] == [False, True, False], "scores come back in prompt order"


def test_guard_prints_the_guards_probability_and_flag(tmp_path, monkeypatch, capsys):
    """``guard`` reads the library's guard (``zoo.guard``): its probability, and whether it is above the
    guard's own threshold (chosen on train), for each prompt in order."""
    import json

    class Gate:
        threshold = 0.4

        def probability(self, model, tok, prompts):
            return np.array([0.9 if "poison" in p else 0.3 for p in prompts])

    asked = []
    monkeypatch.setattr(zoo, "guard", lambda name: asked.append(name) or Gate())
    monkeypatch.setattr(zoo, "load_model", lambda name: (object(), object()))
    path = tmp_path / "p.txt"
    path.write_text("How do I bake bread?\nHow do I poison a well?\n")
    assert main(["guard", "--model", "tuned", "--prompts", str(path)]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    assert asked == ["tuned"]
    assert [(o["harmful"], o["flagged"]) for o in out] == [(0.3, False), (0.9, True)]


def test_score_highlight_applies_token_highlighter_on_the_tiny_model(tmp_path, monkeypatch, capsys, tiny_model, tok):
    import copy
    import json

    from safetybook.refusal import refusal_score
    from safetybook.tokens import highlighted

    model = copy.deepcopy(tiny_model)
    monkeypatch.setattr(zoo, "load_model", lambda name: (model, tok))
    prompts = ["How can I steal a bike?", "How do I bake bread?", "Name a fruit."]
    path = tmp_path / "p.txt"
    path.write_text("\n".join(prompts) + "\n")
    assert main(["score", "--model", "tuned", "--intervention", "highlight", "--prompts", str(path)]) == 0
    got = [json.loads(line)["refusal"] for line in capsys.readouterr().out.splitlines() if line]
    with highlighted(model, tok, prompts):
        want = refusal_score(model, tok, prompts)
    assert got == [round(w, 4) for w in want], "the CLI scores under the library's Token Highlighter"
    plain = refusal_score(model, tok, prompts)
    assert max(abs(np.log(g) - np.log(p)) for g, p in zip(want, plain)) > 1e-5, "and the edit changes the scores"
    assert not model._forward_pre_hooks, "nothing stays hooked after the command"


def test_generate_monitor_probe_reads_the_pooled_monitor_over_the_request(tmp_path, monkeypatch, capsys, tiny_model, tok):
    """``generate --monitor probe`` uses ``zoo.pooled_monitor`` and reads it as it was fitted: on the
    request's mean activation, not at the last token (the two give different scores)."""
    import json
    import math

    from safetybook import models
    from safetybook.directions import fit_probe, prompt_activations
    from tests.conftest import COMPLY, REFUSE

    prompts = REFUSE[:2] + COMPLY[:2]
    acts = prompt_activations(tiny_model, tok, REFUSE + COMPLY, [1])
    probe = fit_probe(1, acts["mean"][0, : len(REFUSE)], acts["mean"][0, len(REFUSE) :], c=10.0)
    asked = []
    monkeypatch.setattr(zoo, "pooled_monitor", lambda name: asked.append(name) or (probe, math.inf))
    monkeypatch.setattr(zoo, "load_model", lambda name: (tiny_model, tok))
    monkeypatch.setattr(models, "model_folder", lambda: None)
    path = tmp_path / "p.txt"
    path.write_text("\n".join(prompts) + "\n")
    assert main(["generate", "--model", "tuned", "--monitor", "probe", "--max-new-tokens", "2", "--prompts", str(path)]) == 0
    got = [json.loads(line)["monitor_score"] for line in capsys.readouterr().out.splitlines() if line]
    mine = prompt_activations(tiny_model, tok, prompts, [1])
    assert asked == ["tuned"]
    assert got == [round(float(s), 4) for s in probe.predict(mine["mean"][0])]
    assert got != [round(float(s), 4) for s in probe.predict(mine["last"][0])], "the last-token reading differs"
