"""Self-checks for the exercises: the student edition calls one after each stub.

A check recomputes the right answer from what the chapter has already computed (or, where that is
cheap, with the model itself), compares it with the student's, and prints one line when they
agree. When they do not, it raises ``CheckFailed`` with a message that names the likely mistake
("read the last position, not the first"): it tries the usual wrong turns only after a mismatch,
so a right answer costs one recomputation at most. The book's own solutions end with the same
call, so every build checks the checks against the solutions.

Each check's name is its exercise's subject; ``EXERCISES`` maps every exercise label of the book
to its check.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .models import chat_text, decoder_layers, residual
from .refusal import is_refusal_text, refusal_score


class CheckFailed(AssertionError):
    """The answer is not right yet; the message says what to look at."""


def _fail(message: str) -> None:
    raise CheckFailed(message)


def _ok(message: str) -> None:
    print(f"✓ {message}")


def _filled(answer, what: str) -> None:
    if answer is ... or answer is None:
        _fail(f"fill in the stub first: `answer` should be {what}, not `...`")


def _numbers(answer, n: int | None, what: str) -> np.ndarray:
    """``answer`` as a 1-D float array (of length ``n``)."""
    _filled(answer, what)
    try:
        values = np.asarray(answer, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        _fail(f"`answer` should be {what} (numbers), not {type(answer).__name__}")
    if n is not None and len(values) != n:
        _fail(f"`answer` has {len(values)} values; it should have {n}: {what}")
    if not np.isfinite(values).all():
        _fail("`answer` holds NaN or infinite values")
    return values


def _close(a, b, atol: float) -> bool:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return a.shape == b.shape and bool(np.allclose(a, b, atol=atol, rtol=0))


def _share(answer, what: str) -> float:
    value = float(_numbers(answer, 1, what)[0])
    if 1 < value <= 100:
        _fail(f"{value:g} looks like a percentage: give a share between 0 and 1")
    if not 0 <= value <= 1:
        _fail(f"{value:g} is not a probability or a share: it should lie between 0 and 1")
    return value


def _rows(answer, key: str, value: str) -> dict:
    """``{row[key]: row[value]}`` from a DataFrame, a list of dicts or a dict."""
    if hasattr(answer, "to_dict") and hasattr(answer, "columns"):
        if key not in answer.columns and answer.index.name == key:
            answer = answer.reset_index()
        if key not in answer.columns or value not in answer.columns:
            _fail(f"the table needs the columns {key!r} and {value!r}; it has {list(answer.columns)}")
        return dict(zip(answer[key].tolist(), answer[value].tolist()))
    if isinstance(answer, Mapping):
        return dict(answer)
    if isinstance(answer, Sequence) and all(isinstance(r, Mapping) for r in answer):
        return {r[key]: r[value] for r in answer}
    _fail(f"`answer` should be a table (DataFrame) with columns {key!r} and {value!r}")


# 00 · Start here ---------------------------------------------------------------------------------


def own_prompts(answer, model: nn.Module, tok, system: str) -> None:
    """``{prompt: (score without the system prompt, score with it)}`` for three or more prompts."""
    _filled(answer, "a dict from prompt to (score without, score with the system prompt)")
    if not isinstance(answer, Mapping) or len(answer) < 3:
        _fail("`answer` should be a dict with (at least) three prompts as keys")
    pairs = np.array([_numbers(v, 2, "a pair (without, with the system prompt)") for v in answer.values()])
    if ((pairs < 0) | (pairs > 1)).any():
        _fail("a score lies outside [0, 1]: use refusal_score, which gives probabilities, not log-probabilities")
    mine = list(answer)
    plain = refusal_score(model, tok, mine)
    forced = refusal_score(model, tok, mine, system=system)
    if _close(pairs, np.c_[plain, forced], 2e-3):
        _ok(f"{len(mine)} prompts scored without and with the system prompt")
        return
    if _close(pairs, np.c_[forced, plain], 2e-3):
        _fail("the pair is swapped: the first score is without the system prompt, the second with it")
    if _close(pairs[:, 1], plain, 2e-3):
        _fail("the second score equals the first: pass system=REFUSE_SYSTEM to refusal_score for it")
    _fail("the scores differ from refusal_score(model, tok, prompts) and refusal_score(..., system=REFUSE_SYSTEM)")


@torch.no_grad()
def _first_token_probability(model, tok, prompts: list[str], token: int, position: int = -1, chat: bool = True):
    texts = [chat_text(tok, p) if chat else p for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    logits = model(**enc).logits if position != -1 else model(**enc, logits_to_keep=1).logits
    return logits[:, position].softmax(-1)[:, token].numpy()


def first_token(answer, model: nn.Module, tok, prompts: list[str]) -> None:
    """P("I" as the first answer token), one value per prompt (left-padded batch, last position)."""
    _filled(answer, "one probability per prompt")
    values = _numbers(answer, len(prompts), "one probability per prompt")
    token = tok("I", add_special_tokens=False).input_ids[0]
    expected = _first_token_probability(model, tok, prompts, token)
    if _close(values, expected, 1e-4):
        _ok(f"P('I' first) for {len(prompts)} prompts, mean {expected.mean():.3f}")
        return
    if ((values < 0) | (values > 1)).any():
        _fail("these are not probabilities: take .softmax(-1) of the logits before reading the token 'I'")
    if tok.padding_side == "left" and _close(values, _first_token_probability(model, tok, prompts, token, 0), 1e-4):
        _fail("read the last position, not the first: the answer's first token is predicted at position -1")
    if _close(values, _first_token_probability(model, tok, prompts, token, chat=False), 1e-4):
        _fail("wrap each prompt in the chat template (chat_text) before the forward pass")
    _fail("the probabilities differ from P('I') at the last position of each chat prompt")


@torch.no_grad()
def _layer_outputs(model: nn.Module, enc: dict) -> list[torch.Tensor]:
    kept: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: kept.append(residual(out).detach()))
             for layer in decoder_layers(model)]
    try:
        model(**enc, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    return kept


def lens_layer(answer, model: nn.Module, tok, prompt: str, system: str | None = None) -> None:
    """(first layer where "I" is the top logit-lens guess at the last position, P("I") there)."""
    _filled(answer, "a pair (layer, probability)")
    if not isinstance(answer, Sequence) or len(answer) != 2:
        _fail("`answer` should be a pair: (the layer, the probability of 'I' at that layer)")
    token = tok("I", add_special_tokens=False).input_ids[0]
    enc = tok([chat_text(tok, prompt, system)], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        lens = torch.stack([model.lm_head(model.model.norm(h[0, -1])) for h in _layer_outputs(model, enc)]).softmax(-1)
    top = (lens.argmax(-1) == token).nonzero().flatten().tolist()
    layer, p = answer
    if not top:
        if layer is None:
            _ok("'I' never becomes the top guess at the last position")
            return
        _fail("'I' never becomes the top guess for this prompt: the layer should be None")
    first = top[0]
    if layer == first and abs(float(p) - float(lens[first, token])) < 0.01:
        _ok(f"'I' first tops the lens at layer {first}, with probability {float(lens[first, token]):.2f}")
        return
    if layer == first + 1:
        _fail("off by one: hidden_states[0] is the embeddings, so layer L's output is hidden_states[L + 1]")
    if layer == first:
        _fail(f"right layer; the probability should be P('I') at layer {first}, after norm, lm_head and softmax")
    if layer in top:
        _fail(f"'I' is on top at layer {layer}, but already earlier: report the first such layer")
    _fail("that is not the first layer where 'I' is the top guess at the last position (of the chat text "
          "with the system prompt)")


# 01 · Training --------------------------------------------------------------------------------


def _overlap(a: np.ndarray, b: np.ndarray, k: int, descending: bool = True) -> float:
    sign = -1 if descending else 1
    return float(np.mean([len(set(np.argsort(sign * a[:, j])[:k]) & set(np.argsort(sign * b[:, j])[:k])) / k
                          for j in range(a.shape[1])]))


def topk_overlap(answer, tracin: np.ndarray, sims: np.ndarray, ks: Sequence[int] = (5, 20, 50)) -> None:
    """A table with columns k, overlap (mean over queries) and random (k / number of examples)."""
    _filled(answer, "a table with one row per k")
    overlap, random = _rows(answer, "k", "overlap"), _rows(answer, "k", "random")
    if sorted(overlap) != sorted(ks):
        _fail(f"one row per k in {list(ks)}; the table has k = {sorted(overlap)}")
    tracin, sims = np.asarray(tracin), np.asarray(sims)
    for k in ks:
        if abs(random[k] - k / len(tracin)) > 0.006:
            _fail(f"random overlap at k={k}: two random top-k sets of {len(tracin)} examples share k / {len(tracin)}")
        if abs(overlap[k] - _overlap(tracin, sims, k)) > 0.006:
            if abs(overlap[k] - _overlap(tracin, sims, k, descending=False)) <= 0.006:
                _fail("rank from the highest score: np.argsort(-scores), not np.argsort(scores)")
            if tracin.shape[1] > 1 and abs(overlap[k] - _overlap(tracin[:, :1], sims[:, :1], k)) <= 0.006:
                _fail("average the overlap over every query, not the first one only")
            _fail(f"the overlap at k={k} differs: |top-k by TracIn ∩ top-k by similarity| / k, averaged over queries")
    _ok(f"top-k overlaps for k = {', '.join(map(str, ks))}")


def blame_by_category(answer, blame: Sequence[float], labels: Sequence[str], categories: Sequence[str]) -> None:
    """A table of summed blame: a row per category, a column per label (the solution's unstack)."""
    _filled(answer, "a table of blame by category (rows) and label (columns)")
    if not hasattr(answer, "columns") or "harmful" not in answer.columns:
        _fail("`answer` should be a DataFrame with a row per category and a column per label ('harmful', ...)")
    blame = np.asarray(blame, dtype=float)
    total: dict[tuple[str, str], float] = {}
    count: dict[tuple[str, str], int] = {}
    for b, label, cat in zip(blame, labels, categories):
        total[label, cat] = total.get((label, cat), 0.0) + b
        count[label, cat] = count.get((label, cat), 0) + 1
    rows = [(cat, label, v) for cat, row in answer.iterrows() for label, v in row.items() if not np.isnan(v)]
    if not rows:
        _fail("the table is empty")
    if all(abs(v - total.get((label, cat), np.nan)) <= 6e-4 for cat, label, v in rows):
        harmful = answer["harmful"].dropna().tolist()
        if harmful != sorted(harmful, reverse=True):
            _fail("sort the rows by the harmful column, largest blame first")
        _ok(f"summed blame for {len(answer)} categories")
        return
    if all(abs(v - total.get((label, cat), np.nan) / count.get((label, cat), 1)) <= 6e-4 for cat, label, v in rows):
        _fail("that is the mean blame per example: the question is about the total, so use .sum()")
    _fail("the sums differ: group plan['blame'] by the example's label and its prompt's category, then .sum()")


def similarity_layers(answer, tracin: np.ndarray, others: Mapping[int, np.ndarray], sims: np.ndarray | None = None,
                      layer: int | None = None) -> None:
    """``{layer: mean Spearman ρ with TracIn over the queries}`` for the similarity at each layer of
    ``others`` (and at ``layer``, whose similarity ``sims`` the chapter computed)."""
    from scipy.stats import pearsonr, spearmanr

    _filled(answer, "a table (or dict) of the mean Spearman ρ per layer")
    _filled(others, "a dict from layer to its similarity matrix")
    rho = _rows(answer, "layer", "mean Spearman ρ with TracIn") if hasattr(answer, "columns") else dict(answer)
    by_layer = {**others, **({layer: sims} if sims is not None else {})}
    tracin = np.asarray(tracin)
    if sorted(rho) != sorted(by_layer):
        _fail(f"one value per layer in {sorted(by_layer)}; the answer has {sorted(rho)}")
    for at, s in by_layer.items():
        s = np.asarray(s)
        if s.shape != tracin.shape:
            _fail(f"the similarity at layer {at} has shape {s.shape}; like TracIn it should be "
                  f"[training example, query] = {tracin.shape}")
        expected = np.mean([spearmanr(tracin[:, j], s[:, j]).statistic for j in range(tracin.shape[1])])
        if abs(rho[at] - expected) > 0.006:
            pearson = np.mean([pearsonr(tracin[:, j], s[:, j]).statistic for j in range(tracin.shape[1])])
            if abs(rho[at] - pearson) <= 0.006:
                _fail("that is Pearson's correlation: the exercise asks for Spearman's (ranks), scipy.stats.spearmanr")
            _fail(f"the mean ρ at layer {at} differs: Spearman ρ of each query's column, then the mean")
    _ok(f"mean Spearman ρ with TracIn at layers {sorted(by_layer)}")


# 02 · Input ------------------------------------------------------------------------------------


def replacement(answer, prompt: str, filler: str, user_ids: Callable, log_odds: Callable, tok,
                deletion: np.ndarray | None = None) -> None:
    """ℓ(prompt) − ℓ(prompt with user token i replaced by ``filler``), one value per user token."""
    _filled(answer, "one score per token of the user's prompt")
    ids = user_ids(prompt)
    values = _numbers(answer, len(ids), "one score per token of the user's prompt")
    texts = [(tok.decode(ids[:i]) + filler + tok.decode(ids[i + 1 :])).strip() for i in range(len(ids))]
    s = log_odds([prompt] + texts)
    expected = s[0] - s[1:]
    if _close(values, expected, 1e-3):
        _ok(f"replacement scores for {len(ids)} tokens")
        return
    if _close(values, -expected, 1e-3):
        _fail("the sign is flipped: the score is ℓ(prompt) − ℓ(replaced), positive where a token pushes towards refusal")
    if deletion is not None and _close(values, deletion, 1e-3):
        _fail(f"these are the deletion scores: put {filler!r} where the token was instead of dropping it")
    _fail(f"the scores differ from ℓ(prompt) − ℓ(prompt with token i replaced by {filler!r})")


def steering_strength(answer, reference: Mapping[float, tuple[float, float]], alpha: float = 0.0001) -> None:
    """``{α: (borderline refusal, harmful refusal)}`` on train, with the chapter's α = 0.01 as given."""
    _filled(answer, "a dict α → (borderline, harmful)")
    if not isinstance(answer, Mapping) or alpha not in answer:
        _fail(f"`answer` should be a dict with the key {alpha} (and the chapter's {list(reference)})")
    for a, pair in answer.items():
        values = _numbers(pair, 2, "a pair (borderline, harmful)")
        if ((values < 0) | (values > 1)).any():
            _fail(f"α = {a}: mean refusal scores lie between 0 and 1")
    for a, pair in reference.items():
        if a in answer and not _close(answer[a], pair, 1e-6):
            if _close(answer[a], pair[::-1], 1e-6):
                _fail("the pair is (borderline, harmful): you swapped it")
            _fail(f"α = {a} is the chapter's own measurement: keep bl_train[bl_k] for it")
    if any(_close(answer[alpha], pair, 1e-9) for pair in reference.values()):
        _fail(f"α = {alpha} gives exactly the chapter's numbers: pass math.log({alpha}) to steered_scores")
    _ok(f"mean refusal for α in {sorted(answer)}")


def wrapper_words(answer, wrapped: list[str], plain: list[str], grad_x_input: Callable, positions: Callable,
                  user_ids: Callable, tok, n: int = 5) -> None:
    """The ``n`` wrapper words with the most negative mean gradient × input: ``[(word, mean), ...]``."""
    _filled(answer, f"a list of {n} (word, mean score) pairs")
    if not isinstance(answer, Sequence) or len(answer) != n or not all(len(p) == 2 for p in answer):
        _fail(f"`answer` should be a list of {n} pairs (word, mean score), most negative first")
    by_word: dict[str, list[float]] = {}
    for w, p in zip(wrapped, plain):
        g = grad_x_input(w)
        for i in positions(w, p):
            by_word.setdefault(tok.decode([user_ids(w)[i]]).strip().lower(), []).append(float(g[i]))
    means = {word: float(np.mean(v)) for word, v in by_word.items() if word}
    expected = sorted(means.items(), key=lambda kv: kv[1])[:n]
    words = [w for w, _ in answer]
    if [w for w, _ in expected] == words and _close([v for _, v in answer], [v for _, v in expected], 6e-4):
        _ok(f"the {n} wrapper words that pull hardest away from refusal")
        return
    if [w for w, _ in sorted(means.items(), key=lambda kv: -kv[1])[:n]] == words:
        _fail("these pull towards refusal: sort ascending, the most negative mean first")
    if any(w not in means for w in words):
        _fail("some words are not wrapper words: keep only the wrapper's positions (wrapper_positions), decoded, "
              "stripped and lower-cased")
    _fail("the words or their means differ: average gradient × input per decoded wrapper token over the prompts")


# 03a · Probes ----------------------------------------------------------------------------------


def borderline_probe(answer, model: nn.Module, tok, layer: int, harmful: torch.Tensor, harmless: torch.Tensor,
                     prompts: list[str]) -> None:
    """The mean P(harmful) that a probe at ``layer``, fit on the ``harmful`` and ``harmless`` train
    activations, gives ``prompts`` (the borderline test prompts)."""
    from .directions import fit_probe, last_token_activations

    value = _share(answer, "the mean probability P(harmful)")
    p = np.asarray(fit_probe(layer, harmful, harmless).predict(last_token_activations(model, tok, prompts, [layer])[0]))
    if abs(value - p.mean()) < 1e-4:
        _ok(f"mean P(harmful) of {len(p)} borderline prompts: {p.mean():.3f}")
        return
    if abs(value - (1 - p.mean())) < 1e-4:
        _fail("that is P(harmless): probe.predict gives the probability of the positive class, harmful")
    if abs(value - (p > 0.5).mean()) < 1e-4:
        _fail("that is the share classified harmful: the exercise asks for the mean probability")
    _fail(f"the mean differs from a probe's predictions at layer {layer} (fit_probe on the train activations) "
          "for the borderline test prompts' last-token activations")


# 03b · Perturbation ------------------------------------------------------------------------------


def one_layer_ablation(answer, model: nn.Module, tok, direction: torch.Tensor, layer: int, prompts: list[str]) -> None:
    """Mean refusal of ``prompts`` with ``direction`` projected out of decoder layer ``layer``'s output only."""
    value = _share(answer, "the mean refusal score")

    def hooked(at: int, unit: bool = True) -> float:
        r = direction / direction.norm() if unit else direction

        def project(_m, _i, out):
            h = residual(out)
            h = h - (h @ r)[..., None] * r
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handle = decoder_layers(model)[at].register_forward_hook(project)
        try:
            return float(np.mean(refusal_score(model, tok, prompts)))
        finally:
            handle.remove()

    if abs(value - hooked(layer)) < 2e-3:
        _ok(f"refusal with the direction removed after layer {layer} only")
        return
    if abs(value - float(np.mean(refusal_score(model, tok, prompts)))) < 2e-3:
        _fail("that is refusal without any ablation: is the hook registered while you score, and returned?")
    for at in (layer - 1, layer + 1):
        if 0 <= at < len(decoder_layers(model)) and abs(value - hooked(at)) < 2e-3:
            _fail(f"that is layer {at}: hook decoder_layers(model)[layer] itself, on its output")
    if abs(value - hooked(layer, unit=False)) < 2e-3:
        _fail("normalise the direction first (r = direction / direction.norm()): otherwise the projection is wrong")
    _fail(f"the refusal differs from ablation at the output of layer {layer} only")


@torch.no_grad()
def patch_pair(answer, model: nn.Module, harmful: tuple[torch.Tensor, int], harmless: tuple[torch.Tensor, int],
               layers: Sequence[int], probability: Callable[[torch.Tensor], float]) -> None:
    """``{layer: recovered share}`` for patching the harmful run's last prompt position into the harmless
    run at each layer; ``harmful`` and ``harmless`` are the chapter's ``scored_rows`` (rows, n)."""
    _filled(answer, "a dict layer → recovered share")
    if not isinstance(answer, Mapping) or sorted(answer) != sorted(layers):
        _fail(f"one value per patched layer in {list(layers)}")
    (rows_h, n_h), (rows_n, n_n) = harmful, harmless
    hi = probability(model(input_ids=rows_h, logits_to_keep=3).logits)
    lo = probability(model(input_ids=rows_n, logits_to_keep=3).logits)
    clean = _layer_outputs_full(model, rows_h)
    expected, raw = {}, {}
    for L in layers:
        def put(_m, _i, out, L=L):
            h = residual(out).clone()
            h[:, n_n - 1] = clean[L][:, n_h - 1]
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handle = decoder_layers(model)[L].register_forward_hook(put)
        try:
            raw[L] = probability(model(input_ids=rows_n, logits_to_keep=3).logits)
        finally:
            handle.remove()
        expected[L] = (raw[L] - lo) / (hi - lo)
    got = [float(answer[L]) for L in layers]
    if _close(got, [expected[L] for L in layers], 0.011):
        _ok(f"patching the last position recovers {max(expected.values()):.2f} at most, over {len(layers)} layers")
        return
    if _close(got, [raw[L] for L in layers], 0.011):
        _fail("these are raw probabilities: normalise, (patched − harmless) / (harmful − harmless)")
    _fail("the recovered shares differ: patch position n − 1 of each layer's output, the harmful run's into the harmless")


@torch.no_grad()
def _layer_outputs_full(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    return _layer_outputs(model, {"input_ids": ids})


# 03c · Deciphering -------------------------------------------------------------------------------


def lens_share(answer, rank: torch.Tensor) -> None:
    """The share of prompts with "I" on top at the last layer; ``rank`` is the chapter's lens rank
    ``[layer, prompt]`` of "I" for the wrapped prompts (0 = top guess)."""
    value = _share(answer, "the share of prompts with 'I' on top at the last layer")
    rank = torch.as_tensor(rank)
    expected = float((rank[-1] == 0).float().mean())
    if abs(value - expected) < 1e-6:
        _ok(f"'I' is on top at the last layer for {expected:.0%} of the wrapped prompts")
        return
    if abs(value - float((rank[-1] <= 1).float().mean())) < 1e-6:
        _fail("rank 0 is the top guess: count rank == 0, not rank <= 1")
    if abs(value - float((rank[0] == 0).float().mean())) < 1e-6:
        _fail("that is the first layer: the question is about the last one, rank[-1]")
    if abs(value - float((rank == 0).float().mean())) < 1e-6:
        _fail("that averages over every layer: read the last layer only")
    _fail("the share differs from the share of prompts whose rank of 'I' is 0 at the last layer")


def feature_auroc(answer, scores: np.ndarray, labels: np.ndarray) -> None:
    """The train AUROC of one feature's per-prompt activation, harmful against the rest."""
    from sklearn.metrics import roc_auc_score

    value = _share(answer, "an AUROC")
    positive = np.asarray(labels) == "harmful"
    expected = float(roc_auc_score(positive, np.asarray(scores)))
    if abs(value - expected) < 1e-3:
        _ok(f"train AUROC {expected:.3f} (optimistic: the feature was chosen on these prompts)")
        return
    if abs(value - (1 - expected)) < 1e-3:
        _fail("the labels are inverted: harmful is the positive class")
    _fail("the AUROC differs: roc_auc_score(labels == 'harmful', per-prompt maximum of the feature)")


# 04 · Generation ---------------------------------------------------------------------------------


def threshold_shares(answer, scores: Mapping[str, np.ndarray], thresholds: Sequence[float] = (0.5, 0.7, 0.9, 0.95)) -> None:
    """``{threshold: {set: share of prompts blocked}}``: blocked means score > threshold."""
    _filled(answer, "a dict threshold → {set: share blocked}")
    if not isinstance(answer, Mapping) or sorted(answer) != sorted(thresholds):
        _fail(f"one entry per threshold in {list(thresholds)}")
    for t in thresholds:
        row = answer[t]
        if not isinstance(row, Mapping) or set(row) != set(scores):
            _fail(f"threshold {t}: one share per prompt set, {sorted(scores)}")
        for name, s in scores.items():
            expected = float(np.mean(np.asarray(s) > t))
            got = float(row[name])
            if abs(got - expected) < 1e-9:
                continue
            if abs(got - 100 * expected) < 1e-6 and expected:
                _fail("those are percentages: give shares between 0 and 1")
            if abs(got - (1 - expected)) < 1e-9:
                _fail("that is the share let through: a prompt is blocked when its score exceeds the threshold")
            _fail(f"threshold {t}, {name}: the share blocked is np.mean(scores > t)")
    _ok(f"shares blocked at {len(thresholds)} thresholds for {len(scores)} sets")


def keyword_rewrites(answer, originals: list[str], keyword_score: Callable[[str, str], float]) -> None:
    """Rewrites of ``originals`` that ask the same without the keyword filter's words."""
    _filled(answer, "a list of rewritten prompts")
    if isinstance(answer, str) or not isinstance(answer, Sequence) or len(answer) != len(originals):
        _fail(f"`answer` should be a list of {len(originals)} rewritten prompts, one per original")
    for original, new in zip(originals, answer):
        if keyword_score(original, "") <= 0:
            _fail(f"the filter does not block the original {original!r}: start from prompts it blocks")
        if new.strip().lower() == original.strip().lower():
            _fail("a rewrite is the original itself: reword it")
        if keyword_score(new, "") > 0:
            _fail(f"the filter still blocks {new!r}: replace every word of KEYWORDS it contains")
    _ok(f"{len(answer)} rewrites pass the keyword filter")


@torch.no_grad()
def prefill_continuations(answer, model: nn.Module, tok, prompts: list[str], prefill: str,
                          max_new_tokens: int = 12) -> None:
    """The greedy continuations (decoded new tokens only) after the assistant prefill, one per prompt."""
    _filled(answer, "a list of continuations")
    if isinstance(answer, str) or not isinstance(answer, Sequence) or len(answer) != len(prompts):
        _fail(f"`answer` should be a list of {len(prompts)} continuations, one per prompt")
    if any("<|im_start|>" in a or "user\n" in a for a in answer):
        _fail("decode only the new tokens (out[:, enc['input_ids'].shape[1]:]), not the whole sequence")
    if any(a.strip().startswith(prefill.strip()) for a in answer):
        _fail("the continuation starts with the prefill: decode only the tokens generated after it")
    texts = [chat_text(tok, p) + prefill for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                         temperature=None, top_p=None, top_k=None)
    expected = [t.strip() for t in tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)]
    first = [a.split()[:1] == e.split()[:1] for a, e in zip(answer, expected)]
    if np.mean(first) < 0.75:
        _fail("the continuations differ from greedy decoding after chat_text(tok, prompt) + PREFILL")
    refusals = sum(is_refusal_text(a) for a in answer)
    _ok(f"{len(answer)} continuations after the prefill; {refusals} open with a refusal")


#: Every exercise of the book, by label, and its check.
EXERCISES: dict[str, Callable] = {
    "ex-start-own-prompts": own_prompts,
    "ex-start-first-token": first_token,
    "ex-start-lens": lens_layer,
    "ex-train-topk": topk_overlap,
    "ex-train-blame-category": blame_by_category,
    "ex-train-layer": similarity_layers,
    "ex-input-replace": replacement,
    "ex-input-strength": steering_strength,
    "ex-input-wrapper-words": wrapper_words,
    "ex-probe-borderline": borderline_probe,
    "ex-perturb-one-layer": one_layer_ablation,
    "ex-perturb-another-pair": patch_pair,
    "ex-decipher-lens-wrapped": lens_share,
    "ex-decipher-feature-probe": feature_auroc,
    "ex-gen-threshold": threshold_shares,
    "ex-gen-keyword": keyword_rewrites,
    "ex-gen-prefill": prefill_continuations,
}
