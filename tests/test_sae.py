"""The sparse autoencoder, checked on synthetic activations with known sparse features."""
from __future__ import annotations

import pytest
import torch

from safetybook import sae as sae_module
from safetybook.interventions import scale_features
from safetybook.models import decoder_layers, encode_chats, residual
from safetybook.sae import (
    SaeSettings,
    SparseAutoencoder,
    cached_sae,
    fraction_unexplained,
    load_sae,
    mean_active,
    save_sae,
    spliced_losses,
    train_sae,
)


def planted(n: int = 4000, d: int = 16, k: int = 32, p: float = 0.05, seed: int = 1):
    """Activations that are sparse sums of ``k`` unit directions, plus an offset."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(k, d, generator=gen), dim=1)
    coef = (torch.rand(n, k, generator=gen) < p).float() * (0.5 + torch.rand(n, k, generator=gen))
    return coef @ dirs + 2.0, dirs, coef


SETTINGS = SaeSettings(n_features=64, l1=1.0, steps=800, batch_size=128, learning_rate=3e-3)


@pytest.fixture(scope="module")
def trained():
    x, dirs, coef = planted()
    sae, history = train_sae(x, SETTINGS)
    return sae, history, x, dirs, coef


def test_sae_recovers_planted_features(trained):
    sae, history, x, dirs, coef = trained
    cos = (torch.nn.functional.normalize(sae.W_dec, dim=1) @ dirs.T).abs().max(0).values
    assert (cos > 0.9).float().mean() > 0.8, "most planted directions should appear as decoder rows"
    assert history[-1] < history[0] / 5, "reconstruction loss should fall during training"
    assert fraction_unexplained(sae, x) < 0.2
    true_l0 = float((coef > 0).sum(-1).float().mean())
    assert mean_active(sae, x) < 4 * true_l0, "the L1 penalty should keep activations sparse"


def test_features_are_nonnegative_and_reconstruct_in_model_units(trained):
    sae, _, x, _, _ = trained
    recon, f = sae(x[:100])
    assert (f >= 0).all(), "features come out of a ReLU"
    assert (recon - x[:100]).norm() < 0.5 * (x[:100] - x.mean(0)).norm(), "decode must undo the input scale"


def test_hook_weights_match_encode(trained):
    sae, _, x, _, _ = trained
    encoder, enc_bias, decoder = sae.hook_weights()
    assert torch.allclose(torch.relu(x[:50] @ encoder + enc_bias), sae.encode(x[:50]), atol=1e-4), \
        "fold the input scale and the decoder bias into the encoder's weights and bias"
    f = sae.encode(x[:50])
    assert torch.allclose(f @ decoder + sae.b_dec / sae.scale, sae.decode(f), atol=1e-4)


def test_scale_is_set_from_the_data():
    x = torch.randn(500, 8) * 30 + 100
    sae, _ = train_sae(x, SaeSettings(n_features=16, steps=5, batch_size=32))
    scaled = ((x - x.mean(0)) * sae.scale).pow(2).sum(-1).mean()
    assert scaled == pytest.approx(8.0, rel=1e-3), "mean squared centred norm after scaling should be d_model"


def test_save_and_load_round_trip(tmp_path, trained):
    sae, _, x, _, _ = trained
    save_sae(sae, tmp_path / "s", SETTINGS)
    again = load_sae(tmp_path / "s")
    assert torch.equal(again.encode(x[:20]), sae.encode(x[:20]))
    assert (tmp_path / "s" / "sae.safetensors").exists()


def test_cached_sae_trains_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFETYBOOK_CACHE", str(tmp_path))
    x, _, _ = planted(n=300, d=8, k=8)
    settings = SaeSettings(n_features=16, steps=10, batch_size=32)
    first = cached_sae(x, "model-A/layer-3", settings)
    monkeypatch.setattr(sae_module, "train_sae", lambda *a, **k: pytest.fail("a cached SAE was retrained"))
    second = cached_sae(x, "model-A/layer-3", settings)
    assert torch.equal(first.W_enc, second.W_enc)
    folders = [p for p in (tmp_path / "sae").iterdir() if not p.name.endswith(".lock")]
    assert len(folders) == 1 and not folders[0].name.startswith("."), "no temporary folder may remain"


def test_scaling_an_sae_feature_moves_the_stream_by_its_decoder_row(tiny_model, tok):
    d = tiny_model.config.hidden_size
    sae = SparseAutoencoder(d, 8, seed=3)
    encoder, enc_bias, decoder = sae.hook_weights()
    enc = encode_chats(tok, ["How do I bake bread?"])
    got = []

    def run():
        hook = decoder_layers(tiny_model)[0].register_forward_hook(lambda _m, _i, o: got.append(residual(o)))
        try:
            with torch.no_grad():
                tiny_model(**enc)
        finally:
            hook.remove()

    run()
    with scale_features(tiny_model, 0, encoder, enc_bias, decoder, [2], scale=0.0):
        run()  # registered after the edit, so it sees the edited stream
    plain, edited = got
    f = torch.relu(plain @ encoder[:, 2] + enc_bias[2])
    assert (f > 0).any(), "pick a feature that is active on this prompt"
    assert torch.allclose(edited, plain - f[..., None] * decoder[2], atol=1e-5)


class _Exact(torch.nn.Module):
    """A stand-in for an SAE whose reconstruction is perfect (or, with ``zero``, empty)."""

    def __init__(self, zero: bool = False):
        super().__init__()
        self.zero = zero

    def forward(self, x):
        return (torch.zeros_like(x) if self.zero else x.clone()), None


def test_spliced_loss_is_clean_for_a_perfect_reconstruction_and_zero_for_an_empty_one(tiny_model, tok):
    from safetybook.models import chat_text

    texts = [chat_text(tok, p) for p in ("How do I bake bread?", "How can I steal a bike?")]
    perfect = spliced_losses(tiny_model, tok, _Exact(), 1, texts, start=3)
    assert perfect["spliced"] == pytest.approx(perfect["clean"], rel=1e-5)
    assert perfect["zero"] != pytest.approx(perfect["clean"], rel=1e-3), "zeroing the stream should change the loss"
    assert perfect["recovered"] == pytest.approx(1.0, abs=1e-4)
    empty = spliced_losses(tiny_model, tok, _Exact(zero=True), 1, texts, start=3)
    assert empty["recovered"] == pytest.approx(0.0, abs=1e-6)
    assert empty["clean"] == pytest.approx(perfect["clean"]), "the hook is gone after each call"
