"""Token-level tools for the input-stage chapter: a differentiable refusal score, and attention
steering (PASTA / AtMan style) that any library measurement runs under unchanged.

``log_refusal`` is ``refusal.refusal_score`` rewritten to start from input embeddings, so that
gradients reach every input token. ``steerable`` switches a model to an eager attention that adds
a bias to the pre-softmax scores of chosen keys in chosen heads; ``steering`` sets that bias for
the duration of a block, either by hand or per prompt from the prompt's own tokens.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .models import chat_text, keeps_opening, removed_after
from .refusal import opening_logprobs, opening_tree

STEERED = "steered"


def user_span(tok, prompt: str) -> tuple[torch.Tensor, slice]:
    """Token ids of ``prompt`` in the chat template, and the slice that holds the user's own tokens."""
    ids = tok(chat_text(tok, prompt), add_special_tokens=False).input_ids
    user = tok(prompt, add_special_tokens=False).input_ids
    start = next((s for s in range(len(ids)) if ids[s : s + len(user)] == user), None)
    if start is None:
        raise ValueError(f"the chat template re-tokenizes the prompt differently: {prompt[:40]!r}")
    return torch.tensor(ids), slice(start, start + len(user))


def log_refusal(model: nn.Module, tok, embeds: torch.Tensor, opening: int = 0) -> torch.Tensor:
    """log P(the answer opens with a refusal) for ``embeds`` ``[batch, tokens, d_model]``: a batch of
    equal-length chat prompts given as input embeddings (no padding). Differentiable.

    The same quantity as ``refusal_score``: the prompt is run once and one more step reads every
    opening from its key-value cache (``refusal.OpeningTree``); gradients flow through the cache.

    ``opening`` > 0 promises that every row shares its first ``opening`` embeddings and that no
    steering touches them (AtMan's rows differ only in which user token they suppress): they run once,
    unsteered and without gradients, and the rows continue from their cache.
    """
    batch, width = embeds.shape[:2]
    cache, positions = None, None
    if opening:
        state: Steering | None = getattr(model, "steering", None)
        gate = state.gate if state is not None else None
        if state is not None:
            state.gate = None  # the opening is never steered: run it once for the whole batch
        try:
            with torch.no_grad():
                cache = model(inputs_embeds=embeds[:1, :opening], use_cache=True, logits_to_keep=1).cache
        finally:
            if state is not None:
                state.gate = gate
        cache.batch_repeat_interleave(batch)
        positions = torch.arange(opening, width).expand(batch, -1)
    out = model(inputs_embeds=embeds[:, opening:], cache=cache, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    past = torch.ones(batch, width, dtype=torch.long)
    return torch.logsumexp(opening_logprobs(model, opening_tree(tok), out.logits[:, -1], out.cache, past), dim=-1)


@dataclass
class Steering:
    """What steered attention adds to its pre-softmax scores: ``bias[row, key] * gate[layer, head]``.

    ``bias`` is set by hand, or, when ``targets`` is set, before every forward pass from each row's
    user tokens: ``targets`` maps a prompt's user token ids to the user positions that get ``strength``.
    """

    user_start: int
    end_id: int
    gate: torch.Tensor | None = None  # [layers, heads]
    bias: torch.Tensor | None = None  # [batch, keys]
    targets: dict[tuple[int, ...], list[int]] | None = None
    strength: float = 0.0


def _steered_attention(module, query, key, value, attention_mask, **kwargs):
    """Eager attention plus the model's current steering bias, in the heads its gate selects."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    state: Steering | None = getattr(module, "steering", None)
    if state is not None and state.gate is not None and state.bias is not None:
        bias = state.bias.to(query.dtype)
        bias = nn.functional.pad(bias, (0, key.shape[2] - bias.shape[1]))  # later keys are not biased
        add = bias[:, None, None, :] * state.gate[module.layer_idx].to(query.dtype)[None, :, None, None]
        attention_mask = add if attention_mask is None else attention_mask + add
    return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _bias_from_targets(state: Steering):
    def hook(_module, _args, kwargs):
        ids = kwargs.get("input_ids")
        if state.targets is None or ids is None or kwargs.get("cache") is not None:
            return  # a call that continues from a cache keeps the bias of the prompt it continues
        bias = torch.zeros(ids.shape)
        for r, start, user in _user_rows(state.user_start, state.end_id, ids, kwargs.get("attention_mask")):
            for i in state.targets.get(user, []):
                bias[r, start + i] = state.strength
        state.bias = bias

    return hook


def steerable(model: nn.Module, tok) -> Steering:
    """Switch ``model`` to steerable eager attention (unsteered, it is plain eager attention) and
    return its steering state. Calling it again returns the same state."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    if getattr(model, "steering", None) is not None:
        return model.steering
    AttentionInterface.register(STEERED, _steered_attention)
    AttentionMaskInterface.register(STEERED, eager_mask)
    model.set_attn_implementation(STEERED)
    state = Steering(user_start=user_span(tok, "x")[1].start, end_id=tok.convert_tokens_to_ids("<|im_end|>"))
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "q_proj"):
            module.steering = state
    model.steering = state
    return state


@contextmanager
def steering(
    model: nn.Module,
    gate: torch.Tensor,
    bias: torch.Tensor | None = None,
    targets: dict[tuple[int, ...], list[int]] | None = None,
    strength: float = 0.0,
) -> Iterator[Steering]:
    """Steer a ``steerable`` model's attention inside the block: add ``bias`` ``[batch, keys]``
    (for calls on embeddings, such as ``log_refusal``), or ``strength`` at each prompt's
    ``targets`` (for calls on token ids, such as ``refusal_score``), in the heads ``gate`` selects."""
    state: Steering = model.steering
    state.gate, state.bias, state.targets, state.strength = gate, bias, targets, strength
    # hooked only while steering: an unsteered model has no hook, so its scores may share the chat
    # opening and come from the disk cache; a steered one is never cached (``models.has_hooks``)
    handle = model.register_forward_pre_hook(_bias_from_targets(state), with_kwargs=True)
    try:
        yield state
    finally:
        handle.remove()
        state.gate = state.bias = state.targets = None
        state.strength = 0.0


def targets_for(tok, prompts: list[str], positions: list[list[int]]) -> dict[tuple[int, ...], list[int]]:
    """Steering targets: each prompt's user token ids -> the user positions to bias."""
    return {tuple(tok(p, add_special_tokens=False).input_ids): list(pos) for p, pos in zip(prompts, positions)}


# --- Token Highlighter (Hu et al., 2025): find the tokens that push towards compliance, shrink them ----

#: The affirmation whose likelihood Token Highlighter's loss measures: how ready the model is to comply.
AFFIRMATION = "Sure, I'd like to help you with this."

#: The share of a prompt's user tokens that ``highlighted`` shrinks, and the factor it shrinks their
#: embeddings by. Chosen in the input-stage chapter on the train split's rephrased prompts (the rewording
#: that ``tuned`` misses), among fractions 0.1 and 0.25 and factors 0.5 and 0.8: the pair whose rise in
#: harmful refusal most exceeds its rise in harmless refusal (the paper's defaults are in the same range).
HIGHLIGHT_FRACTION = 0.1
HIGHLIGHT_SCALE = 0.8


def _user_rows(user_start: int, end_id: int, ids: torch.Tensor, mask: torch.Tensor | None):
    """For each row of a left-padded batch of chat prompts: its index, where its user tokens start in
    ``ids``, and those tokens (up to the end of the user's turn). ``mask`` may be longer than ``ids``
    when the call continues from a cache (``models.prompt_forward``'s ``[opening][padding][rest]``):
    the cached positions are counted off, and a row whose user tokens are all cached is skipped."""
    offset = 0 if mask is None else mask.shape[-1] - ids.shape[1]
    for r, row in enumerate(ids.tolist()):
        start = (0 if mask is None else int((mask[r] == 0).sum())) + user_start - offset
        if start < 0:
            continue
        stop = row.index(end_id, start) if end_id in row[start:] else len(row)
        yield r, start, tuple(row[start:stop])


def affirmation_influence(model: nn.Module, tok, prompts: list[str], target: str = AFFIRMATION,
                          batch_size: int = 8) -> list[torch.Tensor]:
    """Token Highlighter's influence of each user token: the norm of the gradient of the affirmation
    loss (the mean negative log-likelihood of ``target`` as the answer) with respect to that token's
    input embedding. One tensor per prompt.

    The chat opening before the user's tokens is the same for every prompt and does not depend on
    them, so it runs once per batch without gradients; the batch runs forward and backward on the
    rest only (``[opening][padding][rest]``, as in ``models.prompt_forward``)."""
    from .models import by_length

    target_ids = tok(target, add_special_tokens=False).input_ids
    embed = model.get_input_embeddings()
    start = user_span(tok, "x")[1].start
    out: list[torch.Tensor | None] = [None] * len(prompts)
    order = by_length(tok, prompts)
    for begin in range(0, len(prompts), batch_size):
        members = order[begin : begin + batch_size]
        spans = [user_span(tok, prompts[i]) for i in members]
        opening = spans[0][0][:start]
        rows = [ids[start:].tolist() + target_ids for ids, _ in spans]
        width = max(len(r) for r in rows)
        pad = [width - len(r) for r in rows]
        with torch.no_grad():
            cache = model(input_ids=opening[None], use_cache=True, logits_to_keep=1).cache
        cache.batch_repeat_interleave(len(members))
        ids = torch.tensor([[tok.pad_token_id] * p + r for p, r in zip(pad, rows)])
        mask = torch.tensor([[1] * start + [0] * p + [1] * len(r) for p, r in zip(pad, rows)])
        x = embed(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=x, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1)[:, start:],
                       cache=cache, use_cache=True, logits_to_keep=len(target_ids) + 1).logits[:, :-1]
        loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                           torch.tensor(target_ids).repeat(len(members)), reduction="sum")
        (loss / len(target_ids)).backward()
        norms = x.grad.norm(dim=-1)
        for j, (i, (_, span)) in enumerate(zip(members, spans)):
            out[i] = norms[j, pad[j] : pad[j] + span.stop - span.start].detach()
    return out


def top_share(influence: list[torch.Tensor], fraction: float) -> list[list[int]]:
    """Each prompt's most influential user positions: the top ``fraction`` of its tokens (at least one)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return [sorted(s.topk(max(1, math.ceil(fraction * len(s)))).indices.tolist()) for s in influence]


def random_share(influence: list[torch.Tensor], fraction: float, seed: int = 0) -> list[list[int]]:
    """The control for ``top_share``: as many user positions per prompt, drawn at random."""
    gen = torch.Generator().manual_seed(seed)
    return [sorted(torch.randperm(len(s), generator=gen)[: len(p)].tolist())
            for s, p in zip(influence, top_share(influence, fraction))]


@contextmanager
def soft_removal(model: nn.Module, tok, prompts: list[str], positions: list[list[int]], scale: float) -> Iterator[None]:
    """Inside the block, the input embeddings of each prompt's user ``positions`` are multiplied by
    ``scale`` in every forward pass that starts on that prompt (scoring, generation, ``harmless_cost``),
    wherever it sits in a padded batch. Other prompts, and tokens generated after the prompt, are untouched."""
    targets = targets_for(tok, prompts, positions)
    user_start = user_span(tok, "x")[1].start
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    rows: list[tuple[int, int]] = []  # (row, absolute position) to shrink in the current forward pass

    def find(_module, _args, kwargs):
        rows.clear()
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if ids is None or (mask is not None and mask.dim() != 2):
            return  # embeddings given directly, or the refusal openings' step after the prompt
        # a generation step after the prompt finds no user tokens; the rest of a prompt after its cached
        # chat opening (``models.prompt_forward``) finds them where they are
        for r, start, user in _user_rows(user_start, end_id, ids, mask):
            rows.extend((r, start + i) for i in targets.get(user, []))

    def shrink(_module, _inputs, out):
        if not rows:
            return None
        out = out.clone()
        r, p = zip(*rows)
        out[list(r), list(p)] *= scale
        return out

    # the chat opening before the user's tokens is never edited: it may run once for a whole batch
    with removed_after([model.register_forward_pre_hook(keeps_opening(find, user_start), with_kwargs=True),
                        model.get_input_embeddings().register_forward_hook(keeps_opening(shrink, user_start))]):
        yield


@contextmanager
def highlighted(model: nn.Module, tok, prompts: list[str], fraction: float = HIGHLIGHT_FRACTION,
                scale: float = HIGHLIGHT_SCALE) -> Iterator[list[list[int]]]:
    """Token Highlighter (Hu et al., 2025) on ``prompts``: the top ``fraction`` of each prompt's user
    tokens by affirmation influence are soft-removed (embeddings times ``scale``) inside the block.
    Yields the positions it shrinks."""
    positions = top_share(affirmation_influence(model, tok, prompts), fraction)
    with soft_removal(model, tok, prompts, positions, scale):
        yield positions
