"""What the residual stream says about a prompt: activations, difference-in-means directions,
and linear probes. The book's own probe and direction (trained on its data, cached) are in ``zoo.py``."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .models import decoder_layers, encode_chats, residual


@torch.no_grad()
def last_token_activations(
    model: nn.Module, tok, prompts: list[str], layers: list[int] | None = None, batch_size: int = 16,
    system: str | None = None,
) -> torch.Tensor:
    """Residual stream after each layer at the last prompt token: ``[layer, prompt, d_model]``.

    The last token of the chat template (the newline after ``assistant``) is where the model
    decides how to open its answer. Prompts are batched by length (less padding), and the chat
    opening they share runs once per batch (``models.prompt_forward``) unless the model carries a
    hook that is not pointwise; the result is in the order of ``prompts``.
    """
    return end_activations(model, tok, prompts, 1, layers, batch_size, system)[:, 0]


def post_instruction_length(tok) -> int:
    """How many tokens the chat template puts after the user's words: the positions where Arditi et
    al. look for the refusal direction. SmolLM2 has six: ``<|im_end|>``, a newline, ``<|im_start|>``,
    ``ass``, ``istant`` and a newline."""
    from .models import chat_text

    mark = "§§"
    text = chat_text(tok, mark)
    after = text[text.index(mark) + len(mark) :]
    return len(tok(after, add_special_tokens=False).input_ids)


@torch.no_grad()
def end_activations(
    model: nn.Module, tok, prompts: list[str], n_last: int, layers: list[int] | None = None, batch_size: int = 16,
    system: str | None = None,
) -> torch.Tensor:
    """Residual stream after each layer at the last ``n_last`` prompt tokens:
    ``[layer, position, prompt, d_model]``, position 0 the earliest of them and ``n_last - 1`` the
    last token. Batched and ordered as ``last_token_activations``."""
    from .models import by_length, pointwise, prompt_forward

    blocks = decoder_layers(model)
    layers = list(range(len(blocks))) if layers is None else layers
    captured: dict[int, torch.Tensor] = {}
    # read-only hooks; the last one to fire (the pass that holds each prompt's last tokens) is kept
    hooks = [
        blocks[i].register_forward_hook(
            pointwise(lambda _m, _in, out, i=i: captured.__setitem__(i, residual(out)[:, -n_last:])))
        for i in layers
    ]
    order = by_length(tok, prompts)
    chunks = []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = encode_chats(tok, [prompts[i] for i in order[start : start + batch_size]], system)
            prompt_forward(model, enc, keep=n_last)  # the chat opening shared by every prompt runs once
            chunks.append(torch.stack([captured[i].float().transpose(0, 1) for i in layers]))
    finally:
        for h in hooks:
            h.remove()
    acts = torch.cat(chunks, dim=2)
    out = torch.empty_like(acts)
    out[:, :, order] = acts
    return out


def diff_in_means(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Mean of ``positive`` minus mean of ``negative`` over prompts (dim -2), per layer."""
    return positive.mean(-2) - negative.mean(-2)


@dataclass
class Probe:
    """A logistic-regression probe on one layer's standardized activations."""

    layer: int
    weight: list[float]
    bias: float
    mean: list[float]
    std: list[float]

    def predict(self, acts: torch.Tensor) -> np.ndarray:
        """P(positive) for activations ``[prompt, d_model]`` taken at ``self.layer``."""
        x = (acts.float().numpy() - np.array(self.mean)) / np.array(self.std)
        return 1 / (1 + np.exp(-(x @ np.array(self.weight) + self.bias)))


def fit_probe(layer: int, positive: torch.Tensor, negative: torch.Tensor, c: float = 0.1) -> Probe:
    """Fit a logistic-regression probe separating ``positive`` from ``negative`` ``[prompt, d]``."""
    from sklearn.linear_model import LogisticRegression

    x = torch.cat([positive, negative]).float().numpy()
    y = np.r_[np.ones(len(positive)), np.zeros(len(negative))]
    mean, std = x.mean(0), x.std(0) + 1e-6
    clf = LogisticRegression(C=c, max_iter=2000).fit((x - mean) / std, y)
    return Probe(layer, clf.coef_[0].tolist(), float(clf.intercept_[0]), mean.tolist(), std.tolist())


def held_out_scores(acts: torch.Tensor, labels: np.ndarray, groups: list, layer: int, folds: int = 5) -> np.ndarray:
    """P(positive) for every row of ``acts`` ``[prompt, d]`` (taken at ``layer``), each from a ``fit_probe``
    fitted in ``folds`` folds grouped by ``groups`` on the other folds' rows: a group's rows are held out
    together, so no prompt is scored by a probe that saw it or its twin."""
    from sklearn.model_selection import GroupKFold

    labels = np.asarray(labels, bool)
    if len(groups) != len(labels):
        raise ValueError(f"one group per prompt: {len(groups)} groups for {len(labels)} prompts")
    scores = np.zeros(len(labels))
    for train, held in GroupKFold(folds).split(labels, labels, groups):
        scores[held] = fit_probe(layer, acts[train[labels[train]]], acts[train[~labels[train]]]).predict(acts[held])
    return scores


def probe_cv_accuracy(positive: torch.Tensor, negative: torch.Tensor, groups: list, folds: int = 5) -> np.ndarray:
    """Each layer's cross-validated balanced accuracy of ``fit_probe``, for activations ``[layer, prompt, d]``.

    ``groups`` names a group for every row of ``positive`` then ``negative``; a group's rows are held
    out together (a harmful prompt with the harmless prompt written as its pair, say: ``held_out_scores``).
    Only these rows are used: choosing a layer by this score keeps the test prompts out of the choice.
    """
    labels = np.r_[np.ones(positive.shape[1], bool), np.zeros(negative.shape[1], bool)]
    out = []
    for layer in range(positive.shape[0]):
        flagged = held_out_scores(torch.cat([positive[layer], negative[layer]]), labels, groups, layer, folds) > 0.5
        out.append((flagged[labels].mean() + (~flagged[~labels]).mean()) / 2)
    return np.array(out)


def choose_probe_layer(positive: torch.Tensor, negative: torch.Tensor, groups: list, folds: int = 5) -> tuple[int, np.ndarray]:
    """The layer with the best ``probe_cv_accuracy`` (the earliest, on a tie) and every layer's score."""
    cv = probe_cv_accuracy(positive, negative, groups, folds)
    return int(np.argmax(cv)), cv


def request_start(tok, system: str | None = None) -> int:
    """How many tokens of the chat template come before the user's request (the system prompt and the
    user header): the same for every prompt."""
    from .models import chat_text

    marker = "[[request]]"
    text = chat_text(tok, marker, system)
    opening = tok(text[: text.index(marker)], add_special_tokens=False).input_ids
    full = tok(text, add_special_tokens=False).input_ids
    n = 0
    while n < len(opening) and opening[n] == full[n]:
        n += 1
    return n


@torch.no_grad()
def prompt_activations(
    model: nn.Module, tok, prompts: list[str], layers: list[int] | None = None, batch_size: int = 16,
    system: str | None = None,
) -> dict[str, torch.Tensor]:
    """Two readings of the residual stream after each layer, from one forward pass, each
    ``[layer, prompt, d_model]``: ``"last"``, at the last prompt token (as ``last_token_activations``),
    and ``"mean"``, averaged over the prompt's own tokens (as ``pooled_activations``).

    The chat opening before the request is the same for every prompt: it runs once per batch
    (``models.prompt_forward``), and the hooks read only the pass over the rest, whose tokens are the
    last columns of the left-padded batch."""
    from .models import by_length, keeps_opening, prompt_forward

    blocks = decoder_layers(model)
    layers = list(range(len(blocks))) if layers is None else layers
    start = request_start(tok, system)
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    keep: dict[str, torch.Tensor] = {}

    def capture(_m, _in, out, i):
        x = residual(out)
        if x.shape[0] != len(keep["mask"]):
            return  # the shared opening's own pass (one row): no request token in it
        weights = keep["mask"][:, -x.shape[1] :].to(x.dtype)
        captured[i] = (x[:, -1], (x * weights[..., None]).sum(1) / weights.sum(1, keepdim=True))

    # read-only hooks that find the request's tokens in a pass that continues from the opening's cache
    hooks = [blocks[i].register_forward_hook(keeps_opening(lambda m, a, o, i=i: capture(m, a, o, i), start))
             for i in layers]
    order = by_length(tok, prompts)
    # each batch goes straight to its prompts' rows: no list of batches to concatenate and then reorder,
    # which held three copies of the result at once (04's peak, with a thousand prompts)
    result: dict[str, torch.Tensor] = {}
    try:
        for begin in range(0, len(prompts), batch_size):
            rows = order[begin : begin + batch_size]
            enc = encode_chats(tok, [prompts[i] for i in rows], system)
            ids, mask = enc["input_ids"], enc["attention_mask"]
            first = ids.shape[1] - mask.sum(-1) + start  # left padding: where each request begins
            keep["mask"] = torch.arange(ids.shape[1])[None] >= first[:, None]
            prompt_forward(model, enc)
            for j, kind in enumerate(("last", "mean")):
                if kind not in result:
                    result[kind] = torch.empty(len(layers), len(prompts), captured[layers[0]][j].shape[-1])
                for k, i in enumerate(layers):
                    result[kind][k, rows] = captured[i][j].float()
    finally:
        for h in hooks:
            h.remove()
    return result


def pooled_activations(
    model: nn.Module, tok, prompts: list[str], layers: list[int] | None = None, batch_size: int = 16,
    system: str | None = None,
) -> torch.Tensor:
    """Residual stream after each layer, averaged over the prompt's own tokens (the user's request
    and the template tokens after it, not the system prompt they all share): ``[layer, prompt, d_model]``.

    A condition read from the whole request (Lee et al.'s CAST pools the same way) does not rest on the
    last token alone, which a jailbreak wrapper or an odd ending can move.
    """
    return prompt_activations(model, tok, prompts, layers, batch_size, system)["mean"]


@dataclass
class Gate:
    """A condition read from the prompt, as in conditional activation steering (CAST, Lee et al.
    2024): a ``Probe`` on the residual stream after ``probe.layer`` averaged over the prompt's tokens
    (``pooled_activations``), and the ``threshold`` on its probability above which a prompt counts as
    harmful. Both are chosen on train prompts (``choose_gate``); ``cv_accuracy`` is every layer's
    cross-validated balanced accuracy, and ``cv_threshold_accuracy`` the chosen layer's at each
    threshold tried."""

    probe: Probe
    threshold: float
    cv_accuracy: list[float]
    cv_threshold_accuracy: dict[str, float]

    def probability(self, model: nn.Module, tok, prompts: list[str]) -> np.ndarray:
        """P(harmful) of each prompt, read from ``model`` as it is now (call it on the unsteered model)."""
        return self.probe.predict(pooled_activations(model, tok, prompts, [self.probe.layer])[0])

    def flags(self, model: nn.Module, tok, prompts: list[str]) -> np.ndarray:
        """Whether the condition holds (the prompt counts as harmful) for each prompt."""
        return self.probability(model, tok, prompts) > self.threshold


#: Thresholds ``choose_gate`` tries on the held-out probabilities of the train prompts.
GATE_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))


def choose_gate(positive: torch.Tensor, negative: torch.Tensor, groups: list, folds: int = 5) -> Gate:
    """The ``Gate`` for pooled activations ``[layer, prompt, d]`` of positive and negative train prompts.

    The layer is the one with the best grouped cross-validated accuracy (``choose_probe_layer``). The
    threshold is the one of ``GATE_THRESHOLDS`` with the best balanced accuracy on the same held-out
    probabilities (nearest 0.5 on a tie), so the test prompts play no part in either choice. The probe
    is then fitted on every train prompt.
    """
    layer, cv = choose_probe_layer(positive, negative, groups, folds)
    labels = np.r_[np.ones(positive.shape[1], bool), np.zeros(negative.shape[1], bool)]
    held = held_out_scores(torch.cat([positive[layer], negative[layer]]), labels, groups, layer, folds)
    balanced = {str(t): float(((held[labels] > t).mean() + (held[~labels] <= t).mean()) / 2) for t in GATE_THRESHOLDS}
    threshold = max(GATE_THRESHOLDS, key=lambda t: (balanced[str(t)], -abs(t - 0.5)))
    probe = fit_probe(layer, positive[layer], negative[layer])
    return Gate(probe, float(threshold), [float(c) for c in cv], balanced)


@dataclass
class RefusalDirection:
    """The refusal direction of a model and how the book applies it.

    ``direction`` is harmful minus harmless mean activation at ``layer`` (last prompt token, train
    split); ``layer`` is the one whose direction, ablated from every layer, most lowers refusal
    of harmful train prompts; ``coefficient`` is the smallest tried multiple of ``direction``
    that, added after ``layer``, makes harmless train prompts refused at least ``target``.
    """

    layer: int
    direction: list[float]
    coefficient: float
    ablated_refusal: dict[str, float]
    added_refusal: dict[str, float]

    def vector(self) -> torch.Tensor:
        """The direction as a tensor (not normalized)."""
        return torch.tensor(self.direction)


CANDIDATE_LAYERS = tuple(range(4, 28, 2))
COEFFICIENTS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
#: Refusal of harmless train prompts that the chosen addition coefficient must reach.
ADD_TARGET = 0.7
