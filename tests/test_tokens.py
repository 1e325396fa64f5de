"""The differentiable refusal score and attention steering, on the tiny model."""
from __future__ import annotations

import copy
import math

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
    from safetybook.models import has_hooks

    assert not has_hooks(model), "an unsteered model carries no hook (its scores may be shared and cached)"
    with steering(model, torch.ones(2, 2), targets=targets_for(tok, PROMPTS, [[0]] * len(PROMPTS)), strength=-9.0):
        assert has_hooks(model), "a steered model must never be scored from the cache"
    with steering(model, torch.ones(2, 2), bias=torch.zeros(1, 4)):
        assert has_hooks(model), "nor one steered by a hand-set bias"
    assert not has_hooks(model)
    assert refusal_score(model, tok, PROMPTS) == pytest.approx(before, abs=1e-6)
    assert steerable(model, tok) is model.steering, "steerable twice returns the same state"


# --- Token Highlighter -----------------------------------------------------------------------------


def _moved(a: list[float], b: list[float]) -> bool:
    """Whether two lists of scores differ somewhere (in log space: the tiny model is nearly sure)."""
    return max(abs(math.log(x) - math.log(y)) for x, y in zip(a, b)) > 1e-3


def _single_influence(model, tok, prompt: str, target: str) -> torch.Tensor:
    """The affirmation loss's gradient norms for one prompt alone, written out plainly."""
    ids, span = user_span(tok, prompt)
    target_ids = tok(target, add_special_tokens=False).input_ids
    x = model.get_input_embeddings()(torch.tensor(ids.tolist() + target_ids))[None].detach().requires_grad_(True)
    logits = model(inputs_embeds=x).logits[0, len(ids) - 1 : -1]
    torch.nn.functional.cross_entropy(logits, torch.tensor(target_ids)).backward()
    return x.grad[0, span].norm(dim=-1)


def test_affirmation_influence_in_a_padded_batch_equals_each_prompt_alone(tiny_model, tok):
    from safetybook.tokens import AFFIRMATION, affirmation_influence

    model = copy.deepcopy(tiny_model)
    batched = affirmation_influence(model, tok, PROMPTS, batch_size=4)  # mixed lengths: padding in a batch
    for p, got in zip(PROMPTS, batched):
        want = _single_influence(model, tok, p, AFFIRMATION)
        assert got.shape == want.shape == (len(tok(p, add_special_tokens=False).input_ids),)
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-7), "padding must not change a prompt's influence"
    other = affirmation_influence(model, tok, PROMPTS[:1], target="No.")[0]
    assert not torch.allclose(other, batched[0]), "the influence depends on the affirmation"


def test_top_share_takes_the_largest_and_random_share_as_many():
    from safetybook.tokens import random_share, top_share

    influence = [torch.tensor([0.1, 0.9, 0.3, 0.8]), torch.tensor([0.5, 0.2])]
    assert top_share(influence, 0.5) == [[1, 3], [0]]
    assert top_share(influence, 0.01) == [[1], [0]], "at least one token"
    drawn = random_share(influence, 0.5, seed=3)
    assert [len(d) for d in drawn] == [2, 1] and all(set(d) <= set(range(len(s))) for d, s in zip(drawn, influence))
    assert {tuple(random_share(influence, 0.5, seed=s)[0]) for s in range(20)} != {(1, 3)}, "a control draws"
    with pytest.raises(ValueError, match="fraction"):
        top_share(influence, 0.0)


def test_soft_removal_in_a_padded_batch_equals_scaled_embeddings(tiny_model, tok):
    from safetybook.tokens import soft_removal

    model = copy.deepcopy(tiny_model)
    positions = [[0], [1, 2], [0, 1], [2], [0], [1]]
    with soft_removal(model, tok, PROMPTS, positions, scale=0.3):
        batched = refusal_score(model, tok, PROMPTS)
    embed = model.get_input_embeddings()
    for p, pos, b in zip(PROMPTS, positions, batched):
        ids, span = user_span(tok, p)
        with torch.no_grad():
            x = embed(ids).clone()
            x[[span.start + i for i in pos]] *= 0.3
            single = log_refusal(model, tok, x[None]).exp().item()
        assert single == pytest.approx(b, rel=1e-3, abs=1e-6), "shrink the user positions, offset by the padding"
    assert _moved(batched, refusal_score(model, tok, PROMPTS)), "the edit must change scores"
    with soft_removal(model, tok, PROMPTS[:1], positions[:1], scale=0.3):
        untouched = refusal_score(model, tok, PROMPTS[1:])
    assert untouched == pytest.approx(refusal_score(model, tok, PROMPTS[1:]), abs=1e-6), "other prompts are untouched"
    assert not model._forward_pre_hooks and not embed._forward_hooks, "the hooks go when the block ends"


def test_highlighted_shrinks_the_most_influential_tokens(tiny_model, tok):
    from safetybook.tokens import affirmation_influence, highlighted

    model = copy.deepcopy(tiny_model)
    influence = affirmation_influence(model, tok, PROMPTS)
    with highlighted(model, tok, PROMPTS, fraction=0.25, scale=0.0) as positions:
        edited = refusal_score(model, tok, PROMPTS)
    for s, pos in zip(influence, positions):
        assert len(pos) == max(1, -(-len(s) // 4)), "a quarter of the user tokens, rounded up"
        assert set(pos) == set(s.topk(len(pos)).indices.tolist()), "the most influential ones"
    assert _moved(edited, refusal_score(model, tok, PROMPTS))


def test_soft_removal_shares_the_chat_opening_and_scores_as_the_plain_pass(tiny_model, tok):
    """Soft removal never edits the chat opening, so refusal_score and generate may run it once per
    batch; the scores and answers equal those of the plain forward pass, which unmarked copies of the
    same hooks force."""
    from safetybook.models import _opening_limit, generate
    from safetybook.tokens import soft_removal

    model = copy.deepcopy(tiny_model)
    positions = [[0, 1], [1], [0], [2], [0, 1], [1]]
    with soft_removal(model, tok, PROMPTS, positions, scale=0.2):
        assert _opening_limit(model) == user_span(tok, "x")[1].start, "share up to the user's first token"
        shared, shared_text = refusal_score(model, tok, PROMPTS), generate(model, tok, PROMPTS, max_new_tokens=4)
        hooks = [(d, k, h) for m in model.modules() for d in (m._forward_hooks, m._forward_pre_hooks)
                 for k, h in d.items()]
        for d, k, h in hooks:  # the same functions, unmarked: the plain forward pass
            d[k] = lambda *a, h=h, **kw: h(*a, **kw)
        assert _opening_limit(model) == 0
        plain, plain_text = refusal_score(model, tok, PROMPTS), generate(model, tok, PROMPTS, max_new_tokens=4)
        for d, k, h in hooks:
            d[k] = h
    assert plain == pytest.approx(shared, rel=1e-4, abs=1e-6)
    assert plain_text == shared_text
    assert _moved(plain, refusal_score(model, tok, PROMPTS)), "the edit changed nothing"


def test_log_refusal_with_a_shared_opening_equals_the_whole_pass_even_when_steered(model, tok):
    """AtMan's rows share the chat opening: running it once gives the same scores, also when a bias
    suppresses attention to one user token per row."""
    ids, span = user_span(tok, REFUSE[0])
    n = span.stop - span.start
    x = model.get_input_embeddings()(ids)[None].expand(n + 1, -1, -1)
    bias = torch.zeros(n + 1, len(ids))
    bias[torch.arange(1, n + 1), torch.arange(span.start, span.stop)] = -4.0
    with torch.no_grad():
        whole = log_refusal(model, tok, x)
        shared = log_refusal(model, tok, x, opening=span.start)
        with steering(model, torch.ones(2, 2), bias):
            steered_whole = log_refusal(model, tok, x)
            steered_shared = log_refusal(model, tok, x, opening=span.start)
    assert torch.allclose(whole, shared, atol=1e-4)
    assert torch.allclose(steered_whole, steered_shared, atol=1e-4)
    assert (steered_whole[1:] - whole[1:]).abs().max() > 1e-4, "the bias must change the rows it suppresses in"
    assert model.steering.gate is None, "the gate is back to what the block left"
