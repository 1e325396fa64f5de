"""The differentiable refusal score and attention steering, on the tiny model."""
from __future__ import annotations

import copy

import pytest
import torch

from safetybook.refusal import refusal_score
from safetybook.tokens import log_refusal, steerable, steering, targets_for, user_span
from tests.conftest import COMPLY, REFUSE

PROMPTS = REFUSE + COMPLY


@pytest.fixture()
def model(tiny_model, tok):
    """A private copy: switching the attention implementation mutates the model."""
    model = copy.deepcopy(tiny_model)
    steerable(model, tok)
    return model


def test_user_span_holds_the_prompt(tok):
    for p in PROMPTS:
        ids, span = user_span(tok, p)
        assert tok.decode(ids[span]) == p, "the span must cover exactly the user's tokens"
        assert span.start > 0 and span.stop < len(ids), "the chat template adds tokens on both sides"


def test_log_refusal_matches_refusal_score(model, tok):
    expected = refusal_score(model, tok, PROMPTS)
    embed = model.get_input_embeddings()
    for p, e in zip(PROMPTS, expected):
        ids, _ = user_span(tok, p)
        with torch.no_grad():
            got = log_refusal(model, tok, embed(ids)[None]).exp().item()
        assert got == pytest.approx(e, rel=1e-3, abs=1e-6), "sum all openings' probabilities, through the cache"


def test_log_refusal_has_gradients_at_every_token(model, tok):
    ids, _ = user_span(tok, REFUSE[0])
    x = model.get_input_embeddings()(ids)[None].detach().requires_grad_(True)
    log_refusal(model, tok, x).sum().backward()
    assert (x.grad[0].norm(dim=-1) > 0).all(), "every input position should receive a gradient"


def test_unsteered_attention_is_plain_attention(tiny_model, model, tok):
    assert refusal_score(model, tok, PROMPTS) == pytest.approx(refusal_score(tiny_model, tok, PROMPTS), abs=1e-5)
    with steering(model, torch.zeros(2, 2), targets=targets_for(tok, PROMPTS, [[0, 1]] * len(PROMPTS)),
                  strength=-5.0):
        gated_off = refusal_score(model, tok, PROMPTS)
    assert gated_off == pytest.approx(refusal_score(tiny_model, tok, PROMPTS), abs=1e-5), "a zero gate is no edit"


def test_targets_put_the_bias_on_the_right_tokens_under_padding(model, tok):
    """Steering by targets inside a left-padded batch equals steering one prompt by an explicit bias."""
    gate = torch.ones(2, 2)
    positions = [[0, 2] for _ in PROMPTS]
    with steering(model, gate, targets=targets_for(tok, PROMPTS, positions), strength=-3.0):
        batched = refusal_score(model, tok, PROMPTS)
    embed = model.get_input_embeddings()
    for p, pos, b in zip(PROMPTS, positions, batched):
        ids, span = user_span(tok, p)
        bias = torch.zeros(1, len(ids))
        bias[0, [span.start + i for i in pos]] = -3.0
        with torch.no_grad(), steering(model, gate, bias=bias):
            single = log_refusal(model, tok, embed(ids)[None]).exp().item()
        assert single == pytest.approx(b, rel=1e-3, abs=1e-6), "offset the user positions by the left padding"
    assert batched != pytest.approx(refusal_score(model, tok, PROMPTS), abs=1e-4), "steering must change scores"


def test_steering_is_switched_off_after_the_block(model, tok):
    before = refusal_score(model, tok, PROMPTS)
    with steering(model, torch.ones(2, 2), targets=targets_for(tok, PROMPTS, [[0]] * len(PROMPTS)), strength=-9.0):
        pass
    assert refusal_score(model, tok, PROMPTS) == pytest.approx(before, abs=1e-6)
    assert steerable(model, tok) is model.steering, "steerable twice returns the same state"
