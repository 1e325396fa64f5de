"""Token-level tools for the input-stage chapter: a differentiable refusal score, and attention
steering (PASTA / AtMan style) that any library measurement runs under unchanged.

``log_refusal`` is ``refusal.refusal_score`` rewritten to start from input embeddings, so that
gradients reach every input token. ``steerable`` switches a model to an eager attention that adds
a bias to the pre-softmax scores of chosen keys in chosen heads; ``steering`` sets that bias for
the duration of a block, either by hand or per prompt from the prompt's own tokens.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .models import chat_text
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


def log_refusal(model: nn.Module, tok, embeds: torch.Tensor) -> torch.Tensor:
    """log P(the answer opens with a refusal) for ``embeds`` ``[batch, tokens, d_model]``: a batch of
    equal-length chat prompts given as input embeddings (no padding). Differentiable.

    The same quantity as ``refusal_score``: the prompt is run once and one more step reads every
    opening from its key-value cache (``refusal.OpeningTree``); gradients flow through the cache.
    """
    batch, width = embeds.shape[:2]
    out = model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
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
        mask = kwargs.get("attention_mask")
        bias = torch.zeros(ids.shape)
        for r, row in enumerate(ids.tolist()):
            start = (0 if mask is None else int((mask[r] == 0).sum())) + state.user_start
            stop = row.index(state.end_id, start) if state.end_id in row[start:] else len(row)
            for i in state.targets.get(tuple(row[start:stop]), []):
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
    model.register_forward_pre_hook(_bias_from_targets(state), with_kwargs=True)
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
    try:
        yield state
    finally:
        state.gate = state.bias = state.targets = None
        state.strength = 0.0


def targets_for(tok, prompts: list[str], positions: list[list[int]]) -> dict[tuple[int, ...], list[int]]:
    """Steering targets: each prompt's user token ids -> the user positions to bias."""
    return {tuple(tok(p, add_special_tokens=False).input_ids): list(pos) for p, pos in zip(prompts, positions)}
