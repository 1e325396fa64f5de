"""Act on a direction in the residual stream: remove it everywhere, add it at one layer, add it only
when the harmfulness probe fires, or bake a change along it into the weights.

The context managers put torch forward hooks on the model and take them off on exit, so any
measurement (``refusal_score``, ``generate``, ``harmless_cost``) runs unchanged inside them.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .directions import (
    ADD_TARGET,
    CANDIDATE_LAYERS,
    COEFFICIENTS,
    Gate,
    RefusalDirection,
    diff_in_means,
    last_token_activations,
)
from .models import decoder_layers, pointwise, removed_after, residual
from .refusal import refusal_score

#: ``edit_direction`` scale that strengthens refusal in the inference chapter. Chosen on train
#: prompts among 1.25, 1.5 and 2: the one that most raises refusal of jailbreak-wrapped harmful
#: prompts over the mean refusal of harmless and borderline ones.
STRENGTHEN_SCALE = 1.25


def unit(direction: torch.Tensor) -> torch.Tensor:
    """``direction`` scaled to length 1 (float32)."""
    direction = direction.float()
    return direction / direction.norm()


def random_like(direction: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A random direction with the same norm as ``direction``: the control for every edit."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(direction.shape, generator=gen)
    return noise / noise.norm() * direction.float().norm()


def writers(model: nn.Module) -> list[nn.Module]:
    """The modules that write into the residual stream: embeddings, then each attention and MLP."""
    blocks = decoder_layers(model)
    return [model.get_input_embeddings()] + [m for b in blocks for m in (b.self_attn, b.mlp)]


def _replace(out, new: torch.Tensor):
    return (new, *out[1:]) if isinstance(out, tuple) else new


@contextmanager
def ablate_direction(model: nn.Module, direction: torch.Tensor) -> Iterator[None]:
    """Project ``direction`` out of every write to the residual stream (directional ablation,
    Arditi et al. 2024), so that no layer can read it: is the direction *necessary* for refusal?"""
    r = unit(direction)

    @pointwise
    def project(_module, _inputs, out):
        x = residual(out)
        return _replace(out, x - (x @ r.to(x.dtype))[..., None] * r.to(x.dtype))

    with removed_after([m.register_forward_hook(project) for m in writers(model)]):
        yield


@contextmanager
def add_direction(model: nn.Module, direction: torch.Tensor, layer: int, coefficient: float = 1.0) -> Iterator[None]:
    """Add ``coefficient * direction`` to the residual stream after ``layer`` at every position
    (activation addition): is the direction *sufficient* for refusal?"""
    shift = coefficient * direction.float()

    @pointwise
    def add(_module, _inputs, out):
        x = residual(out)
        return _replace(out, x + shift.to(x.dtype))

    with removed_after([decoder_layers(model)[layer].register_forward_hook(add)]):
        yield


def conditionally_steered(
    model: nn.Module, tok, prompts: list[str], gate: Gate, direction: torch.Tensor, layer: int, coefficient: float,
    measure: Callable[[nn.Module, object, list[str]], list],
) -> tuple[list, np.ndarray]:
    """Conditional activation steering in the manner of CAST (Lee et al., 2024), with the refusal
    direction as the behaviour: ``measure(model, tok, prompts)`` (a refusal score, or answers) where
    each prompt that ``gate`` reads as harmful gets ``coefficient * direction`` added after ``layer``,
    and every other prompt has the direction ablated from every layer.

    The condition is read from the unsteered model first, so the ablation cannot blind it. Returns
    the measurements in the order of ``prompts`` and the gate's decision for each.
    """
    flags = gate.flags(model, tok, prompts)
    out: list = [None] * len(prompts)
    for harmful, edit in ((True, lambda: add_direction(model, direction, layer, coefficient)),
                          (False, lambda: ablate_direction(model, direction))):
        rows = [i for i, f in enumerate(flags) if bool(f) == harmful]
        if rows:
            with edit():
                for i, value in zip(rows, measure(model, tok, [prompts[i] for i in rows])):
                    out[i] = value
    return out, flags


@contextmanager
def scale_features(
    model: nn.Module, layer: int, encoder: torch.Tensor, enc_bias: torch.Tensor, decoder: torch.Tensor,
    features: list[int], scale: float = 0.0,
) -> Iterator[None]:
    """Multiply chosen sparse-autoencoder features by ``scale`` (0 removes them) in the residual
    stream after ``layer``: the stream moves by ``(scale - 1) * activation * decoder row``.

    ``encoder`` is ``[d_model, n_features]``, ``decoder`` ``[n_features, d_model]``; the SAE's
    reconstruction error is left in place, so only the chosen features change.
    """
    idx = torch.tensor(features)

    @pointwise
    def edit(_module, _inputs, out):
        x = residual(out)
        acts = torch.relu(x @ encoder[:, idx] + enc_bias[idx])
        return _replace(out, x + (scale - 1) * acts @ decoder[idx])

    with removed_after([decoder_layers(model)[layer].register_forward_hook(edit)]):
        yield


def _edit_writers(model: nn.Module, r: torch.Tensor, scale: float) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
    """Multiply the component along unit ``r`` of every residual-stream writer's output by ``scale``,
    in place; return what undoing it needs: (weight, its old component along r, is_embedding)."""
    undo = []
    emb = model.get_input_embeddings().weight
    along = emb @ r
    undo.append((emb, along, True))
    emb += (scale - 1) * along[:, None] * r
    for block in decoder_layers(model):
        for lin in (block.self_attn.o_proj, block.mlp.down_proj):
            along = r @ lin.weight
            undo.append((lin.weight, along, False))
            lin.weight += (scale - 1) * torch.outer(r, along)
    return undo


def _untie(model: nn.Module) -> bool:
    """Give the output embedding its own copy of tied weights (so editing the input embedding leaves
    the unembedding as it was); return whether they were tied."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or out.weight.data_ptr() != inp.weight.data_ptr():
        return False
    out.weight = nn.Parameter(inp.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    return True


@torch.no_grad()
def edit_direction(model: nn.Module, direction: torch.Tensor, scale: float = 0.0) -> nn.Module:
    """A copy of ``model`` whose every write to the residual stream has its component along
    ``direction`` multiplied by ``scale``: 0 is weight orthogonalization (ablation baked into the
    weights, shippable as an ordinary model file), above 1 amplifies the direction.

    ``W ← W + (scale - 1) r rᵀ W`` for attention and MLP output matrices, and the same for the
    embedding rows; tied input/output embeddings are untied first so the unembedding is unchanged.
    """
    edited = copy.deepcopy(model)
    _untie(edited)
    _edit_writers(edited, unit(direction), scale)
    return edited


@contextmanager
def edited_in_place(model: nn.Module, direction: torch.Tensor, scale: float = 0.0) -> Iterator[nn.Module]:
    """``edit_direction`` applied to ``model`` itself and undone on exit, for when a second copy of
    the model does not fit in memory. Undoing adds back each matrix's old component along the
    direction (kept as one vector per matrix), so the weights come back up to float rounding."""
    r = unit(direction)
    with torch.no_grad():
        tied = _untie(model)
        undo = _edit_writers(model, r, scale)
    try:
        yield model
    finally:
        with torch.no_grad():
            for weight, along, is_embedding in undo:
                now = weight @ r if is_embedding else r @ weight
                if is_embedding:
                    weight += (along - now)[:, None] * r
                else:
                    weight += torch.outer(r, along - now)
            if tied:
                model.get_output_embeddings().weight = model.get_input_embeddings().weight
                model.config.tie_word_embeddings = True


def select_refusal_direction(
    model: nn.Module, tok, harmful: list[str], harmless: list[str], n_select: int = 32, target: float = ADD_TARGET,
) -> RefusalDirection:
    """The refusal direction of ``model`` from train prompts only (see ``RefusalDirection``): the
    difference in means at every layer; the layer whose direction, ablated everywhere, most lowers
    refusal of ``n_select`` harmful prompts; the smallest coefficient that, added after that layer,
    makes ``n_select`` harmless prompts refused at least ``target``."""
    means = diff_in_means(last_token_activations(model, tok, harmful), last_token_activations(model, tok, harmless))
    select_harmful, select_harmless = harmful[:n_select], harmless[:n_select]
    ablated = {}
    for layer in CANDIDATE_LAYERS:
        with ablate_direction(model, means[layer]):
            ablated[str(layer)] = float(np.mean(refusal_score(model, tok, select_harmful)))
    layer = int(min(ablated, key=ablated.get))
    added = {}
    for coefficient in COEFFICIENTS:
        with add_direction(model, means[layer], layer, coefficient):
            added[str(coefficient)] = float(np.mean(refusal_score(model, tok, select_harmless)))
        if added[str(coefficient)] >= target:
            break
    return RefusalDirection(layer, means[layer].tolist(), float(coefficient), ablated, added)


#: Arditi et al.'s filters on a candidate refusal direction: ablating it may move harmless prompts'
#: next-token distribution (at the last prompt token) by at most this KL divergence, in nats ...
RECIPE_KL = 0.1
#: ... added once after its layer, it must make harmless prompts refused above this mean score ...
RECIPE_INDUCE = 0.5
#: ... and candidates from layers at or past this fraction of the depth are left out.
RECIPE_DEPTH = 0.8


@dataclass
class RecipeScreen:
    """Every candidate refusal direction that Arditi et al.'s recipe screens, scored on train prompts.

    ``layers`` × ``positions`` candidates (positions count back from the last prompt token: -1 is
    the last); each array is ``[layer, position]``. ``ablated``: mean refusal of the harmful
    selection prompts with the candidate ablated everywhere. ``kl``: mean KL divergence of the
    harmless selection prompts' next-token distribution, unedited to ablated. ``induced``: mean
    refusal of the harmless selection prompts with the candidate added after its layer (NaN where
    the KL filter already failed it). All three are NaN for the candidates of excluded layers that were
    not scored. ``chosen``: (layer, position) of the lowest ``ablated`` among
    the candidates that pass all three filters, or None if none does.
    """

    layers: list[int]
    positions: list[int]
    ablated: np.ndarray
    kl: np.ndarray
    induced: np.ndarray
    kl_bound: float
    excluded_from: int
    chosen: tuple[int, int] | None
    n_harmful: int = 0  #: prompts behind the means (the selection prompts are the first of them)
    n_harmless: int = 0

    def eligible(self) -> np.ndarray:
        """[layer, position]: which candidates pass the depth filter (their layer is before ``excluded_from``)."""
        shallow = np.array([layer < self.excluded_from for layer in self.layers])[:, None]
        return shallow & np.ones(self.kl.shape, dtype=bool)

    def passes(self) -> np.ndarray:
        """[layer, position]: which candidates pass the KL, induce and depth filters."""
        with np.errstate(invalid="ignore"):
            return (self.kl < self.kl_bound) & (self.induced > RECIPE_INDUCE) & self.eligible()


@torch.no_grad()
def _next_token_logprobs(model: nn.Module, tok, prompts: list[str], batch_size: int = 32) -> torch.Tensor:
    """log P(next token) after each prompt's chat template: ``[prompt, vocab]``, in prompt order."""
    from .models import by_length, encode_chats, prompt_forward

    order = by_length(tok, prompts)
    out = torch.empty(len(prompts), model.config.vocab_size)
    for start in range(0, len(prompts), batch_size):
        members = order[start : start + batch_size]
        o, _ = prompt_forward(model, encode_chats(tok, [prompts[i] for i in members]))
        out[members] = o.logits[:, -1].float().log_softmax(-1)
    return out


def screen_refusal_candidates(
    model: nn.Module, tok, harmful: list[str], harmless: list[str], n_select: int = 16,
    kl_bound: float = RECIPE_KL, depth: float = RECIPE_DEPTH, layers: list[int] | None = None,
    also: tuple[int, int] | None = None,
) -> tuple[RecipeScreen, torch.Tensor]:
    """Arditi et al.'s selection of the refusal direction, on train prompts only.

    A candidate is the difference in means between ``harmful`` and ``harmless`` prompts at one layer
    and one post-instruction position (the template's tokens after the user's words). Each is ablated
    everywhere on ``n_select`` harmful and ``n_select`` harmless prompts (refusal; KL of the next-token
    distribution), and, where the KL filter passes, added after its layer on the harmless ones (does
    it induce refusal, above ``RECIPE_INDUCE``?). Layers at or past ``depth`` of the model are left
    out of the choice, and not scored (NaN), except the candidate ``also`` ((layer, position): a
    direction in use, to compare with the ones screened). The prompts that pick the means
    should be ones the model refuses (``harmful``) and answers (``harmless``). Returns the screen and
    the candidates' vectors ``[layer, position, d_model]``.
    """
    from .directions import end_activations, post_instruction_length

    n_layers = len(decoder_layers(model))
    layers = list(range(n_layers)) if layers is None else layers
    n_pos = post_instruction_length(tok)
    means = (end_activations(model, tok, harmful, n_pos, layers).mean(2)
             - end_activations(model, tok, harmless, n_pos, layers).mean(2))
    select_harmful, select_harmless = harmful[:n_select], harmless[:n_select]
    reference = _next_token_logprobs(model, tok, select_harmless)
    shape = (len(layers), n_pos)
    ablated, kl, induced = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan)
    excluded_from = int(np.ceil(depth * n_layers))
    for i, layer in enumerate(layers):
        for j in range(n_pos):
            if layer >= excluded_from and also != (layer, j - n_pos):
                continue
            with ablate_direction(model, means[i, j]):
                ablated[i, j] = np.mean(refusal_score(model, tok, select_harmful))
                edited = _next_token_logprobs(model, tok, select_harmless)
            kl[i, j] = float((reference.exp() * (reference - edited)).sum(-1).mean())
            if kl[i, j] < kl_bound:
                with add_direction(model, means[i, j], layer):
                    induced[i, j] = np.mean(refusal_score(model, tok, select_harmless))
    screen = RecipeScreen(layers, list(range(-n_pos, 0)), ablated, kl, induced, kl_bound, excluded_from, None,
                          len(harmful), len(harmless))
    ok = screen.passes()
    if ok.any():
        i, j = np.unravel_index(np.where(ok, ablated, np.inf).argmin(), shape)
        screen.chosen = (layers[i], screen.positions[j])
    return screen, means
