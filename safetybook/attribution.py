"""Training-data attribution for the LoRA safety fine-tune: TracIn and a similarity baseline.

TracIn {Pruthi et al. 2020} scores a training example ``z`` for a query ``q`` by how much the
training steps on ``z`` lowered the query's loss: ``sum_c lr_c * grad L(z; θ_c) · grad L(q; θ_c)``
over saved checkpoints ``θ_c``, with gradients over the LoRA parameters only. Per-example
gradients come from one batched backward pass: a linear layer's weight gradient for one example
is ``sum_t grad_out_t ⊗ input_t`` over that example's tokens, read off with hooks.

A query's loss can be a fixed answer string (``tracin``) or the refusal score itself
(``refusal_attribution``): ``-log P(the answer opens with any refusal opening)``. With a fixed string,
the training examples whose target is that very string dominate the scores whatever the query is;
the refusal score treats every refusal alike. ``refusal_attribution`` also gives an anchored
gradient cosine (after He et al., 2024): the cosine with the query's gradient once the mean
direction of harmful prompts' refusal gradients is projected out of it, so that the refusal mode
they all share cancels.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .adapters import Example, encode_example
from .frozen import first_lora_layer, lower_states, shared_prefix_losses, upper_losses
from .models import chat_text, load_tokenizer, trim_heap


def checkpoints(folder: Path) -> list[tuple[Path, float]]:
    """The saved LoRA checkpoints of an adapter folder, with the learning rate used after each."""
    from safetensors import safe_open

    out = []
    for path in sorted((folder / "checkpoints").glob("step-*.safetensors")):
        with safe_open(path, "pt") as f:
            out.append((path, float(f.metadata()["lr"])))
    return out


def load_checkpoint(model: nn.Module, path: Path) -> None:
    """Copy a checkpoint's LoRA weights into a LoRA model built with the same settings."""
    from safetensors.torch import load_file

    state = load_file(path)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def _lora_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".lora_" in n}


def per_example_grads(model: nn.Module, tok, examples: list[Example], batch_size: int = 4):
    """Yield, per batch, ``{module name: [batch, out, in]}`` gradients of each example's mean
    answer-token loss with respect to every LoRA weight matrix. Layers below the first LoRA layer carry no
    LoRA weights: their output is computed once per example and reused (``frozen.py``)."""
    linears = _lora_linears(model)
    lower = lower_states(model, first_lora_layer(model))
    inputs: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}

    def outer(name, grad):
        # each module's gradient is formed as soon as its output's gradient is known, and its input is
        # let go: the batch never holds every module's input and output gradient at once
        grads[name] = torch.einsum("bto,bti->boi", grad.detach(), inputs.pop(name))

    def keep(name):
        def hook(_module, args, out):
            inputs[name] = args[0].detach()
            out.register_hook(lambda grad: outer(name, grad))

        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in linears.items()]
    try:
        for first in range(0, len(examples), batch_size):
            batch = examples[first : first + batch_size]
            per_example = upper_losses(model, lower, [encode_example(tok, e) for e in batch])
            model.zero_grad(set_to_none=True)
            per_example.sum().backward()
            yield {n: grads.pop(n) for n in linears}  # not bound to a name: the caller alone holds the batch
    finally:
        for h in hooks:
            h.remove()


def by_length(tok, examples: list[Example]) -> list[int]:
    """The order that batches ``examples`` with the least padding: shortest token sequence first (stable).
    A batch runs to its longest sequence, so mixed lengths pay for padding that sorted ones do not."""
    return sorted(range(len(examples)), key=lambda i: len(encode_example(tok, examples[i])[0]))


def tracin(
    model: nn.Module, saved: list[tuple[Path, float]], train: list[Example], queries: list[Example],
    batch_size: int = 4,
) -> torch.Tensor:
    """TracIn scores ``[train, query]`` of a LoRA ``model`` over checkpoints ``saved``: positive
    means the training steps on the example lowered the query's loss (for a query whose target is
    a refusal: made the model more likely to refuse it).

    ``model`` is used up: its frozen layers below the adapters are freed once their outputs for
    ``train`` and ``queries`` are computed. The scores do not depend on ``batch_size`` (to 1e-5 relative).
    A batch's backward pass holds every upper layer's activations, so the batch size trades time
    for memory. Measured on 48 training examples × 28 queries, one checkpoint, 2 cores: batch 2
    took 45 s at 1.46 GB peak, batch 4 33 s at 1.73 GB, batch 8 was no faster than 4 and peaked at 1.97 GB.
    The heap is trimmed after each batch, since sequences of varying length leave it fragmented.
    """
    tok = load_tokenizer()
    lower_states(model, first_lora_layer(model)).release([encode_example(tok, e)[0] for e in train + queries])
    model.train()
    scores = torch.zeros(len(train), len(queries))
    for path, lr in saved:
        load_checkpoint(model, path)
        stacked = _stack(per_example_grads(model, tok, queries, batch_size))
        query_grads = {n: torch.cat(stacked.pop(n)) for n in list(stacked)}  # one module's copy at a time
        order, row = by_length(tok, train), 0
        for grads in per_example_grads(model, tok, [train[i] for i in order], batch_size):
            n = next(iter(grads.values())).shape[0]
            rows = order[row : row + n]
            scores[rows] += lr * sum(torch.einsum("boi,qoi->bq", g, query_grads[k]) for k, g in grads.items())
            row += n
            del grads
            trim_heap()
        del query_grads
    model.zero_grad(set_to_none=True)
    model.eval()
    return scores


def refusal_rows(tok, prompt: str) -> list[tuple[list[int], list[int]]]:
    """One (token ids, labels) row per refusal opening: the chat prompt followed by that opening, with
    only the opening scored."""
    from .refusal import opening_ids

    context = tok(chat_text(tok, prompt), add_special_tokens=False).input_ids
    return [(context + o, [-100] * len(context) + o) for o in opening_ids(tok)]


def refusal_loss(model: nn.Module, lower, tok, prompt: str) -> torch.Tensor:
    """``-log P(refusal)`` for ``prompt``, differentiable in the LoRA weights: the log of the summed
    probability of every refusal opening (``refusal.refusal_score``), run on the upper layers. The prompt
    runs once; each opening attends to its keys and values (``frozen.shared_prefix_losses``)."""
    rows = refusal_rows(tok, prompt)
    lengths = torch.tensor([sum(t != -100 for t in labels) for _, labels in rows], dtype=torch.float32)
    logp = -shared_prefix_losses(model, lower, rows) * lengths  # log P(opening) = -(mean loss x its tokens)
    return -torch.logsumexp(logp, 0)


def _refusal_grads(model: nn.Module, lower, tok, prompts: list[str]) -> dict[str, torch.Tensor]:
    """``{module: [prompt, out, in]}``: the gradient of each prompt's ``refusal_loss``, one backward each
    (a prompt's eleven openings share its forward pass, so a prompt costs about one training example)."""
    linears = _lora_linears(model)
    out: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    for prompt in prompts:
        model.zero_grad(set_to_none=True)
        refusal_loss(model, lower, tok, prompt).backward()
        for n, m in linears.items():
            out[n].append(m.weight.grad.detach().clone())
    model.zero_grad(set_to_none=True)
    return {n: torch.stack(g) for n, g in out.items()}


def _norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's gradient norm over all modules."""
    return sum(g.pow(2).flatten(1).sum(1) for g in grads.values()).sqrt()


def refusal_attribution(
    model: nn.Module, saved: list[tuple[Path, float]], train: list[Example], queries: list[str],
    anchor: list[str], strings: list[list[Example]] = (), batch_size: int = 4,
) -> dict[str, torch.Tensor]:
    """Gradient attribution of ``train`` examples for refusing ``queries``, three ways, from one pass:

    - ``"tracin"`` ``[train, query]``: TracIn whose query loss is the whole refusal score,
      ``sum_c lr_c * g_z · g_q`` with ``g_q`` the gradient of ``refusal_loss``;
    - ``"anchored"`` ``[train, query]``: ``sum_c lr_c * cos(g_z, u_q)``, where ``u_q`` is the query's
      unit gradient with the anchor direction ``a`` projected out, ``a`` being the mean of the unit
      refusal gradients of the ``anchor`` prompts (harmful prompts the model rightly refuses): the
      refusal mode every refusal shares cancels, and what is left is the query's own (after He et
      al., 2024). A query that lies along ``a`` entirely has nothing of its own: its scores are 0;
    - ``"strings"`` ``[train, column]``: plain TracIn with fixed answer targets, each column the summed
      query gradients of one list in ``strings`` (TracIn is linear in the query: a column of all the
      queries gives their summed blame at the memory of one).

    Positive scores mean: training on ``z`` made a refusal more likely. ``model`` is used up as in
    ``tracin``. A query or an anchor prompt costs about one training example (its openings share
    one forward pass); the training chapter prints the time of the whole pass.
    """
    tok = load_tokenizer()
    lower = lower_states(model, first_lora_layer(model))
    flat = [e for column in strings for e in column]
    rows = [ids for p in queries + anchor for ids, _ in refusal_rows(tok, p)]
    lower.release([encode_example(tok, e)[0] for e in train + flat] + rows)
    model.train()
    scores = {"tracin": torch.zeros(len(train), len(queries)), "anchored": torch.zeros(len(train), len(queries)),
              "strings": torch.zeros(len(train), len(strings))}
    for path, lr in saved:
        load_checkpoint(model, path)
        query = _refusal_grads(model, lower, tok, queries)
        query_norm = _norms(query)
        anchors = _refusal_grads(model, lower, tok, anchor)
        anchor_norm = _norms(anchors)
        unit = {n: g / anchor_norm[:, None, None] for n, g in anchors.items()}
        mean = {n: g.mean(0, keepdim=True) for n, g in unit.items()}
        mean = {n: g / _norms(mean) for n, g in mean.items()}  # the anchor direction, of unit norm
        del anchors, unit
        columns = {n: [] for n in query}
        for column in strings:
            summed = None
            for grads in per_example_grads(model, tok, column, batch_size):
                part = {n: g.sum(0, keepdim=True) for n, g in grads.items()}
                summed = part if summed is None else {n: summed[n] + part[n] for n in part}
            for n, kept in columns.items():
                kept.append(summed[n])
        # each query's cosine with the anchor, and the norm of what is left of its unit gradient without it
        along = sum((query[n].double() * mean[n].double()).flatten(1).sum(1) for n in query) / query_norm.double()
        own = (1 - along.pow(2)).clamp(min=0).sqrt()
        along, own = along.float(), torch.where(own > 1e-3, own, torch.inf).float()  # nothing of its own: 0
        stacked = {n: torch.cat([query[n], mean[n], *columns[n]]) for n in query}  # one product per module
        del query, mean, columns
        order, row = by_length(tok, train), 0  # batched by length; each row goes back to its example
        for grads in per_example_grads(model, tok, [train[i] for i in order], batch_size):
            n = next(iter(grads.values())).shape[0]
            rows = order[row : row + n]
            norm = _norms(grads)
            dots = sum(torch.einsum("boi,qoi->bq", g, stacked[k]) for k, g in grads.items())
            q = len(queries)
            scores["tracin"][rows] += lr * dots[:, :q]
            # g_z · (unit g_q - along · a) / (|g_z| · own): the cosine with the query's own direction
            projected = dots[:, :q] / query_norm - along * dots[:, q : q + 1]
            scores["anchored"][rows] += lr * projected / (norm[:, None] * own)
            scores["strings"][rows] += lr * dots[:, q + 1 :]
            row += n
            del grads
            trim_heap()
        del stacked
    model.zero_grad(set_to_none=True)
    model.eval()
    return scores


def _stack(batches) -> dict[str, list[torch.Tensor]]:
    out: dict[str, list[torch.Tensor]] = {}
    for grads in batches:
        for name, g in grads.items():
            out.setdefault(name, []).append(g)
    return out


def similarity(model: nn.Module, tok, train: list[str], queries: list[str], layer: int) -> torch.Tensor:
    """Representation-similarity baseline ``[train, query]``: cosine similarity of last-token
    activations at ``layer``, after subtracting the training set's mean activation."""
    return similarities(model, tok, train, queries, [layer])[layer]


@torch.no_grad()
def similarities(model: nn.Module, tok, train: list[str], queries: list[str], layers: list[int]) -> dict[int, torch.Tensor]:
    """``similarity`` at each of ``layers``, from one forward pass over the prompts."""
    from .directions import last_token_activations

    out = {}
    for layer, acts in zip(layers, last_token_activations(model, tok, train + queries, list(layers))):
        acts = acts - acts[: len(train)].mean(0)
        acts = acts / acts.norm(dim=-1, keepdim=True)
        out[layer] = acts[: len(train)] @ acts[len(train) :].T
    return out
