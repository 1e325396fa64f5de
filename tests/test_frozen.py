"""The upper-layers-only forward passes give the full computation's losses and gradients."""
from __future__ import annotations

import copy

import pytest
import torch

from safetybook.adapters import Example, answer_losses, collate, encode_example, lora_model, with_settings
from safetybook.frozen import (
    LowerStates,
    common_prefix,
    first_lora_layer,
    layer_slice,
    shared_prefix_losses,
    upper_losses,
)
from tests.conftest import ANSWER, COMPLY, REFUSAL, REFUSE

EXAMPLES = [Example(p, ANSWER, "harmful") for p in REFUSE] + [Example(p, REFUSAL, "harmless") for p in COMPLY]


@pytest.fixture()
def lora(tiny_model):
    """LoRA on the upper of the tiny model's two layers, with non-zero B so that every weight matters."""
    model = lora_model(with_settings(layers=(1,)), base=copy.deepcopy(tiny_model))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.train()
    return model


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_the_lower_layers_are_found_from_the_lora_names(lora, tiny_model):
    assert first_lora_layer(lora) == 1
    assert first_lora_layer(tiny_model) == 0


@pytest.mark.parametrize("losses", [upper_losses, shared_prefix_losses])
def test_upper_layer_losses_and_gradients_equal_the_full_forward(lora, tok, losses):
    batch = EXAMPLES[:4]
    full = answer_losses(lora, collate(tok, batch))
    expected = _grads(lora, full)
    lower = LowerStates(lora, first_lora_layer(lora))
    fast = losses(lora, lower, [encode_example(tok, e) for e in batch])
    torch.testing.assert_close(fast, full, rtol=1e-4, atol=1e-5)
    got = _grads(lora, fast)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-3, atol=1e-5)


def test_the_chat_opening_is_shared_and_the_layer_slice_is_undone(lora, tok):
    sequences = [encode_example(tok, e)[0] for e in EXAMPLES]
    shared = common_prefix(sequences)
    assert shared > 5 and len({tuple(s[:shared]) for s in sequences}) == 1
    assert len({s[shared] for s in sequences}) > 1
    layers = list(lora.get_base_model().model.layers)
    numbers = [layer.self_attn.layer_idx for layer in layers]
    with layer_slice(lora, 1):
        assert len(lora.get_base_model().model.layers) == 1
        assert lora.get_base_model().model.layers[0].self_attn.layer_idx == 0
    assert list(lora.get_base_model().model.layers) == layers
    assert [layer.self_attn.layer_idx for layer in layers] == numbers


def test_lower_states_do_not_depend_on_what_ran_before(lora, tok):
    a, b = (encode_example(tok, e)[0] for e in EXAMPLES[:2])
    first, second = LowerStates(lora, 1), LowerStates(lora, 1)
    first(b)
    assert torch.equal(first(a), second(a))
    assert first(a).shape == (len(a), lora.config.hidden_size)


def test_shared_lower_states_do_not_keep_a_model_alive(tiny_model, tok):
    """The states are shared by every training in a process; the models that made them must still be freed."""
    import gc
    import weakref

    from safetybook.frozen import lower_states

    model = lora_model(with_settings(layers=(1,)), base=copy.deepcopy(tiny_model))
    states = lower_states(model, 1)
    ids = encode_example(tok, EXAMPLES[0])[0]
    first = states(ids)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None, "lower_states kept the model in memory"
    again = lora_model(with_settings(layers=(1,)), base=copy.deepcopy(tiny_model))
    assert lower_states(again, 1) is states and torch.equal(states(ids), first)


def test_released_lower_layers_keep_the_states_and_refuse_new_sequences(tiny_model, tok):
    """After ``release`` the frozen layers hold no weights, training losses are unchanged, and a
    sequence whose states were not computed raises instead of running empty layers."""
    from safetybook.frozen import lower_states

    model = lora_model(with_settings(layers=(1,)), base=copy.deepcopy(tiny_model))
    pairs = [encode_example(tok, e) for e in EXAMPLES[:4]]
    before = shared_prefix_losses(model, LowerStates(model, 1), pairs).detach()
    states = lower_states(model, 1)
    states.release([ids for ids, _ in pairs])
    frozen, adapted = model.get_base_model().model.layers
    assert all(p.numel() == 0 for p in frozen.parameters())
    assert all(p.numel() > 0 for p in adapted.parameters())
    torch.testing.assert_close(shared_prefix_losses(model, states, pairs), before, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="released"):
        states(encode_example(tok, Example("A prompt that no other test uses: purple llamas?", ANSWER, "harmless"))[0])
    assert lower_states(model, 1)._released, "asking again for the same model keeps it released"
