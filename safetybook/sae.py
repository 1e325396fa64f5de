"""A small sparse autoencoder (SAE) on one layer's residual stream, trained on CPU in seconds.

The SAE rewrites an activation ``x`` as a sparse, non-negative combination of learned directions
(its *features*): ``f = relu((x·s - b_dec) W_enc + b_enc)``, ``x·s ≈ f W_dec + b_dec``, where
``s`` rescales activations to a mean squared (centred) norm of ``d_model``. The loss is the
reconstruction error plus an L1 penalty on ``f`` weighted by each decoder row's norm (Bricken et
al. 2023; Templeton et al. 2024). Weights are cached as safetensors (never pickle).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .cache import atomic_dir, cache_dir, digest, locked


@dataclass(frozen=True)
class SaeSettings:
    """Everything that decides a trained SAE besides its data (part of the cache key)."""

    n_features: int = 1024
    l1: float = 2.0
    steps: int = 600
    batch_size: int = 256
    learning_rate: float = 3e-3
    seed: int = 0


class SparseAutoencoder(nn.Module):
    """Encoder ``[d_model, n_features]``, decoder ``[n_features, d_model]``, and their biases."""

    def __init__(self, d_model: int, n_features: int, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        decoder = torch.randn(n_features, d_model, generator=gen)
        decoder = decoder / decoder.norm(dim=1, keepdim=True) * 0.1
        self.W_dec = nn.Parameter(decoder)
        self.W_enc = nn.Parameter(decoder.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(n_features))
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        self.register_buffer("scale", torch.tensor(1.0))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``[..., n_features]`` of residual activations ``[..., d_model]``."""
        return torch.relu((x * self.scale - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """The residual activation (in the model's units) that features ``f`` reconstruct."""
        return (f @ self.W_dec + self.b_dec) / self.scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reconstruction of ``x`` and its features."""
        f = self.encode(x)
        return self.decode(f), f

    def hook_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(encoder, enc_bias, decoder)`` in the residual stream's own units, with the input
        scale and decoder bias folded in: ``encode(x) == relu(x @ encoder + enc_bias)`` and a
        feature's contribution to ``x`` is ``f * decoder[i]`` (the form ``scale_features`` takes)."""
        with torch.no_grad():
            encoder = self.W_enc * self.scale
            enc_bias = self.b_enc - self.b_dec @ self.W_enc
            decoder = self.W_dec / self.scale
        return encoder.detach().clone(), enc_bias.detach().clone(), decoder.detach().clone()


def _loss(sae: SparseAutoencoder, x: torch.Tensor, l1: float) -> tuple[torch.Tensor, torch.Tensor]:
    target = x * sae.scale
    f = sae.encode(x)
    recon = f @ sae.W_dec + sae.b_dec
    mse = (recon - target).pow(2).sum(-1).mean()
    sparsity = (f * sae.W_dec.norm(dim=1)).sum(-1).mean()
    return mse + l1 * sparsity, mse


def train_sae(acts: torch.Tensor, settings: SaeSettings = SaeSettings()) -> tuple[SparseAutoencoder, list[float]]:
    """Train an SAE on activations ``[n, d_model]``; return it and the reconstruction loss per step.

    Activations are rescaled so that their mean squared distance from their mean is ``d_model``,
    which makes the L1 coefficient mean the same thing at every layer (the residual stream's
    large constant components would otherwise set the scale). The decoder bias starts at the mean.
    """
    acts = acts.float()
    n, d = acts.shape
    sae = SparseAutoencoder(d, settings.n_features, settings.seed)
    with torch.no_grad():
        sae.scale.fill_(float((d / (acts - acts.mean(0)).pow(2).sum(-1).mean()).sqrt()))
        sae.b_dec.copy_(acts.mean(0) * sae.scale)
    opt = torch.optim.Adam(sae.parameters(), lr=settings.learning_rate)
    gen = torch.Generator().manual_seed(settings.seed)
    history = []
    for step in range(settings.steps):
        batch = acts[torch.randint(n, (settings.batch_size,), generator=gen)]
        warm = min(1.0, (step + 1) / (settings.steps * 0.2))  # ramp the L1 penalty up over 20% of steps
        loss, mse = _loss(sae, batch, settings.l1 * warm)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(mse.detach()))
    return sae.eval().requires_grad_(False), history


@torch.no_grad()
def fraction_unexplained(sae: SparseAutoencoder, acts: torch.Tensor) -> float:
    """Fraction of the variance of ``acts`` that the SAE's reconstruction misses (FVU)."""
    recon, _ = sae(acts.float())
    return float((recon - acts).pow(2).sum() / (acts - acts.mean(0)).pow(2).sum())


@torch.no_grad()
def mean_active(sae: SparseAutoencoder, acts: torch.Tensor) -> float:
    """Mean number of features active per activation (L0)."""
    return float((sae.encode(acts.float()) > 0).sum(-1).float().mean())


@torch.no_grad()
def spliced_losses(model: nn.Module, tok, sae: nn.Module, layer: int, texts: list[str], start: int) -> dict[str, float]:
    """How much of the model's behaviour the SAE keeps: the model's next-token loss (nats per token) on
    ``texts`` (each already in the chat template), over the tokens after position ``start``, three ways:

    - ``"clean"``: the model as it is;
    - ``"spliced"``: the residual stream after ``layer`` replaced by ``sae``'s reconstruction at every
      position from ``start`` on (the positions the SAE was trained on);
    - ``"zero"``: the same positions set to zero, the reference of a useless reconstruction.

    ``"recovered"`` is ``(zero - spliced) / (zero - clean)``: 1 when the reconstruction loses nothing
    the model needs, 0 when it is as bad as nothing. Each text runs alone (no padding)."""
    from .models import decoder_layers, residual

    how = {"mode": "clean"}

    def splice(_module, _inputs, out):
        if how["mode"] == "clean":
            return None
        x = residual(out).clone()
        part = x[:, start:]
        x[:, start:] = sae(part.float())[0].to(x.dtype) if how["mode"] == "spliced" else torch.zeros_like(part)
        return x if isinstance(out, torch.Tensor) else (x, *out[1:])

    totals = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    count = 0
    handle = decoder_layers(model)[layer].register_forward_hook(splice)
    try:
        for text in texts:
            ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
            targets = ids[0, start + 1 :]  # predicted from the positions start … end-1, all of them edited
            for mode in totals:
                how["mode"] = mode
                logits = model(input_ids=ids).logits[0, start:-1]
                totals[mode] += float(nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))
            count += len(targets)
    finally:
        handle.remove()
    out = {k: v / count for k, v in totals.items()}
    out["recovered"] = (out["zero"] - out["spliced"]) / (out["zero"] - out["clean"])
    return out


def save_sae(sae: SparseAutoencoder, folder: Path, settings: SaeSettings) -> None:
    """Write weights (safetensors) and settings (JSON) into ``folder``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sae.state_dict().items()}, str(folder / "sae.safetensors"))
    (folder / "settings.json").write_text(json.dumps(asdict(settings)))


def load_sae(folder: Path) -> SparseAutoencoder:
    """Read an SAE written by ``save_sae``."""
    from safetensors.torch import load_file

    state = load_file(str(folder / "sae.safetensors"))
    n_features, d_model = state["W_dec"].shape
    sae = SparseAutoencoder(d_model, n_features)
    sae.load_state_dict(state)
    return sae.eval().requires_grad_(False)


def cached_sae(acts: torch.Tensor, key: str, settings: SaeSettings = SaeSettings()) -> SparseAutoencoder:
    """The SAE for ``acts`` from the cache, or trained and cached (atomically, under a lock).

    ``key`` must name what produced ``acts`` (model weights, prompts, layer): the cache is looked
    up by it and the settings, not by the activations themselves.
    """
    path = cache_dir("sae") / f"sae-{digest(key, asdict(settings))}"
    with locked(path):
        if not (path / "sae.safetensors").exists():
            sae, _ = train_sae(acts, settings)
            with atomic_dir(path) as tmp:
                save_sae(sae, tmp, settings)
    return load_sae(path)
