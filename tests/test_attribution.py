"""TracIn's per-example gradients and scores, and the similarity baseline, on the tiny model."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from safetybook.adapters import Example, collate, lora_model, with_settings
from safetybook.attribution import checkpoints, per_example_grads, similarities, similarity, tracin
from tests.conftest import ANSWER, COMPLY, REFUSAL, REFUSE

# Targets swapped from what the tiny model learned: a large loss, so gradients well above rounding.
EXAMPLES = [Example(p, ANSWER, "harmful") for p in REFUSE] + [Example(p, REFUSAL + " Yes.", "harmless") for p in COMPLY]


@pytest.fixture()
def lora(tiny_model):
    settings = with_settings(target_modules=("q_proj", "v_proj"), layers=None)
    model = lora_model(settings, base=copy.deepcopy(tiny_model))
    with torch.no_grad():  # LoRA's B starts at zero; give it weights so that all gradients flow
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def test_per_example_grads_match_one_at_a_time(lora, tok):
    batched = next(per_example_grads(lora, tok, EXAMPLES[:4], batch_size=4))
    for i, example in enumerate(EXAMPLES[:4]):
        batch = collate(tok, [example])
        lora.zero_grad()
        lora(**batch).loss.backward()
        modules = dict(lora.named_modules())
        for name, grads in batched.items():
            got, expected = grads[i].flatten(), modules[name].weight.grad.flatten()
            cosine = torch.nn.functional.cosine_similarity(got, expected, dim=0).item()
            assert cosine > 0.999, f"example {i}, {name}: batched gradient points elsewhere (cos {cosine:.3f})"
            assert abs(got.norm() / expected.norm() - 1) < 0.01, f"example {i}, {name}: wrong gradient scale"


def test_tracin_is_symmetric_with_positive_self_influence(lora, tok, tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    state = {k: v.detach().clone() for k, v in lora.named_parameters() if v.requires_grad}
    save_file(state, folder / "step-0001.safetensors", metadata={"lr": "0.01"})
    scores = tracin(lora, checkpoints(tmp_path), EXAMPLES, EXAMPLES, batch_size=4)
    assert scores.shape == (len(EXAMPLES), len(EXAMPLES))
    torch.testing.assert_close(scores, scores.T, rtol=1e-3, atol=1e-3 * scores.abs().max().item())
    assert (scores.diagonal() > 0).all()
    in_pairs = tracin(lora, checkpoints(tmp_path), EXAMPLES, EXAMPLES[:3], batch_size=2)  # the default, odd count
    torch.testing.assert_close(in_pairs, scores[:, :3], rtol=1e-3, atol=1e-3 * scores.abs().max().item())


def test_similarity_finds_the_same_prompt(tiny_model, tok):
    train = REFUSE + COMPLY
    sims = similarity(tiny_model, tok, train, [COMPLY[1], REFUSE[0]], layer=1)
    assert sims.shape == (len(train), 2)
    assert sims[:, 0].argmax().item() == train.index(COMPLY[1])
    assert sims[:, 1].argmax().item() == train.index(REFUSE[0])


def test_similarities_at_several_layers_equal_one_layer_at_a_time(tiny_model, tok):
    train, queries = REFUSE + COMPLY, [COMPLY[0], REFUSE[1]]
    both = similarities(tiny_model, tok, train, queries, [0, 1])
    for layer in (0, 1):
        torch.testing.assert_close(both[layer], similarity(tiny_model, tok, train, queries, layer))
    assert not torch.allclose(both[0], both[1]), "the layers' similarities should differ"
