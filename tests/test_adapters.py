"""The LoRA fine-tune's data plumbing and cache key, on the tiny model."""
from __future__ import annotations

import copy

from safetybook.adapters import Example, adapter_path, batches, collate, lora_model, with_settings
from tests.conftest import ANSWER, COMPLY, REFUSAL, REFUSE

EXAMPLES = [Example(p, REFUSAL, "harmful") for p in REFUSE] + [Example(p, ANSWER, "harmless") for p in COMPLY]


def test_collate_scores_only_the_answer(tok):
    batch = collate(tok, EXAMPLES[:2])
    for row, example in zip(range(2), EXAMPLES[:2]):
        scored = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert tok.decode(scored).startswith(example.target)
        assert (batch["labels"][row][batch["attention_mask"][row] == 0] == -100).all()


def test_batches_cover_every_example_once_per_epoch():
    settings = with_settings(epochs=3, batch_size=4)
    plan = batches(EXAMPLES, settings)
    flat = [e for b in plan for e in b]
    assert len(flat) == 3 * len(EXAMPLES)
    assert all(flat.count(e) == 3 for e in EXAMPLES)
    assert plan == batches(EXAMPLES, settings)  # seeded: the same order every time


def test_cache_key_changes_with_data_and_settings():
    path = adapter_path(EXAMPLES, with_settings())
    assert path == adapter_path(list(EXAMPLES), with_settings())
    assert path != adapter_path(EXAMPLES[:-1], with_settings())
    assert path != adapter_path(EXAMPLES, with_settings(learning_rate=1e-4))


def test_lora_only_on_chosen_layers(tiny_model):
    model = lora_model(with_settings(layers=(1,)), base=copy.deepcopy(tiny_model))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".layers.1." in n for n in trainable)


def test_answer_losses_match_the_full_computation(tiny_model, tok):
    import torch

    from safetybook.adapters import answer_losses

    batch = collate(tok, EXAMPLES[:3])
    logits = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    # in float64: the tiny model's logits are large, and float32 cross-entropy rounds by ~1e-4
    # differently for a different memory layout; a wrong mask would be off by a whole token's loss
    nll = torch.nn.functional.cross_entropy(logits.double().transpose(1, 2), targets.clamp(min=0), reduction="none")
    full = (nll * (targets != -100)).sum(1) / (targets != -100).sum(1)
    torch.testing.assert_close(answer_losses(tiny_model, batch).double(), full, rtol=1e-3, atol=1e-4)


def test_harmless_weight_shifts_the_loss_towards_harmless_examples(tiny_model, tok):
    from safetybook.adapters import answer_losses, weighted_loss

    batch = [EXAMPLES[0], EXAMPLES[-1]]  # one harmful, one harmless
    harmful, harmless = answer_losses(tiny_model, collate(tok, batch)).tolist()
    for w in (1.0, 3.0):
        expected = (harmful + w * harmless) / (1 + w)
        assert abs(weighted_loss(tiny_model, tok, batch, with_settings(harmless_weight=w)).item() - expected) < 1e-5


def test_training_runs_on_the_settings_thread_count_and_restores_it(monkeypatch, tmp_path):
    """Thread count changes rounding, so it is part of the adapter; the caller's count comes back."""
    import torch

    from safetybook import adapters

    seen = []
    monkeypatch.setattr(adapters, "_train", lambda *args: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    settings = with_settings(threads=1 if before != 1 else 2)
    adapters.train_adapter([], settings, tmp_path)
    assert seen == [settings.threads]
    assert torch.get_num_threads() == before
    assert adapter_path([], settings, "x") != adapter_path([], with_settings(threads=settings.threads + 1), "x")


def test_the_adapters_random_start_depends_on_the_seed_alone(tiny_model, monkeypatch):
    """Loading the base model draws random numbers (and reseeds); the LoRA start must not depend on
    whether the base model was loaded for the adapter or handed over already loaded."""
    import torch

    from safetybook import adapters

    def lora_a(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}

    settings = with_settings(layers=(1,))
    handed = lora_a(lora_model(settings, base=copy.deepcopy(tiny_model)))

    def loading():
        torch.manual_seed(123)
        torch.rand(1000)
        return copy.deepcopy(tiny_model)

    monkeypatch.setattr(adapters, "load_base_fresh", loading)
    loaded = lora_a(lora_model(settings))
    assert handed and all(torch.equal(handed[n], loaded[n]) for n in handed)
    other = lora_a(lora_model(with_settings(layers=(1,), seed=1)))
    assert not all(torch.equal(handed[n], other[n]) for n in handed), "another seed, another start"


def test_loading_an_adapter_warns_nothing(tmp_path):
    """The CLI's stderr is for the reader: peft's use of a name transformers deprecates stays off it."""
    import warnings

    from safetybook.adapters import merged_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora_model(with_settings(layers=(28, 29))).save_pretrained(tmp_path)
        merged_model(tmp_path)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
