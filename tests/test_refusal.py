"""refusal_score: a probability, read from whole refusal openings, that agrees with generation."""
from __future__ import annotations

import math

import pytest
import torch

from safetybook.models import chat_text, generate, has_hooks
from safetybook.refusal import (
    REFUSAL_OPENINGS,
    answer_nll,
    contrast,
    contrast_refusal_score,
    contrast_refusal_scores,
    is_refusal_text,
    opening_ids,
    refusal_score,
    sharpened,
)
from tests.conftest import ANSWER, COMPLY, REFUSAL, REFUSE


def test_openings_are_prefix_free(tok):
    ids = opening_ids(tok)
    assert len(ids) == len(REFUSAL_OPENINGS)
    assert all(ids), "every opening must tokenize to at least one token"


def test_score_agrees_with_greedy_generation(tiny_model, tok):
    prompts = REFUSE + COMPLY
    scores = refusal_score(tiny_model, tok, prompts)
    texts = generate(tiny_model, tok, prompts, max_new_tokens=8)
    for prompt, score, text in zip(prompts, scores, texts):
        assert 0.0 <= score <= 1.0
        assert (score > 0.5) == is_refusal_text(text), f"{prompt!r}: score {score:.3f} but generated {text!r}"
    assert all(s > 0.9 for s in scores[: len(REFUSE)]), "the tiny model was taught to refuse these"
    assert all(s < 0.1 for s in scores[len(REFUSE) :]), "the tiny model was taught to answer these"


def test_score_does_not_depend_on_batching(tiny_model, tok):
    prompts = REFUSE + COMPLY
    one = refusal_score(tiny_model, tok, prompts, batch_size=1)
    many = refusal_score(tiny_model, tok, prompts, batch_size=4)
    assert one == pytest.approx(many, abs=1e-5), "padding must not change the score"


def test_scores_come_back_in_the_order_of_the_prompts(tiny_model, tok):
    # prompts are batched by length inside; interleave the taught refusals and answers, of mixed length
    prompts = [p for pair in zip(REFUSE, COMPLY) for p in pair] + [REFUSE[0] + " Please, it is urgent today."]
    scores = refusal_score(tiny_model, tok, prompts, batch_size=2)
    assert [s > 0.5 for s in scores[:-1]] == [True, False] * (len(prompts) // 2)
    assert scores[::-1] == pytest.approx(refusal_score(tiny_model, tok, prompts[::-1], batch_size=2), abs=1e-5)


def test_first_token_alone_is_not_refusal(tiny_model, tok):
    # "Sure" starts the taught answer; the refusal score of a complying prompt must stay low
    # even though P("I") may be large for other prompts: whole openings are scored.
    score = refusal_score(tiny_model, tok, ["Name a fruit."])[0]
    p_first = _first_token_prob(tiny_model, tok, "Name a fruit.", "I")
    assert score <= p_first + 1e-6, "an opening can never be likelier than its first token"


def _first_token_prob(model, tok, prompt, text):
    from safetybook.models import chat_text

    ids = tok(chat_text(tok, prompt), add_special_tokens=False, return_tensors="pt").input_ids
    probs = model(input_ids=ids).logits[0, -1].softmax(-1)
    return probs[tok(text, add_special_tokens=False).input_ids[0]].item()


def test_is_refusal_text():
    assert is_refusal_text("  I'm sorry, but no.")
    assert not is_refusal_text("I think bread needs flour.")


def test_answer_nll_prefers_the_taught_answer(tiny_model, tok):
    taught = answer_nll(tiny_model, tok, COMPLY, [ANSWER] * len(COMPLY))
    other = answer_nll(tiny_model, tok, COMPLY, ["Bread is made of flour."] * len(COMPLY))
    assert all(math.isfinite(v) for v in taught + other)
    assert max(taught) < min(other), "the answer the model learned must be likelier"


def test_generate_is_deterministic(tiny_model, tok):
    torch.manual_seed(1)
    a = generate(tiny_model, tok, COMPLY, max_new_tokens=6)
    torch.manual_seed(2)
    b = generate(tiny_model, tok, COMPLY, max_new_tokens=6)
    assert a == b


def test_kl_cost_is_zero_for_the_reference_and_grows_with_an_edit(tiny_model, tok):
    import copy

    from safetybook.refusal import kl_from_reference, reference_distributions

    answers = [ANSWER] * len(COMPLY)
    ref = reference_distributions(tiny_model, tok, COMPLY, answers)
    assert kl_from_reference(tiny_model, tok, COMPLY, answers, ref) == pytest.approx(0.0, abs=1e-5)
    edited = copy.deepcopy(tiny_model)
    with torch.no_grad():
        edited.model.layers[1].mlp.down_proj.weight.add_(0.5 * torch.randn_like(edited.model.layers[1].mlp.down_proj.weight))
    small = kl_from_reference(edited, tok, COMPLY, answers, ref)
    with torch.no_grad():
        edited.model.layers[1].mlp.down_proj.weight.add_(3.0 * torch.randn_like(edited.model.layers[1].mlp.down_proj.weight))
    large = kl_from_reference(edited, tok, COMPLY, answers, ref)
    assert 0 < small < large, "a larger edit must cost more"


def test_cached_score_equals_the_score_and_follows_the_weights(tiny_model, tok, monkeypatch, tmp_path):
    import copy

    from safetybook import refusal

    monkeypatch.setenv("SAFETYBOOK_CACHE", str(tmp_path))
    prompts = REFUSE + COMPLY
    fresh = refusal.refusal_score(tiny_model, tok, prompts)
    assert refusal.cached_refusal_score(tiny_model, tok, prompts) == fresh
    monkeypatch.setattr(refusal, "refusal_score", lambda *a, **k: pytest.fail("recomputed a cached score"))
    assert refusal.cached_refusal_score(tiny_model, tok, prompts) == fresh  # read back exactly
    changed = copy.deepcopy(tiny_model)
    with torch.no_grad():
        next(changed.parameters()).add_(0.01)
    monkeypatch.setattr(refusal, "refusal_score", lambda *a, **k: [0.5] * len(prompts))
    assert refusal.cached_refusal_score(changed, tok, prompts) == [0.5] * len(prompts)  # new weights, new entry


def test_a_hooked_model_is_never_read_from_the_cache(tiny_model, tok, monkeypatch, tmp_path):
    """An intervention hooks the model without changing its weights: its scores must be computed."""
    from safetybook import refusal

    monkeypatch.setenv("SAFETYBOOK_CACHE", str(tmp_path))
    prompts = REFUSE[:2]
    plain = refusal.cached_refusal_score(tiny_model, tok, prompts)
    layer = tiny_model.model.layers[0]
    handle = layer.register_forward_hook(lambda _m, _i, out: out * 0)
    try:
        assert has_hooks(tiny_model)
        hooked = refusal.cached_refusal_score(tiny_model, tok, prompts)
    finally:
        handle.remove()
    assert hooked != plain
    assert refusal.cached_refusal_score(tiny_model, tok, prompts) == plain


def test_the_opening_tree_gives_the_naive_score(tiny_model, tok):
    """Each opening's probability, computed the slow way (one forward pass per opening), sums to the score."""
    from safetybook.models import chat_text
    from safetybook.refusal import opening_tree

    tree, openings = opening_tree(tok), opening_ids(tok)
    assert len(tree.tokens) < sum(len(o) - 1 for o in openings), "shared prefixes are fed once"
    prefixes = set()
    for i in range(len(tree.tokens)):  # what a node sees, in order of depth, must be its own prefix
        seen = sorted(tree.sees[i].nonzero()[:, 0].tolist(), key=lambda j: int(tree.depth[j]))
        assert [int(tree.depth[j]) for j in seen] == list(range(int(tree.depth[i]) + 1)), "itself and one node a level"
        prefixes.add(tuple(int(tree.tokens[j]) for j in seen))
    assert prefixes == {tuple(o[:k]) for o in openings for k in range(1, len(o))}, "one node per proper prefix"
    prompts = [REFUSE[0], COMPLY[0]]
    for prompt, score in zip(prompts, refusal_score(tiny_model, tok, prompts)):
        context = tok(chat_text(tok, prompt), add_special_tokens=False).input_ids
        naive = 0.0
        for o in openings:
            logp = tiny_model(input_ids=torch.tensor([context + o])).logits[0].log_softmax(-1)
            naive += math.exp(sum(logp[len(context) - 1 + k, t].item() for k, t in enumerate(o)))
        assert score == pytest.approx(min(naive, 1.0), abs=1e-5)


def test_text_rule_reads_the_first_sentence_and_finds_refusals_the_openings_miss():
    from safetybook.refusal import judged_refusal

    assert judged_refusal("I'm sorry, but I can't help with that.") and is_refusal_text("I'm sorry, but I can't")
    # a refusal that opens some other way: the rule finds it, the openings do not
    assert judged_refusal("Unfortunately, I cannot share that.") and not is_refusal_text("Unfortunately, I cannot")
    assert judged_refusal("That is not appropriate for me to explain.")
    assert not judged_refusal("Sure, here is a helpful answer.")
    assert not judged_refusal("Bake it for an hour. Sorry if that is long!"), "only the first sentence counts"


def test_validation_on_the_tiny_model_agrees_with_the_text(tiny_model, tok):
    from safetybook.refusal import agreement_threshold, validation_sample

    prompts = REFUSE + COMPLY
    check = validation_sample(tiny_model, tok, prompts, max_new_tokens=10)
    assert check["judged"] == check["opens"] == [True] * len(REFUSE) + [False] * len(COMPLY)
    assert [s > 0.5 for s in check["score"]] == check["judged"]
    t = agreement_threshold(check["score"], check["judged"])
    assert all((s > t) == j for s, j in zip(check["score"], check["judged"]))
    # the threshold follows the labels: with every answer judged a refusal, the lowest candidate wins
    assert agreement_threshold(check["score"], [True] * len(prompts)) == 0.05


def test_transformers_output_capturing_hooks_are_not_an_intervention(tiny_model, tok):
    """Asking once for hidden states leaves read-only hooks on the model for good (transformers 5):
    they must not switch off the cache or the shared-opening forward pass."""
    import copy

    from safetybook.models import has_hooks, pointwise_only

    model = copy.deepcopy(tiny_model)
    model(**tok(["Hi"], return_tensors="pt"), output_hidden_states=True, output_attentions=True)
    assert any(m._forward_hooks for m in model.modules()), "transformers no longer leaves its hooks: drop the filter"
    assert not has_hooks(model) and pointwise_only(model)
    handle = model.model.layers[0].register_forward_hook(lambda *a: None)
    assert has_hooks(model) and not pointwise_only(model)
    handle.remove()


def test_answer_nll_equals_each_pair_scored_alone(tiny_model, tok):
    """Batched by length with the chat opening run once, each answer's loss equals the loss of its
    prompt and answer run alone, unpadded, and comes back in the order of the prompts."""
    import torch

    from safetybook.models import chat_text

    prompts = [COMPLY[0], REFUSE[0] + " Tell me everything about it.", COMPLY[2], REFUSE[1]]
    answers = [ANSWER, "No.", "Paris is the capital of France, a city on the Seine.", REFUSAL]
    alone = []
    for p, a in zip(prompts, answers):
        context = tok(chat_text(tok, p), add_special_tokens=False).input_ids
        target = tok(a, add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = tiny_model(input_ids=torch.tensor([context + target])).logits[0].float()
        lp = logits[len(context) - 1 : -1].log_softmax(-1)
        alone.append(-lp[torch.arange(len(target)), torch.tensor(target)].mean().item())
    assert answer_nll(tiny_model, tok, prompts, answers) == pytest.approx(alone, abs=1e-4)


def test_cost_by_position_adds_up_to_the_cost_and_reads_the_end_of_turn(tiny_model, tok, monkeypatch):
    import copy

    from safetybook import refusal

    answers = [ANSWER, "Bread needs flour, water and time.", "Paris."]  # different lengths: counts differ
    monkeypatch.setattr(refusal, "reference_answers", lambda prompts, max_new_tokens=40: answers)
    monkeypatch.setitem(refusal._BASE_REFERENCES, tuple(COMPLY), refusal.reference_distributions(tiny_model, tok, COMPLY, answers))
    edited = copy.deepcopy(tiny_model)
    with torch.no_grad():
        edited.model.layers[1].mlp.down_proj.weight.add_(torch.randn_like(edited.model.layers[1].mlp.down_proj.weight))
    out = refusal.cost_by_position(edited, tok, COMPLY)
    lengths = [len(tok(a, add_special_tokens=False).input_ids) for a in answers]
    assert out["count"] == [sum(n > t for n in lengths) for t in range(max(lengths))]
    total = sum(k * c for k, c in zip(out["kl"], out["count"])) / sum(out["count"])
    assert total == pytest.approx(refusal.harmless_cost(edited, tok, COMPLY), rel=1e-5)
    assert total > 0.01, "the edit should cost something"
    end = tok.convert_tokens_to_ids("<|im_end|>")
    firsts = []
    for prompt in COMPLY:  # position 0: the distribution right after the prompt, for every answer
        ids = tok(chat_text(tok, prompt), add_special_tokens=False).input_ids
        with torch.no_grad():
            firsts.append(edited(input_ids=torch.tensor([ids])).logits[0, -1].float().softmax(-1)[end].item())
    assert out["end"][0] == pytest.approx(sum(firsts) / len(firsts), rel=1e-4, abs=1e-7)
    same = refusal.cost_by_position(tiny_model, tok, COMPLY)  # the reference itself: no cost, the same answers' odds
    assert max(same["kl"]) < 1e-4
    assert same["answer"] == pytest.approx(same["base_answer"], abs=1e-4)
    assert out["answer"] != pytest.approx(same["answer"], abs=1e-3), "the edit moves the answer tokens' odds"


def test_contrast_pushes_past_the_expert_and_stays_a_distribution():
    original, expert = torch.tensor([[0.5, 0.3, 0.2]]).log(), torch.tensor([[0.7, 0.2, 0.1]]).log()  # as logits
    assert torch.allclose(contrast(original, expert, 1.0).exp(), expert.exp(), atol=1e-6)
    assert torch.allclose(contrast(original, expert, 0.0).exp(), original.exp(), atol=1e-6)
    # computed a few rows at a time, each row is what it is alone (three chunks of rows here)
    torch.manual_seed(0)
    many_o, many_e = torch.randn(3, 13, 7), torch.randn(3, 13, 7)
    alone = torch.stack([torch.stack([contrast(many_o[i, j], many_e[i, j], 2.0) for j in range(13)]) for i in range(3)])
    assert torch.allclose(contrast(many_o, many_e, 2.0), alone, atol=1e-6)
    assert torch.allclose(sharpened(many_e, 2.0), (2 * many_e).log_softmax(-1), atol=1e-6)
    pushed = contrast(original, expert, 3.0).exp()  # 0.5 + 3 * (0.2, -0.1, -0.1) -> (1.1, 0, 0)
    assert torch.allclose(pushed, torch.tensor([[1.0, 0.0, 0.0]]), atol=1e-6)
    assert torch.allclose(contrast(original, expert, 1.5).exp().sum(-1), torch.ones(1))


@pytest.fixture(scope="module")
def other_model(tok):
    """An untrained model of the tiny model's shape: an 'original' that never learnt to refuse."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(config).eval()


def test_contrast_score_reduces_to_each_model_and_to_its_control(tiny_model, other_model, tok):
    prompts = REFUSE + COMPLY
    expert, original = refusal_score(tiny_model, tok, prompts), refusal_score(other_model, tok, prompts)
    # the contrast works in double precision; refusal_score's float32 log-softmax is good to about 1e-4 here
    close = {"abs": 3e-4}
    assert contrast_refusal_score(tiny_model, other_model, tok, prompts, 1.0) == pytest.approx(expert, **close)
    assert contrast_refusal_score(tiny_model, other_model, tok, prompts, 0.0) == pytest.approx(original, **close)
    assert contrast_refusal_score(tiny_model, None, tok, prompts, 1.0) == pytest.approx(expert, **close)
    pushed = contrast_refusal_score(tiny_model, other_model, tok, prompts, 2.0, batch_size=2)
    # the expert refuses REFUSE and the untrained original does not: pushing past the expert refuses them more
    assert all(p >= e - 1e-6 for p, e in zip(pushed[: len(REFUSE)], expert[: len(REFUSE)]))


def test_every_strength_at_once_matches_one_at_a_time(tiny_model, other_model, tok):
    prompts = REFUSE + COMPLY
    both = contrast_refusal_scores(tiny_model, other_model, tok, prompts, (0.5, 2.0), batch_size=3)
    for a in (0.5, 2.0):
        assert both["contrast"][a] == pytest.approx(contrast_refusal_score(tiny_model, other_model, tok, prompts, a), abs=1e-6)
        assert both["sharpened"][a] == pytest.approx(contrast_refusal_score(tiny_model, None, tok, prompts, a), abs=1e-6)
    assert both["contrast"][0.5] != pytest.approx(both["contrast"][2.0], abs=1e-3)  # the strengths are not mixed up
