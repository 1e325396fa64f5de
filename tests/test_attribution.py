"""TracIn's per-example gradients and scores, and the similarity baseline, on the tiny model."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from safetybook.adapters import Example, collate, lora_model, with_settings
from safetybook.attribution import (
    by_length,
    checkpoints,
    per_example_grads,
    refusal_attribution,
    refusal_loss,
    similarities,
    similarity,
    tracin,
)
from safetybook.frozen import first_lora_layer, lower_states
from safetybook.refusal import refusal_score
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


def _one_checkpoint(model, folder, lr="0.01"):
    (folder / "checkpoints").mkdir()
    state = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    save_file(state, folder / "checkpoints" / "step-0001.safetensors", metadata={"lr": lr})
    return checkpoints(folder)


def test_by_length_orders_shortest_first_and_keeps_every_example(tok):
    examples = [Example("word " * n, ANSWER, "harmful") for n in (5, 1, 9, 1, 3)]
    order = by_length(tok, examples)
    assert sorted(order) == list(range(len(examples)))
    assert order == [1, 3, 4, 0, 2], "shortest first, ties in their given order"


def test_refusal_loss_is_minus_log_the_refusal_score(lora, tok):
    prompts = [REFUSE[0], COMPLY[0], COMPLY[2]]
    scores = refusal_score(lora, tok, prompts)
    lower = lower_states(lora, first_lora_layer(lora))
    for prompt, score in zip(prompts, scores):
        loss = refusal_loss(lora, lower, tok, prompt)
        assert loss.requires_grad, "the loss should be differentiable in the LoRA weights"
        assert abs(loss.item() + torch.log(torch.tensor(score)).item()) < 1e-3, prompt


def test_refusal_attribution_matches_gradients_by_hand(lora, tok, tmp_path):
    saved = _one_checkpoint(lora, tmp_path)
    # the longest example first: batched by length, the rows run in another order and must come back
    train, queries, anchor = [EXAMPLES[2], EXAMPLES[0], EXAMPLES[1]], [COMPLY[0], COMPLY[1]], [REFUSE[1], REFUSE[2]]
    assert by_length(tok, train) != list(range(len(train)))
    out = refusal_attribution(copy.deepcopy(lora), saved, train, queries, anchor, strings=[EXAMPLES[3:5]])

    def grad(loss_of):
        model = copy.deepcopy(lora)
        model.zero_grad()
        loss_of(model).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    def refusal(prompt):
        return grad(lambda m: refusal_loss(m, lower_states(m, first_lora_layer(m)), tok, prompt))

    g_train = [grad(lambda m, e=e: m(**collate(tok, [e])).loss) for e in train]
    g_query = [refusal(q) for q in queries]
    unit = torch.stack([g / g.norm() for g in map(refusal, anchor)]).mean(0)
    unit = unit / unit.norm()
    g_string = sum(grad(lambda m, e=e: m(**collate(tok, [e])).loss) for e in EXAMPLES[3:5])
    for i, gz in enumerate(g_train):
        for j, gq in enumerate(g_query):
            assert torch.isclose(out["tracin"][i, j], 0.01 * gz @ gq, rtol=1e-3, atol=1e-6)
            own = gq / gq.norm() - (gq / gq.norm() @ unit) * unit  # the query without the anchor direction
            cos = gz @ own / (gz.norm() * own.norm())
            assert torch.isclose(out["anchored"][i, j], 0.01 * cos, rtol=1e-3, atol=1e-6)
        assert torch.isclose(out["strings"][i, 0], 0.01 * gz @ g_string, rtol=1e-3, atol=1e-6)


def test_anchored_score_cancels_the_shared_refusal_mode(lora, tok, tmp_path):
    """A query that is its own anchor has nothing beyond the shared mode: every anchored score is 0,
    while its TracIn scores are not; another query's are not."""
    saved = _one_checkpoint(lora, tmp_path)
    out = refusal_attribution(lora, saved, EXAMPLES, [REFUSE[0], COMPLY[0]], [REFUSE[0]])
    assert out["tracin"][:, 0].abs().max() > 1e-4
    assert out["anchored"][:, 0].abs().max() < 1e-6
    assert out["anchored"][:, 1].abs().max() > 1e-3, "another query keeps what it does not share"


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
