"""Training-data attribution for the LoRA safety fine-tune: TracIn and a similarity baseline.

TracIn {Pruthi et al. 2020} scores a training example ``z`` for a query ``q`` by how much the
training steps on ``z`` lowered the query's loss: ``sum_c lr_c * grad L(z; θ_c) · grad L(q; θ_c)``
over saved checkpoints ``θ_c``, with gradients over the LoRA parameters only. Per-example
gradients come from one batched backward pass: a linear layer's weight gradient for one example
is ``sum_t grad_out_t ⊗ input_t`` over that example's tokens, read off with hooks.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .adapters import Example, encode_example
from .frozen import first_lora_layer, lower_states, upper_losses
from .models import load_tokenizer, trim_heap


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
        row = 0
        for grads in per_example_grads(model, tok, train, batch_size):
            n = next(iter(grads.values())).shape[0]
            scores[row : row + n] += lr * sum(torch.einsum("boi,qoi->bq", g, query_grads[k]) for k, g in grads.items())
            row += n
            del grads
            trim_heap()
        del query_grads
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
