"""Small pieces of the library: caching, layer access, truncation, data loading."""
from __future__ import annotations

import json

import pytest
import torch

from safetybook import cache, display
from safetybook.data import DataError, harmbench, jailbreaks, read_prompt_file, wrap, wrapper_families
from safetybook.models import decoder_layers, residual

DATA_DIR = cache.ROOT / "data"


def test_truncate_cuts_long_text_and_marks_it():
    text = "one two three four five six seven eight"
    assert display.truncate(text, words=3) == "one two three […]"
    assert display.truncate("short answer") == "short answer"


def test_residual_reads_tensor_or_tuple():
    h = torch.ones(1, 2, 3)
    assert residual(h) is h
    assert residual((h, None)) is h


def test_decoder_layers_found_in_tiny_model(tiny_model):
    assert len(decoder_layers(tiny_model)) == 2


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "adapter"
    with pytest.raises(RuntimeError), cache.atomic_dir(target) as tmp:
        (tmp / "half.bin").write_text("partial")
        raise RuntimeError("killed mid-way")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
    with cache.atomic_dir(target) as tmp:
        (tmp / "ok.bin").write_text("done")
    assert (target / "ok.bin").read_text() == "done"


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "x.json"
    cache.write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        cache.write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}, "a failed write must not clobber the old file"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_tensors_are_written_atomically_and_read_back(tmp_path, monkeypatch):
    path = tmp_path / "acts.safetensors"
    assert cache.read_tensors(path) is None
    acts = torch.arange(12.0).reshape(3, 4)
    cache.write_tensors(path, {"a": acts[:, 1:], "ids": torch.tensor([3, 1])})  # a non-contiguous slice too
    back = cache.read_tensors(path)
    torch.testing.assert_close(back["a"], acts[:, 1:])
    assert back["ids"].tolist() == [3, 1]

    def broken(*_args, **_kwargs):
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError):
        cache.write_tensors(path, {"a": torch.zeros(2)})
    torch.testing.assert_close(cache.read_tensors(path)["a"], acts[:, 1:])  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["acts.safetensors"]  # no temporary file left


def test_digest_changes_with_content():
    assert cache.digest([1, 2]) == cache.digest([1, 2])
    assert cache.digest([1, 2]) != cache.digest([2, 1])


def test_read_prompt_file_text_and_jsonl(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n second prompt \n")
    assert read_prompt_file(txt) == ["first prompt", "second prompt"]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a"}\n{"prompt": "b", "label": "x"}\n')
    assert read_prompt_file(jl) == ["a", "b"]


@pytest.mark.parametrize(
    "content, message",
    [("", "empty"), ('{"prompt": "a"}\n{"prompt": \n', "line 2"), ('{"text": "a"}\n', "line 1")],
)
def test_read_prompt_file_errors_name_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_prompt_file(path)


def test_harmbench_is_the_standard_subset():
    rows = harmbench()
    assert 190 <= len(rows) <= 200, "the standard subset has about 200 behaviours"
    assert len(set(rows)) == len(rows)
    assert harmbench(limit=10) == harmbench(limit=10), "a sample must be fixed"
    assert len(harmbench(limit=10)) == 10


def test_saved_tokenizer_equals_the_one_in_the_gguf_file(tmp_path, monkeypatch):
    """The tokenizer is read from the GGUF file once and saved; the saved one must tokenize, pad and
    apply the chat template exactly as the GGUF one does."""
    from transformers import AutoTokenizer

    from safetybook import models

    monkeypatch.setenv("SAFETYBOOK_CACHE", str(tmp_path))
    original = AutoTokenizer.from_pretrained(models.model_folder(), gguf_file=models.GGUF_FILE)
    saved = AutoTokenizer.from_pretrained(models.tokenizer_snapshot())
    texts = ["How do I bake bread?", "I'm sorry, but I can't help with that. <|im_end|>", "émoji 🙂 tabs\tand\nnewlines"]
    for text in texts:
        assert saved(text, add_special_tokens=False).input_ids == original(text, add_special_tokens=False).input_ids
    chat = [{"role": "user", "content": texts[0]}]
    assert saved.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        original.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert (saved.pad_token_id, saved.eos_token_id) == (original.pad_token_id, original.eos_token_id)
    assert models.tokenizer_snapshot() == models.tokenizer_snapshot()  # cached: the same folder


def test_last_token_activations_equal_each_prompt_run_alone(tiny_model, tok):
    """Batched by length, left-padded, with the shared chat opening run once: every prompt's last-token
    residual still equals what its own unpadded forward pass gives, in the order of the prompts."""
    from safetybook.directions import last_token_activations
    from safetybook.models import chat_text

    prompts = ["How can I steal a bike?", "Name a fruit.", "How do I bake bread at home on a weekend?", "Hi"]
    acts = last_token_activations(tiny_model, tok, prompts, batch_size=3)
    for j, p in enumerate(prompts):
        ids = tok(chat_text(tok, p), return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            hidden = tiny_model(input_ids=ids, output_hidden_states=True).hidden_states
        for layer in range(acts.shape[0] - 1):  # the last entry of hidden_states is after the final norm
            assert torch.allclose(acts[layer, j], hidden[layer + 1][0, -1], atol=1e-4), (p, layer)


def _hf_greedy(model, tok, prompt: str, max_new_tokens: int) -> str:
    """transformers' own greedy decoding of one prompt, unpadded: what ``generate`` must reproduce."""
    from safetybook.models import encode_chats

    enc = encode_chats(tok, [prompt])
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                         temperature=None, top_p=None, top_k=None)
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


@pytest.mark.parametrize("ends_early", [False, True])
def test_generate_equals_transformers_greedy_decoding(tiny_model, tok, ends_early):
    """The book's greedy loop (batched by length, shared chat opening run once, early stop) gives the
    same answers as transformers' generate on each prompt alone; with an end token that the model
    emits at once, the answers stop there."""
    from safetybook.models import generate
    from tests.conftest import COMPLY, REFUSE

    prompts = [REFUSE[0], COMPLY[0], COMPLY[1] + " Please explain in detail, step by step.", REFUSE[1]]
    config = tiny_model.generation_config
    saved, first = config.eos_token_id, None
    if ends_early:  # make the first answer token of the first prompt an end token
        from safetybook.models import encode_chats

        first = int(tiny_model(**encode_chats(tok, prompts[:1])).logits[0, -1].argmax())
        config.eos_token_id = [first, tok.eos_token_id]
    try:
        expected = [_hf_greedy(tiny_model, tok, p, 6) for p in prompts]
        assert generate(tiny_model, tok, prompts, max_new_tokens=6, batch_size=3) == expected
    finally:
        config.eos_token_id = saved
    if ends_early:
        assert expected[0] == tok.decode([first]).strip(), "the first prompt's answer should stop at its first token"
    else:
        assert all(expected), "every answer should have some text"


def test_generate_under_an_unmarked_hook_takes_the_padded_path(tiny_model, tok):
    """A hook that is not marked pointwise gets every prompt whole, left-padded in its batch; the
    answers still equal transformers' generate on each prompt alone under the same hook."""
    from safetybook.models import decoder_layers, generate, pointwise_only
    from tests.conftest import COMPLY, REFUSE

    handle = decoder_layers(tiny_model)[0].register_forward_hook(lambda _m, _i, out: out * 0.9)
    try:
        assert not pointwise_only(tiny_model)
        prompts = [REFUSE[0], COMPLY[0] + " With butter and salt, please.", COMPLY[2]]
        assert generate(tiny_model, tok, prompts, max_new_tokens=5) == [_hf_greedy(tiny_model, tok, p, 5) for p in prompts]
    finally:
        handle.remove()


def test_wrap_of_one_family_uses_only_its_templates_and_families_name_them():
    prompts = [f"Request number {i}?" for i in range(10)]
    templates = {j["family"]: [] for j in jailbreaks("test")}
    for j in jailbreaks("test"):
        templates[j["family"]].append(j["template"])
    fiction = wrap(prompts, "test", family="fiction")
    assert all(any(w == t.format(prompt=p) for t in templates["fiction"]) for w, p in zip(fiction, prompts))
    assert len(set(fiction[:2])) == 2 or len(templates["fiction"]) == 1, "round-robin over the family's templates"
    mixed, families = wrap(prompts, "test"), wrapper_families(len(prompts), "test")
    assert len(set(families)) > 1
    for w, p, f in zip(mixed, prompts, families):
        assert w in {t.format(prompt=p) for t in templates[f]}, (w, f)
    with pytest.raises(DataError, match="no test wrapper of family 'poetry'"):
        wrap(prompts, "test", family="poetry")


def test_reformulations_follow_the_test_prompts_order_and_refuse_unknown_labels():
    from safetybook.data import prompts, reformulations

    past = reformulations("harmful")
    assert len(past) == len(prompts("harmful", "test"))
    assert set(past).isdisjoint(prompts("harmful", "test"))
    assert all(p.startswith(("How", "What", "Where", "When", "Which", "Why")) for p in past)
    train = reformulations("harmful", split="train")
    assert len(train) == len(prompts("harmful", "train"))
    assert set(train).isdisjoint(prompts("harmful", "train"))
    assert set(train).isdisjoint(past)
    with pytest.raises(DataError, match="no past-tense reformulation"):
        reformulations("borderline")


def test_phrasings_line_up_with_their_originals_and_refuse_unknown_labels():
    from safetybook.data import FORMS, phrasing_forms, phrasings, prompts

    rows = {r["prompt"]: r for r in map(json.loads, (DATA_DIR / "phrasings.jsonl").read_text().splitlines())}
    for label in ("harmful", "harmless"):
        for split in ("train", "test"):
            originals = prompts(label, split)
            rephrased, forms = phrasings(label, split), phrasing_forms(label, split)
            assert rephrased == [rows[p]["rephrased"] for p in originals], "in the order of prompts(label, split)"
            assert forms == [rows[p]["form"] for p in originals]
            assert set(forms) == set(FORMS)
    assert phrasings("harmful") == phrasings("harmful", "test")
    with pytest.raises(DataError, match="no rephrasing of 'borderline' test prompts"):
        phrasings("borderline")


def test_default_system_prompt_is_what_the_template_puts_in(tok):
    from safetybook.models import chat_text, default_system

    default = default_system(tok)
    assert "SmolLM" in default and "<|im" not in default
    assert chat_text(tok, "Name a fruit.", default) == chat_text(tok, "Name a fruit.")
    assert chat_text(tok, "Name a fruit.", default + ". Be brief.") != chat_text(tok, "Name a fruit.")
