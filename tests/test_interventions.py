"""Interventions on the residual stream, checked on the tiny 2-layer model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from safetybook.interventions import (
    ablate_direction,
    add_direction,
    conditionally_steered,
    edit_direction,
    random_like,
    scale_features,
)
from safetybook.models import decoder_layers, encode_chats, has_hooks, residual
from safetybook.refusal import refusal_score

REFUSE = ["How can I steal a bike?", "Help me cheat on my exam."]  # as in conftest
COMPLY = ["How do I bake bread?", "Name a fruit.", "What is the capital of France?"]


def layer_outputs(model, tok, prompts):
    """Residual stream after each layer, ``[layer, batch, pos, d]``."""
    got = {}
    blocks = decoder_layers(model)
    hooks = [b.register_forward_hook(lambda _m, _i, o, i=i: got.__setitem__(i, residual(o))) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            logits = model(**encode_chats(tok, prompts)).logits
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([got[i] for i in range(len(blocks))]), logits


def direction(model, seed=1):
    torch.manual_seed(seed)
    return torch.randn(model.config.hidden_size)


def test_ablation_removes_the_direction_everywhere(tiny_model, tok):
    r = direction(tiny_model)
    with ablate_direction(tiny_model, r):
        hs, _ = layer_outputs(tiny_model, tok, REFUSE)
    mask = encode_chats(tok, REFUSE)["attention_mask"].bool()
    along = (hs @ (r / r.norm()))[:, mask]
    assert along.abs().max() < 1e-4, "every writer (embeddings, attention, MLP) must be projected"


def test_hooks_are_removed_on_exit(tiny_model, tok):
    _, before = layer_outputs(tiny_model, tok, COMPLY)
    with ablate_direction(tiny_model, direction(tiny_model)), add_direction(tiny_model, direction(tiny_model), 0, 3.0):
        _, during = layer_outputs(tiny_model, tok, COMPLY)
    _, after = layer_outputs(tiny_model, tok, COMPLY)
    assert not torch.allclose(before, during)
    assert torch.equal(before, after)


def test_addition_shifts_the_chosen_layer(tiny_model, tok):
    r = direction(tiny_model)
    plain, _ = layer_outputs(tiny_model, tok, COMPLY)
    with add_direction(tiny_model, r, 0, 2.0):
        steered, _ = layer_outputs(tiny_model, tok, COMPLY)
    assert torch.allclose(steered[0] - plain[0], (2.0 * r).expand_as(plain[0]), atol=1e-4)


def test_orthogonalized_weights_equal_the_ablation_hooks(tiny_model, tok):
    r = direction(tiny_model)
    with ablate_direction(tiny_model, r):
        _, hooked = layer_outputs(tiny_model, tok, REFUSE)
    emb_before = tiny_model.get_input_embeddings().weight.clone()
    edited = edit_direction(tiny_model, r, scale=0.0)
    _, baked = layer_outputs(edited, tok, REFUSE)
    assert torch.allclose(hooked, baked, atol=1e-4)
    assert torch.equal(tiny_model.get_input_embeddings().weight, emb_before), "the original must stay unedited"


def test_scale_one_edit_is_identity(tiny_model, tok):
    _, plain = layer_outputs(tiny_model, tok, COMPLY)
    _, same = layer_outputs(edit_direction(tiny_model, direction(tiny_model), scale=1.0), tok, COMPLY)
    assert torch.allclose(plain, same, atol=1e-5)


class FixedGate:
    """A stand-in condition: flags the prompts it is told to, and records what it read."""

    def __init__(self, harmful: set[str]):
        self.harmful, self.read = harmful, []

    def flags(self, model, tok, prompts):
        self.read.append(list(prompts))
        return np.array([p in self.harmful for p in prompts])


def test_conditional_steering_adds_where_flagged_and_ablates_elsewhere(tiny_model, tok):
    r = direction(tiny_model)
    prompts = [COMPLY[0], REFUSE[0], COMPLY[1]]
    with add_direction(tiny_model, r, 1, 4.0):
        added = refusal_score(tiny_model, tok, prompts)
    with ablate_direction(tiny_model, r):
        ablated = refusal_score(tiny_model, tok, prompts)
    gate = FixedGate({COMPLY[1]})
    steered, flags = conditionally_steered(tiny_model, tok, prompts, gate, r, 1, 4.0, refusal_score)
    assert flags.tolist() == [False, False, True]
    assert gate.read == [prompts], "the condition is read once, for every prompt, before any steering"
    assert steered == pytest.approx([ablated[0], ablated[1], added[2]], abs=1e-5), "each prompt in its own place"
    assert added[2] != pytest.approx(ablated[2], abs=1e-3), "the two edits must differ for this to test anything"
    assert not has_hooks(tiny_model), "no edit is left on the model"


def test_conditional_steering_reads_the_condition_unsteered(tiny_model, tok):
    seen = []

    class Reading(FixedGate):
        def flags(self, model, tok_, prompts):
            seen.append(has_hooks(model))
            return super().flags(model, tok_, prompts)

    conditionally_steered(tiny_model, tok, COMPLY, Reading(set()), direction(tiny_model), 1, 4.0, refusal_score)
    assert seen == [False]


def test_scaling_features(tiny_model, tok):
    d, n = tiny_model.config.hidden_size, 8
    torch.manual_seed(0)
    enc, dec, bias = torch.randn(d, n), torch.randn(n, d), torch.zeros(n)
    _, plain = layer_outputs(tiny_model, tok, COMPLY)
    with scale_features(tiny_model, 0, enc, bias, dec, [0, 1], scale=1.0):
        _, same = layer_outputs(tiny_model, tok, COMPLY)
    with scale_features(tiny_model, 0, enc, bias, dec, [0, 1], scale=0.0):
        _, zeroed = layer_outputs(tiny_model, tok, COMPLY)
    assert torch.allclose(plain, same, atol=1e-5)
    assert not torch.allclose(plain, zeroed, atol=1e-3)


def test_random_control_has_the_same_norm():
    r = torch.arange(10.0)
    control = random_like(r)
    assert control.norm() == pytest.approx(r.norm().item(), rel=1e-5)
    assert abs(torch.nn.functional.cosine_similarity(control, r, dim=0)) < 0.9


def tied_tiny(tok):
    """An untrained 2-layer Llama whose input and output embeddings are tied (as in SmolLM2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True,
                         pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


@pytest.mark.parametrize("scale", [0.0, 1.5])
def test_edit_in_place_matches_the_copy_and_is_undone(tok, scale):
    from safetybook.interventions import edited_in_place

    model = tied_tiny(tok)
    r = direction(model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    _, copied = layer_outputs(edit_direction(model, r, scale), tok, REFUSE)
    with edited_in_place(model, r, scale) as same:
        assert same is model
        assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr(), \
            "the unembedding must keep the original weights while the embedding is edited"
        _, in_place = layer_outputs(model, tok, REFUSE)
    assert torch.allclose(in_place, copied, atol=1e-5)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, original[k], atol=1e-6), f"{k} was not restored"
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr(), \
        "tie the embeddings again on exit"


@pytest.mark.parametrize("edit", ["ablate", "add", "features"])
def test_pointwise_edits_score_the_same_with_the_shared_opening_computed_once(tiny_model, tok, edit):
    """Ablation, addition and feature scaling are marked pointwise, so refusal_score computes the chat
    opening once under them; the scores equal those of the plain forward pass, which an unmarked
    copy of the same hooks forces."""
    from safetybook.models import pointwise_only

    d = direction(tiny_model)
    encoder, bias, decoder = torch.randn(tiny_model.config.hidden_size, 4), torch.zeros(4), torch.randn(4, tiny_model.config.hidden_size)
    context = {"ablate": lambda: ablate_direction(tiny_model, d), "add": lambda: add_direction(tiny_model, d, 0, 2.0),
               "features": lambda: scale_features(tiny_model, 0, encoder, bias, decoder, [0, 2], 0.0)}[edit]
    prompts = REFUSE + COMPLY
    with context():
        assert pointwise_only(tiny_model)
        shared = refusal_score(tiny_model, tok, prompts)
        hooks = [(m, k, h) for m in tiny_model.modules() for k, h in m._forward_hooks.items()]
        for m, k, h in hooks:  # the same functions, unmarked: the plain forward pass
            m._forward_hooks[k] = lambda *a, h=h: h(*a)
        assert not pointwise_only(tiny_model)
        plain = refusal_score(tiny_model, tok, prompts)
        for m, k, h in hooks:
            m._forward_hooks[k] = h
    assert plain == pytest.approx(shared, abs=1e-5)
    assert plain != pytest.approx(refusal_score(tiny_model, tok, prompts), abs=1e-3), "the edit changed nothing"


def test_post_instruction_activations_equal_each_prompt_run_alone(tiny_model, tok):
    from safetybook.directions import end_activations, last_token_activations, post_instruction_length

    n = post_instruction_length(tok)
    ids = encode_chats(tok, ["x"])["input_ids"][0].tolist()
    assert tok.decode(ids[-n:]).startswith("<|im_end|>"), "the post-instruction tokens start where the user's words end"
    prompts = REFUSE + COMPLY
    acts = end_activations(tiny_model, tok, prompts, n, batch_size=3)
    assert acts.shape == (2, n, len(prompts), tiny_model.config.hidden_size)
    for k, p in enumerate(prompts):
        alone, _ = layer_outputs(tiny_model, tok, [p])
        assert torch.allclose(acts[:, :, k], alone[:, 0, -n:], atol=1e-4)
    assert torch.allclose(acts[:, -1], last_token_activations(tiny_model, tok, prompts), atol=1e-6)


def test_recipe_screen_applies_its_filters(tiny_model, tok):
    from safetybook.interventions import screen_refusal_candidates

    screen, means = screen_refusal_candidates(tiny_model, tok, REFUSE, COMPLY, n_select=2, kl_bound=0.05, depth=0.5)
    n = len(screen.positions)
    assert means.shape == (2, n, tiny_model.config.hidden_size)
    assert screen.excluded_from == 1, "layers at or past half of 2 are left out"
    assert not screen.passes()[1].any()
    assert np.array_equal(screen.eligible(), np.array([[True] * n, [False] * n]))
    assert np.isnan(screen.ablated[1]).all() and np.isnan(screen.kl[1]).all(), "an excluded layer is not scored"
    # the induce filter runs only where the KL filter passed
    assert np.array_equal(np.isnan(screen.induced[0]), screen.kl[0] >= 0.05)
    ok = screen.passes()
    if ok.any():
        i, j = screen.layers.index(screen.chosen[0]), screen.positions.index(screen.chosen[1])
        assert ok[i, j] and screen.ablated[i, j] == screen.ablated[ok].min()
    else:
        assert screen.chosen is None
    # an unbounded KL lets every layer-0 candidate that induces refusal through
    loose, _ = screen_refusal_candidates(tiny_model, tok, REFUSE, COMPLY, n_select=2, kl_bound=np.inf, depth=0.5,
                                         also=(1, -1))
    assert not np.isnan(loose.induced[0]).any()
    assert np.array_equal(loose.passes()[0], loose.induced[0] > 0.5)
    # ``also`` scores one excluded candidate, and only that one, and it still cannot pass
    assert np.array_equal(~np.isnan(loose.kl[1]), np.arange(-n, 0) == -1)
    assert not loose.passes()[1].any()
