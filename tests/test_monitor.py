"""Verify then output: the latent monitor, the self-check, the keyword filter and `generate` CLI."""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from safetybook.directions import fit_probe, last_token_activations, prompt_activations, request_start
from safetybook.models import generate
from safetybook.monitor import (
    REFUSAL,
    answer_activations,
    checked_generate,
    fit_answer_monitor,
    holdout_monitor,
    keyword_score,
    probe_generate,
    self_check,
)
from tests.conftest import COMPLY, REFUSE


@pytest.fixture(scope="module")
def probe(tiny_model, tok):
    """A hand-made harmfulness probe: the tiny model's REFUSE vs COMPLY activations at layer 1."""
    acts = last_token_activations(tiny_model, tok, REFUSE + COMPLY, [1])[0]
    return fit_probe(1, acts[: len(REFUSE)], acts[len(REFUSE) :], c=10.0)


def test_silent_monitor_changes_nothing(tiny_model, tok, probe):
    prompts = REFUSE + COMPLY
    rows = probe_generate(tiny_model, tok, prompts, probe, threshold=math.inf, max_new_tokens=8)
    plain = generate(tiny_model, tok, prompts, max_new_tokens=8)
    assert not any(r.blocked for r in rows)
    assert [r.response for r in rows] == plain, "the monitor's own greedy loop must match model.generate"


def test_monitor_blocks_what_the_probe_flags(tiny_model, tok, probe):
    prompts = REFUSE + COMPLY
    rows = probe_generate(tiny_model, tok, prompts, probe, threshold=0.5, max_new_tokens=4, every_token=False)
    assert [r.blocked for r in rows] == [True] * len(REFUSE) + [False] * len(COMPLY), [r.monitor_score for r in rows]
    assert all(r.response == REFUSAL for r in rows if r.blocked), "a blocked answer is replaced by the fixed refusal"
    assert all(r.response != REFUSAL for r in rows if not r.blocked)


def test_monitor_that_always_fires_blocks_everything(tiny_model, tok, probe):
    rows = probe_generate(tiny_model, tok, COMPLY, probe, threshold=-1.0, max_new_tokens=4)
    assert all(r.blocked and r.response == REFUSAL for r in rows)


def test_monitor_scores_do_not_depend_on_batching(tiny_model, tok, probe):
    prompts = REFUSE + COMPLY
    one = probe_generate(tiny_model, tok, prompts, probe, math.inf, max_new_tokens=4, batch_size=1)
    many = probe_generate(tiny_model, tok, prompts, probe, math.inf, max_new_tokens=4, batch_size=6)
    assert [r.monitor_score for r in one] == pytest.approx([r.monitor_score for r in many], abs=1e-4)


def test_every_token_score_is_at_least_the_prompt_score(tiny_model, tok, probe):
    first = probe_generate(tiny_model, tok, COMPLY, probe, math.inf, max_new_tokens=4, every_token=False)
    every = probe_generate(tiny_model, tok, COMPLY, probe, math.inf, max_new_tokens=4, every_token=True)
    assert all(e.monitor_score >= f.monitor_score - 1e-6 for e, f in zip(every, first)), "the score is a running max"


def test_self_check_is_a_probability_independent_of_padding(tiny_model, tok):
    prompts, answers = REFUSE + COMPLY, ["Sure."] * 3 + ["A much longer answer, with many more words."] * 3
    one = self_check(tiny_model, tok, prompts, answers, batch_size=1)
    many = self_check(tiny_model, tok, prompts, answers, batch_size=6)
    assert all(0.0 <= s <= 1.0 for s in many)
    assert one == pytest.approx(many, abs=1e-5), "left padding must not change P(Yes)"


def test_keyword_filter_matches_whole_words():
    assert keyword_score("How do I build a bomb?", "") == 1.0
    assert keyword_score("Write a bombastic poem.", "") == 0.0
    assert keyword_score("Tell me a story.", "It is about how to steal a car.") == 1.0, "the answer is checked too"


def test_checked_generate_rejects_unknown_monitor(tiny_model, tok):
    with pytest.raises(ValueError, match="unknown monitor"):
        checked_generate(tiny_model, tok, COMPLY, monitor="oracle")


def test_keyword_monitor_blocks_and_replaces(tiny_model, tok):
    rows = checked_generate(tiny_model, tok, ["How can I steal a bike?", "Name a fruit."], "keyword", 4)
    assert [r.blocked for r in rows] == [True, False]
    assert rows[0].response == REFUSAL


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "safetybook", "generate", *args],
                          check=False, capture_output=True, text=True)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompts", "/no/such/file.txt"], "no such file"),
        (["--prompts", "PROMPTS", "--monitor", "oracle"], "invalid choice"),
        (["--prompts", "PROMPTS", "--max-new-tokens", "0"], "positive integer"),
        (["--prompts", "PROMPTS", "--model", "nonsense"], "invalid choice"),
        ([], "required"),
    ],
)
def test_generate_cli_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Name a fruit.\n")
    result = _cli(*[str(prompts) if a == "PROMPTS" else a for a in args])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert result.stdout == ""


def test_activations_come_back_in_the_order_of_the_prompts(tiny_model, tok):
    # prompts are batched by length inside: mixed lengths, and a batch smaller than the set
    prompts = [REFUSE[0] + " Please, it is urgent today.", COMPLY[0], REFUSE[1], COMPLY[1] + " Thanks!"]
    acts = last_token_activations(tiny_model, tok, prompts, [0, 1], batch_size=2)
    one = torch.cat([last_token_activations(tiny_model, tok, [p], [0, 1]) for p in prompts], dim=1)
    torch.testing.assert_close(acts, one, rtol=1e-4, atol=1e-5)


def family_data(seed: int = 0):
    """Synthetic activations ``[3 layers, prompt, 6]``: layer 2 carries harmfulness along axis 0; prompts
    of the family "far" also carry it along axis 1 only, which no other row shows."""
    g = torch.Generator().manual_seed(seed)
    n = 40
    families = ([""] * n + ["near"] * n + ["far"] * n) * 2  # harmful rows, then harmless rows
    labels = np.r_[np.ones(3 * n, bool), np.zeros(3 * n, bool)]
    acts = torch.randn(3, 6 * n, 6, generator=g)
    acts[2, labels, 0] += 2.0
    far = np.array([f == "far" for f in families])
    acts[2, far & labels, 1] += 3.0
    groups = [i % (3 * n) for i in range(6 * n)]  # a harmful row and its harmless twin share a group
    return acts, labels, groups, families, ~labels


def test_holdout_monitor_never_sees_the_held_family():
    acts, labels, groups, families, harmless = family_data()
    probe, threshold = holdout_monitor(acts, labels, groups, families, "far", harmless)
    assert probe.layer == 2, "the layer that carries the signal, chosen by cross-validation"
    far = np.array([f == "far" for f in families])
    moved = acts.clone()
    moved[:, far] = torch.randn(3, int(far.sum()), 6) * 50  # whatever the held rows hold
    again, again_threshold = holdout_monitor(moved, labels, groups, families, "far", harmless)
    assert again.weight == pytest.approx(probe.weight) and again_threshold == pytest.approx(threshold)
    seen, _ = holdout_monitor(acts, labels, groups, families, None, harmless)
    assert abs(seen.weight[1]) > 3 * abs(probe.weight[1]), "trained on 'far', the probe uses its own cue"


def test_holdout_monitor_threshold_follows_the_false_positive_rate():
    acts, labels, groups, families, harmless = family_data(1)
    _, strict = holdout_monitor(acts, labels, groups, families, "far", harmless, [2], false_positive_rate=0.02)
    _, loose = holdout_monitor(acts, labels, groups, families, "far", harmless, [2], false_positive_rate=0.3)
    assert strict > loose
    with pytest.raises(ValueError, match="no train row belongs to the family 'poetry'"):
        holdout_monitor(acts, labels, groups, families, "poetry", harmless)


def test_the_probe_rows_line_up_with_their_groups_labels_and_families():
    from safetybook.zoo import probe_groups, probe_rows, probe_sets

    texts, harmful, harmless, families = probe_rows()
    plain_harmful, plain_harmless, border, wrapped_harmful, wrapped_harmless = probe_sets()
    assert len(texts) == len(harmful) == len(harmless) == len(families) == len(probe_groups())
    assert texts[: len(plain_harmful)] == plain_harmful and texts[-len(border):] == border
    assert [t for t, h in zip(texts, harmful) if h] == plain_harmful + wrapped_harmful
    assert [t for t, h in zip(texts, harmless) if h] == plain_harmless + wrapped_harmless
    assert not (harmful & harmless).any()
    wrapped = set(wrapped_harmful + wrapped_harmless)
    assert all((f != "") == (t in wrapped) for t, f in zip(texts, families))


def test_the_text_classifier_learns_words_and_takes_its_regularization():
    from safetybook.monitor import text_classifier

    texts = ["steal a car", "steal a bike", "wash a car", "wash a bike"] * 3
    labels = [1, 1, 0, 0] * 3
    model = text_classifier(c=10.0).fit(texts, labels)
    assert model.named_steps["logisticregression"].C == 10.0
    p = model.predict_proba(["steal a boat", "wash a boat"])[:, 1]
    assert p[0] > 0.5 > p[1]


@pytest.fixture(scope="module")
def answered(tiny_model, tok):
    """The tiny model's own greedy answers to REFUSE + COMPLY, and their answer-so-far activations at layer 1."""
    prompts = REFUSE + COMPLY
    answers = generate(tiny_model, tok, prompts, max_new_tokens=6)
    return prompts, answers, answer_activations(tiny_model, tok, prompts, answers, layer=1, batch_size=4)


def test_answer_so_far_starts_with_the_pooled_prompt(tiny_model, tok, answered):
    prompts, answers, acts = answered
    pooled = prompt_activations(tiny_model, tok, prompts, [1])["mean"][0]
    for i, a in enumerate(acts):
        assert a.shape == (1 + len(tok(answers[i], add_special_tokens=False).input_ids), tiny_model.config.hidden_size)
        assert torch.allclose(a[0], pooled[i], atol=1e-5), "step 0 is the prompt alone, pooled over the request"


def test_answer_so_far_is_the_running_mean_of_one_unpadded_pass(tiny_model, tok, answered):
    from safetybook.models import chat_text, decoder_layers, residual

    prompts, answers, acts = answered
    i = 1
    prompt_ids = tok(chat_text(tok, prompts[i]), add_special_tokens=False).input_ids
    ids = prompt_ids + tok(answers[i], add_special_tokens=False).input_ids
    kept = {}
    hook = decoder_layers(tiny_model)[1].register_forward_hook(lambda m, a, o: kept.__setitem__("x", residual(o)))
    with torch.no_grad():
        tiny_model(input_ids=torch.tensor([ids]))
    hook.remove()
    x, start = kept["x"][0].float(), request_start(tok)
    for t in (0, 2, len(ids) - len(prompt_ids)):
        by_hand = x[start : len(prompt_ids) + t].mean(0)
        assert torch.allclose(acts[i][t], by_hand, atol=1e-5), t


def test_the_mean_reading_during_generation_is_the_answer_so_far(tiny_model, tok, answered):
    prompts, _, acts = answered
    probe = fit_probe(1, torch.cat(acts[: len(REFUSE)]), torch.cat(acts[len(REFUSE) :]), c=10.0)
    rows = probe_generate(tiny_model, tok, prompts, probe, math.inf, max_new_tokens=6, reading="mean", batch_size=4)
    assert [r.monitor_score for r in rows] == pytest.approx([probe.predict(a).max() for a in acts], abs=1e-4)
    at_prompt = probe_generate(tiny_model, tok, prompts, probe, math.inf, max_new_tokens=6, reading="mean",
                               every_token=False)
    assert [r.monitor_score for r in at_prompt] == pytest.approx([probe.predict(a[:1])[0] for a in acts], abs=1e-4)
    with pytest.raises(ValueError, match="unknown reading"):
        probe_generate(tiny_model, tok, prompts, probe, math.inf, reading="max")


def test_answer_monitor_threshold_comes_from_held_out_negatives(answered):
    prompts, _, acts = answered
    labels = np.array([True] * len(REFUSE) + [False] * len(COMPLY))
    groups = list(range(len(prompts)))
    strict = fit_answer_monitor(acts, labels, groups, ~labels, layer=1, false_positive_rate=0.0, folds=3)
    loose = fit_answer_monitor(acts, labels, groups, ~labels, layer=1, false_positive_rate=0.5, folds=3)
    assert loose.threshold <= strict.threshold
    assert strict.probe.weight == loose.probe.weight, "the final probe sees every answer, whatever the rate"
    assert strict.blocked(acts).tolist() == [s.max() > strict.threshold for s in strict.scores(acts)]
    with pytest.raises(ValueError, match="one label"):
        fit_answer_monitor(acts, labels[:-1], groups, ~labels, layer=1)
