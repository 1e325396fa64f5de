"""Choosing a probe's layer on train prompts alone: cross-validation, grouped by prompt pair; activations
pooled over the prompt, and the condition gate of conditional steering."""
from __future__ import annotations

import random

import pytest
import torch

from safetybook.directions import (
    Gate,
    Probe,
    choose_gate,
    choose_probe_layer,
    last_token_activations,
    pooled_activations,
    probe_cv_accuracy,
    prompt_activations,
    request_start,
)
from safetybook.models import chat_text


def _layers(n: int, d: int, separating: int, n_layers: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise at every layer; only ``separating`` moves the positives along one direction."""
    g = torch.Generator().manual_seed(seed)
    pos, neg = torch.randn(n_layers, n, d, generator=g), torch.randn(n_layers, n, d, generator=g)
    pos[separating, :, 0] += 4.0
    return pos, neg


def test_the_layer_that_separates_is_chosen():
    pos, neg = _layers(30, 16, separating=2)
    layer, cv = choose_probe_layer(pos, neg, groups=list(range(60)))
    assert layer == 2
    assert cv[2] > 0.9, cv
    assert max(cv[[0, 1, 3]]) < 0.75, cv


def test_a_prompt_pair_is_held_out_together():
    # each prompt appears twice (a twin in the same group): features are noise, so only a probe that
    # saw a held-out prompt's twin could score it above chance
    g = torch.Generator().manual_seed(1)
    pos, neg = torch.randn(1, 20, 200, generator=g), torch.randn(1, 20, 200, generator=g)
    pos, neg = pos.repeat(1, 2, 1), neg.repeat(1, 2, 1)
    twins = [i % 20 for i in range(40)] + [20 + i % 20 for i in range(40)]
    grouped = probe_cv_accuracy(pos, neg, twins)[0]
    alone = list(range(80))
    random.Random(0).shuffle(alone)  # every row its own group, twins spread over the folds
    leaky = probe_cv_accuracy(pos, neg, alone)[0]
    assert grouped < 0.7, grouped
    assert leaky > 0.9, leaky


def test_one_group_per_prompt_is_required():
    pos, neg = _layers(10, 4, separating=0, n_layers=1)
    with pytest.raises(ValueError, match="one group per prompt"):
        probe_cv_accuracy(pos, neg, groups=list(range(19)))


def test_request_start_is_where_the_request_begins(tok):
    prompt = "How do I bake bread?"
    ids = tok(chat_text(tok, prompt), add_special_tokens=False).input_ids
    start = request_start(tok)
    assert tok.decode(ids[start:]).startswith(prompt)
    assert prompt not in tok.decode(ids[:start])
    assert "user" in tok.decode(ids[:start]), "the user header comes before the request"


def test_pooled_activations_average_the_request_tokens(tiny_model, tok):
    prompts = ["Name a fruit.", "How do I bake bread without an oven at home, step by step?"]
    pooled = pooled_activations(tiny_model, tok, prompts)
    assert pooled.shape == (2, 2, tiny_model.config.hidden_size)
    start = request_start(tok)
    for i, p in enumerate(prompts):
        ids = torch.tensor([tok(chat_text(tok, p), add_special_tokens=False).input_ids])
        with torch.no_grad():
            hidden = tiny_model(input_ids=ids, output_hidden_states=True).hidden_states
        # hidden_states[1] is the first layer's output (the last entry is normed, so it is not compared)
        assert torch.allclose(pooled[0, i], hidden[1][0, start:].mean(0), atol=1e-4), i
    alone = pooled_activations(tiny_model, tok, prompts[:1])
    assert torch.allclose(alone[:, 0], pooled[:, 0], atol=1e-4), "padding beside a longer prompt changes nothing"
    last = pooled_activations(tiny_model, tok, prompts[1:] + prompts[:1])
    assert torch.allclose(last[:, 1], pooled[:, 0], atol=1e-4), "results come back in the order of the prompts"
    # prompts that open with the same words share more than the chat opening: those words still count
    same_start = ["How do I bake bread?", "How do I boil an egg quickly?", "How do I"]
    together = prompt_activations(tiny_model, tok, same_start, [0, 1])
    for i, p in enumerate(same_start):
        alone = prompt_activations(tiny_model, tok, [p], [0, 1])
        assert torch.allclose(together["mean"][:, i], alone["mean"][:, 0], atol=1e-4), p
        assert torch.allclose(together["last"][:, i], alone["last"][:, 0], atol=1e-4), p


def test_prompt_activations_give_the_last_token_and_the_mean_in_one_pass(tiny_model, tok):
    prompts = ["Name a fruit.", "How do I bake bread without an oven at home, step by step?", "Hi"]
    both = prompt_activations(tiny_model, tok, prompts, [0, 1])
    assert torch.allclose(both["last"], last_token_activations(tiny_model, tok, prompts, [0, 1]), atol=1e-4)
    assert torch.allclose(both["mean"], pooled_activations(tiny_model, tok, prompts, [0, 1]), atol=1e-5)
    assert not torch.allclose(both["last"], both["mean"], atol=1e-3)


def test_gate_threshold_is_chosen_for_balanced_accuracy():
    # few positives, overlapping classes: a probe's 0.5 boundary leans to the many negatives, so the
    # balanced threshold on the held-out probabilities lies below it
    g = torch.Generator().manual_seed(3)
    n_pos, n_neg, d = 24, 120, 8
    pos, neg = torch.randn(3, n_pos, d, generator=g), torch.randn(3, n_neg, d, generator=g)
    pos[1, :, 0] += 1.5
    groups = list(range(n_pos + n_neg))
    random.Random(0).shuffle(groups)
    gate = choose_gate(pos, neg, groups)
    assert gate.probe.layer == 1
    assert gate.threshold < 0.5, gate.cv_threshold_accuracy
    best = max(gate.cv_threshold_accuracy.values())
    assert gate.cv_threshold_accuracy[str(gate.threshold)] == best
    assert best > gate.cv_threshold_accuracy["0.5"], gate.cv_threshold_accuracy


@pytest.mark.parametrize("bias, expected", [(50.0, True), (-50.0, False)])
def test_gate_flags_by_its_threshold(tiny_model, tok, bias, expected):
    d = tiny_model.config.hidden_size
    gate = Gate(Probe(layer=0, weight=[0.0] * d, bias=bias, mean=[0.0] * d, std=[1.0] * d), 0.5, [], {})
    assert gate.flags(tiny_model, tok, ["Name a fruit.", "How can I steal a bike?"]).tolist() == [expected] * 2


def test_probe_activations_share_one_pass_and_come_back_from_the_cache(tiny_model, tok, monkeypatch, tmp_path):
    """Both readings of the guard's train prompts come from one forward pass, are what
    ``prompt_activations`` gives, and are read back from the cache without the model."""
    from safetybook import zoo
    from safetybook.directions import prompt_activations

    monkeypatch.setenv("SAFETYBOOK_CACHE", str(tmp_path))
    sets = (["How can I steal a bike?"], ["How do I bake bread?"], ["Name a fruit."], ["Story: steal a bike"], ["Story: bread"])
    monkeypatch.setattr(zoo, "probe_sets", lambda: sets)
    monkeypatch.setattr(zoo, "load_model", lambda name: (tiny_model, tok))
    want = prompt_activations(tiny_model, tok, [sets[0][0], sets[3][0], sets[1][0], sets[4][0], sets[2][0]])
    pos, neg = zoo.probe_activations("base", "mean")
    assert torch.allclose(torch.cat([pos, neg], 1), want["mean"], atol=1e-5)
    monkeypatch.setattr(zoo, "load_model", lambda name: pytest.fail("the second call should read the cache"))
    pos, neg = zoo.probe_activations("base", "last")
    assert pos.shape[1] == 2 and neg.shape[1] == 3
    assert torch.allclose(torch.cat([pos, neg], 1), want["last"], atol=1e-5)
    with pytest.raises(ValueError, match="unknown reading"):
        zoo.probe_activations("base", "max")
