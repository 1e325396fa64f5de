"""Train and attribute on the adapted layers only.

The book's LoRA adapters sit on the upper decoder layers (14–29). The layers below are frozen and
the same for every adapter, training step, seed and attribution pass, so their output for a
training sequence is computed once (``LowerStates``) and the upper layers are run on it
(``upper_only``). The forward pass through the model then costs the upper layers only.

Training goes one step further (``shared_prefix_losses``): every chat sequence opens with the same
system prompt and user header. Its keys and values in the upper layers depend on the adapter, so
they are recomputed at every step, but once for the whole mini-batch instead of once per example.
Both shortcuts compute the same losses and gradients as a full forward pass, up to rounding.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .models import residual


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (its LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def first_lora_layer(model: nn.Module) -> int:
    """The lowest decoder layer that holds LoRA weights: every layer below it is frozen (0 for a
    model without LoRA, or one whose names do not say)."""
    found = [int(n.split(".layers.")[1].split(".")[0]) for n, _ in model.named_modules()
             if ".lora_" in n and ".layers." in n]
    return min(found, default=0)


def _stack_owner(model: nn.Module) -> nn.Module:
    inner = causal_lm(model)
    while not hasattr(inner, "layers"):
        inner = inner.model
    return inner


@contextmanager
def layer_slice(model: nn.Module, start: int, stop: int | None = None) -> Iterator[None]:
    """Run only decoder layers ``start:stop`` while the block is open (their attention layers are
    renumbered from 0, so a key-value cache made inside the block lines up with them)."""
    owner = _stack_owner(model)
    layers = owner.layers
    kept = list(layers)[start:stop]
    numbers = [layer.self_attn.layer_idx for layer in kept]
    owner.layers = nn.ModuleList(kept)
    for j, layer in enumerate(kept):
        layer.self_attn.layer_idx = j
    try:
        yield
    finally:
        owner.layers = layers
        for layer, number in zip(kept, numbers):
            layer.self_attn.layer_idx = number


def upper_only(model: nn.Module, start: int):
    """Run decoder layers ``start`` and above; feed them ``inputs_embeds`` from ``LowerStates``."""
    return layer_slice(model, start)


class LowerStates:
    """The residual stream entering layer ``start`` for token sequences, computed once each.

    Each sequence runs alone (no padding), so its states do not depend on which batch asked first:
    training repeats exactly whatever else ran before it in the process.
    """

    def __init__(self, model: nn.Module, start: int):
        self.start = start
        self.use(model)
        self._memo: dict[tuple[int, ...], torch.Tensor] = {}

    def use(self, model: nn.Module) -> None:
        """Compute new states with ``model`` (held weakly: the states outlive the models that made them)."""
        self._model = weakref.ref(model)
        self._released = getattr(model, "_lower_layers_released", False)

    def release(self, sequences: list[list[int]]) -> None:
        """Compute the states of ``sequences``, then free the current model's weights below ``start``:
        a training or attribution pass that will need no other sequence holds less (chapter 01's peak fell by about 100 MB)."""
        for ids in sequences:
            self(ids)
        for layer in list(_stack_owner(self.model).layers)[: self.start]:
            for p in layer.parameters():
                p.data = torch.empty(0, dtype=p.dtype)
        self.model._lower_layers_released = self._released = True

    @property
    def model(self) -> nn.Module:
        model = self._model()
        if model is None:
            raise RuntimeError("the model these states are computed with is gone: get them from lower_states(model)")
        return model

    @torch.no_grad()
    def __call__(self, ids: list[int]) -> torch.Tensor:
        """``[len(ids), d_model]``."""
        key = tuple(ids)
        if key not in self._memo and self._released:
            raise RuntimeError("the layers below the adapters were released: this sequence's states are not known")
        if key not in self._memo:
            lm = causal_lm(self.model)
            if self.start == 0:
                self._memo[key] = lm.get_input_embeddings()(torch.tensor([ids]))[0]
            else:
                captured = {}
                last = _stack_owner(self.model).layers[self.start - 1]
                hook = last.register_forward_hook(lambda _m, _i, out: captured.__setitem__("h", residual(out)))
                try:
                    with layer_slice(self.model, 0, self.start):
                        lm.model(input_ids=torch.tensor([ids]), use_cache=False)
                finally:
                    hook.remove()
                self._memo[key] = captured["h"][0].detach()
        return self._memo[key]

    def padded(self, sequences: list[list[int]], skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded states ``[batch, width, d]`` of ``sequences[i][skip:]``, and their mask."""
        states = [self(ids)[skip:] for ids in sequences]
        width = max(len(s) for s in states)
        out = torch.zeros(len(states), width, states[0].shape[-1])
        mask = torch.zeros(len(states), width, dtype=torch.long)
        for i, s in enumerate(states):
            out[i, : len(s)], mask[i, : len(s)] = s, 1
        return out, mask


_SHARED: dict[tuple[str, int], LowerStates] = {}
_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> the hash of its frozen layers


def lower_states(model: nn.Module, start: int) -> LowerStates:
    """The ``LowerStates`` of ``model`` below ``start``, shared by every training and attribution pass in
    the process whose frozen layers have the same weights (they do for every adapter of the book).
    The weights are hashed once per model object: the layers below ``start`` never train."""
    from .cache import digest

    if start not in _KEYS.get(model, {}):
        owner = _stack_owner(model)
        frozen = [causal_lm(model).get_input_embeddings()] + list(owner.layers)[:start]
        with torch.no_grad():
            sums = [round(float(p.double().sum()), 6) for m in frozen for p in m.parameters()]
        _KEYS.setdefault(model, {})[start] = (digest(sums), start)  # no reference to the model: it can be freed
    key = _KEYS[model][start]
    if key not in _SHARED:
        _SHARED.clear()  # one set of frozen weights at a time: a process trains one base model
        _SHARED[key] = LowerStates(model, start)
    _SHARED[key].use(model)
    return _SHARED[key]


def target_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each row's mean negative log-likelihood of ``targets`` (-100: not scored) under ``logits``, whose
    position t predicts target t (the logits have one more position than the targets)."""
    rows, cols = (targets != -100).nonzero(as_tuple=True)
    return _row_means(logits[rows, cols], targets[rows, cols], rows, len(targets))


def _row_means(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """The mean negative log-likelihood per row of scored tokens given as flat ``[token, vocab]`` logits."""
    nll = nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    return torch.zeros(n_rows, dtype=nll.dtype).index_add(0, rows, nll) / torch.bincount(rows, minlength=n_rows)


def _padded_labels(labels: list[list[int]], width: int) -> torch.Tensor:
    return torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])


def answer_token_losses(lm: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's mean negative log-likelihood of its scored tokens, from the last hidden states
    ``[batch, width, d]`` of a sequence whose ``labels`` (-100: not scored) line up with its tokens.

    The language-model head runs only on the positions that predict a scored token: the prompts are
    most of each sequence, and they end at different places in a batch (``target_losses`` with
    ``logits_to_keep`` computes a slice that covers every row's answer, and the head is a fifth of
    a training step).
    """
    targets = labels[:, 1:]
    rows, cols = (targets != -100).nonzero(as_tuple=True)
    return _row_means(lm.lm_head(hidden[rows, cols]), targets[rows, cols], rows, len(labels))


def upper_losses(model: nn.Module, lower: LowerStates, pairs: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Each example's mean answer-token loss, run on the upper layers only (per-example gradients
    stay separable: TracIn's hooks see each example's own tokens)."""
    states, mask = lower.padded([ids for ids, _ in pairs])
    labels = _padded_labels([lab for _, lab in pairs], states.shape[1])
    lm = causal_lm(model)
    with upper_only(model, lower.start):
        hidden = lm.model(inputs_embeds=states, attention_mask=mask, use_cache=False).last_hidden_state
    return answer_token_losses(lm, hidden, labels)


def common_prefix(sequences: list[list[int]]) -> int:
    """Length of the longest token prefix that all ``sequences`` share."""
    n = min(len(s) for s in sequences)
    for i in range(n):
        if any(s[i] != sequences[0][i] for s in sequences):
            return i
    return n


def shared_prefix_losses(model: nn.Module, lower: LowerStates, pairs: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Like ``upper_losses``, but the shared opening of the sequences (system prompt, user header) runs
    through the upper layers once, and the rest of each sequence attends to its keys and values."""
    sequences = [ids for ids, _ in pairs]
    answers_from = min(next(i for i, t in enumerate(lab) if t != -100) for _, lab in pairs)
    shared = min(common_prefix(sequences), answers_from - 1)  # the last prompt token predicts the answer
    if shared < 2 or len(pairs) == 1:
        return upper_losses(model, lower, pairs)
    lm = causal_lm(model)
    prefix = lower(sequences[0])[:shared][None]  # the layers are causal: the opening's states are its own
    rest, mask = lower.padded(sequences, skip=shared)
    batch, width = mask.shape
    labels = _padded_labels([lab[shared:] for _, lab in pairs], width)
    with upper_only(model, lower.start):
        cache = lm.model(inputs_embeds=prefix, use_cache=True).cache
        cache.batch_repeat_interleave(batch)
        positions = (shared + torch.arange(width)).expand(batch, width)
        attention = torch.cat([torch.ones(batch, shared, dtype=torch.long), mask], dim=1)
        hidden = lm.model(inputs_embeds=rest, attention_mask=attention, position_ids=positions, cache=cache,
                          use_cache=True).last_hidden_state
    return answer_token_losses(lm, hidden, labels)
