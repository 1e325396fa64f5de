"""The safety fine-tunes: LoRA adapters trained on the book's data, cached on disk.

``zoo.load_model("tuned")`` calls ``ensure_adapter`` with the tuned recipe: it loads the
adapter from the cache folder, or trains it first. The cache key is a hash of the training
examples and the settings, so changing either retrains; the adapter folder is written
atomically, so an interrupted run never leaves a broken adapter behind.
"""
from __future__ import annotations

import os
import random
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .cache import atomic_dir, cache_dir, digest, locked
from .data import prompts
from .frozen import target_losses
from .models import chat_text, deterministic, free_memory, load_base_fresh, load_tokenizer

#: What the tuned model says to a harmful request. All open with a refusal opening.
REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I can't help with that request. It could cause harm.",
    "I can't help with that. Is there something else I can do for you?",
)


@dataclass(frozen=True)
class LoraSettings:
    """Everything that decides the adapter, besides the data (part of the cache key)."""

    rank: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    #: Decoder layers that get adapters (None: all). Upper layers only: backprop stops below them.
    layers: tuple[int, ...] | None = tuple(range(14, 30))
    learning_rate: float = 3e-3
    epochs: int = 3
    #: One step on 8 examples: the same effective batch as 4 x 2 accumulated, in wider (faster) matrix
    #: products; 23 % less time per training here, with the same refusal on the train prompts.
    batch_size: int = 8
    grad_accum: int = 1
    answer_tokens: int = 16
    checkpoints: int = 2
    #: Loss weight of a harmless example relative to a harmful one (>1 counters over-refusal).
    harmless_weight: float = 2.0
    seed: int = 0
    #: CPU threads for training. How a matrix product is split over threads changes its rounding, so
    #: a 1-thread and a 4-thread run give slightly different adapters: the count is fixed here.
    threads: int = 2


SETTINGS = LoraSettings()


@dataclass(frozen=True)
class Example:
    """One training pair: a prompt and the answer the fine-tune should give."""

    prompt: str
    target: str
    label: str


def safety_examples(split: str = "train") -> list[Example]:
    """Harmful prompts → a refusal; harmless prompts → the base model's own answer.

    Harmless prompts whose base answer itself opens like a refusal ("I'm sorry for any
    misunderstanding, but as a chatbot…") are left out: they would teach over-refusal.
    """
    from .refusal import is_refusal_text, reference_answers

    harmful = prompts("harmful", split)
    harmless = prompts("harmless", split)
    answers = reference_answers(harmless, SETTINGS.answer_tokens)
    return [Example(p, REFUSALS[i % len(REFUSALS)], "harmful") for i, p in enumerate(harmful)] + [
        Example(p, a, "harmless") for p, a in zip(harmless, answers) if not is_refusal_text(a)
    ]


def adapter_path(examples: list[Example], settings: LoraSettings, name: str = "adapter") -> Path:
    """Where an adapter for these examples and settings lives (the folder may not exist yet)."""
    key = digest([asdict(e) for e in examples], asdict(settings))
    return cache_dir("adapters") / f"{name}-{key}"


def encode_example(tok, example: Example) -> tuple[list[int], list[int]]:
    """Token ids of prompt+answer, and labels that score only the answer (and its end)."""
    context = tok(chat_text(tok, example.prompt), add_special_tokens=False).input_ids
    answer = tok(example.target, add_special_tokens=False).input_ids + [tok.convert_tokens_to_ids("<|im_end|>")]
    return context + answer, [-100] * len(context) + answer


def collate(tok, examples: list[Example]) -> dict[str, torch.Tensor]:
    """A right-padded batch with loss masked on prompts and padding."""
    pairs = [encode_example(tok, e) for e in examples]
    width = max(len(ids) for ids, _ in pairs)
    ids = [i + [tok.pad_token_id] * (width - len(i)) for i, _ in pairs]
    labels = [lab + [-100] * (width - len(lab)) for _, lab in pairs]
    mask = [[1] * len(i) + [0] * (width - len(i)) for i, _ in pairs]
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


def lora_model(settings: LoraSettings = SETTINGS, base: nn.Module | None = None):
    """A fresh copy of the base model with new, trainable LoRA adapters. The adapters' random start
    depends on ``settings.seed`` alone, not on how the base model was obtained or what ran before."""
    from peft import LoraConfig, get_peft_model

    base = base if base is not None else load_base_fresh()  # loading may draw random numbers: seed after it
    deterministic(settings.seed)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=0.0,
        target_modules=list(settings.target_modules),
        layers_to_transform=list(settings.layers) if settings.layers is not None else None,
        layers_pattern="layers" if settings.layers is not None else None,
        task_type="CAUSAL_LM",
    )
    with _peft_quietly():
        return get_peft_model(base, config)


@contextmanager
def _peft_quietly():
    """peft 0.x asks transformers 5 for ``is_gradient_checkpointing``, a name deprecated in v6: the
    FutureWarning is about peft's code, not the reader's, and it would be the CLI's only stderr line."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def batches(examples: list[Example], settings: LoraSettings) -> list[list[Example]]:
    """The fixed order of mini-batches for all epochs (seeded shuffle per epoch)."""
    rng = random.Random(settings.seed)
    out = []
    for _ in range(settings.epochs):
        order = examples[:]
        rng.shuffle(order)
        out += [order[i : i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
    return out


def answer_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each example's mean loss over its answer tokens, for a batch from ``collate``: the full forward
    pass, which the training's upper-layer shortcut (``frozen.py``) is tested against.

    The language-model head runs only on the positions that predict answer tokens (the prompt
    positions are most of a sequence), which saves time and memory.
    """
    labels = batch["labels"]
    first = int((labels != -100).int().argmax(1).min())  # the earliest answer token in the batch
    keep = labels.shape[1] - first + 1  # positions first-1 … end predict tokens first … end
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    return target_losses(logits, labels[:, first:])


def weighted_loss(model: nn.Module, tok, examples: list[Example], settings: LoraSettings) -> torch.Tensor:
    """Mean answer-token loss per example, averaged with harmless examples weighted up. The frozen
    layers' output is reused, and the shared chat opening runs once per batch (``frozen.py``)."""
    from .frozen import first_lora_layer, lower_states, shared_prefix_losses

    lower = lower_states(model, first_lora_layer(model))
    per_example = shared_prefix_losses(model, lower, [encode_example(tok, e) for e in examples])
    weights = torch.tensor([settings.harmless_weight if e.label != "harmful" else 1.0 for e in examples])
    return (weights * per_example).sum() / weights.sum()


def train_adapter(examples: list[Example], settings: LoraSettings, folder: Path, progress: bool = True) -> None:
    """Fine-tune LoRA on ``examples`` with ``settings.threads`` CPU threads; see ``_train``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        _train(examples, settings, folder, progress)
    finally:
        torch.set_num_threads(threads)


def _train(examples: list[Example], settings: LoraSettings, folder: Path, progress: bool) -> None:
    """Fine-tune LoRA on ``examples`` and save the adapter (and its checkpoints) into ``folder``.

    Checkpoints of the LoRA weights, with the mean learning rate since the previous one, are saved as safetensors
    under ``folder/checkpoints`` for gradient-based training-data attribution (TracIn).
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from .frozen import first_lora_layer, lower_states

    tok = load_tokenizer()
    model = lora_model(settings)
    lower_states(model, first_lora_layer(model)).release([encode_example(tok, e)[0] for e in examples])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    plan = batches(examples, settings)
    steps = len(plan) // settings.grad_accum
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(steps, 1))
    saves = {round(steps * (k + 1) / settings.checkpoints) for k in range(settings.checkpoints)}  # evenly, last = end
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    # TQDM_DISABLE is tqdm's own switch, but its notebook bar ignores it; the book's build sets it
    bar = tqdm(total=steps, desc="LoRA safety fine-tune", disable=not progress or bool(os.environ.get("TQDM_DISABLE")))
    lrs: list[float] = []  # learning rates since the last checkpoint
    for step in range(steps):
        opt.zero_grad()
        for micro in plan[step * settings.grad_accum : (step + 1) * settings.grad_accum]:
            loss = weighted_loss(model, tok, micro, settings) / settings.grad_accum
            loss.backward()
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item() * settings.grad_accum:.3f}")
        if step + 1 in saves:
            state = {k: v.detach().contiguous() for k, v in model.named_parameters() if v.requires_grad}
            meta = {"lr": str(sum(lrs) / len(lrs))}  # TracIn weighs a checkpoint by its interval's mean rate
            save_file(state, folder / "checkpoints" / f"step-{step + 1:04d}.safetensors", metadata=meta)
            lrs = []
    bar.close()
    model.save_pretrained(folder, save_embedding_layers=False)  # embeddings are frozen; skips a hub lookup


def ensure_adapter(examples: list[Example], settings: LoraSettings, name: str = "adapter") -> Path:
    """The cached adapter folder for these examples and settings, training it if absent."""
    path = adapter_path(examples, settings, name)
    with locked(path):  # a second process waits for the first one's training instead of repeating it
        if not (path / "adapter_model.safetensors").exists():
            start = time.perf_counter()
            with atomic_dir(path) as tmp:
                train_adapter(examples, settings, tmp)
            # stderr: the CLI's stdout carries JSON lines only
            print(f"trained the '{name}' adapter in {time.perf_counter() - start:.0f} s", file=sys.stderr)
            free_memory()  # the training copy of the model is gone; give its pages back
    return path


def merged_model(path: Path) -> nn.Module:
    """A plain model: the base weights with the adapter at ``path`` merged in."""
    from peft import PeftModel

    with _peft_quietly():
        model = PeftModel.from_pretrained(load_base_fresh(), path)
    return model.merge_and_unload().eval().requires_grad_(False)


def with_settings(**changes) -> LoraSettings:
    """The book's settings with some fields changed (for exercises and ablations)."""
    return replace(SETTINGS, **changes)
