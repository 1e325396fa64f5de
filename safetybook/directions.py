"""What the residual stream says about a prompt: activations, difference-in-means directions,
and linear probes (the harmfulness probe is shared by the inference and generation chapters)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from .cache import cache_dir, digest, read_json, write_json
from .models import decoder_layers, encode_chats, residual


@torch.no_grad()
def last_token_activations(
    model: nn.Module, tok, prompts: list[str], layers: list[int] | None = None, batch_size: int = 16,
    system: str | None = None,
) -> torch.Tensor:
    """Residual stream after each layer at the last prompt token: ``[layer, prompt, d_model]``.

    The last token of the chat template (the newline after ``assistant``) is where the model
    decides how to open its answer.
    """
    blocks = decoder_layers(model)
    layers = list(range(len(blocks))) if layers is None else layers
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        blocks[i].register_forward_hook(lambda _m, _in, out, i=i: captured.__setitem__(i, residual(out)[:, -1]))
        for i in layers
    ]
    chunks = []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = encode_chats(tok, prompts[start : start + batch_size], system)
            model(**enc, logits_to_keep=1)
            chunks.append(torch.stack([captured[i].float() for i in layers]))
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(chunks, dim=1)


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


def harm_probe(model_name: str = "base", layer: int = 12) -> Probe:
    """The book's harmfulness probe at ``layer`` of ``model_name``: harmful train prompts, plain and
    jailbreak-wrapped, against harmless ones (plain and wrapped, so that the wrapper alone is no
    cue) and borderline ones. Trained once, cached as JSON (never pickle)."""
    from .data import prompts, wrap
    from .models import load_model

    harmful, harmless = prompts("harmful", "train"), prompts("harmless", "train")
    positive = harmful + wrap(harmful, "train")
    negative = harmless + wrap(harmless, "train") + prompts("borderline", "train")
    path = cache_dir("probes") / f"harm-{model_name}-L{layer}-{digest(positive, negative)}.json"
    cached = read_json(path)
    if cached is not None:
        return Probe(**cached)
    model, tok = load_model(model_name)
    pos = last_token_activations(model, tok, positive, [layer])[0]
    neg = last_token_activations(model, tok, negative, [layer])[0]
    probe = fit_probe(layer, pos, neg)
    write_json(path, asdict(probe))
    return probe
