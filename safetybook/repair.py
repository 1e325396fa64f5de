"""Attribution-guided data repair: the training data of ``repaired``, computed from ``tuned``.

1. Find the borderline TRAIN prompts that ``tuned`` over-refuses (refusal score above 0.5).
2. Blame each training example with TracIn: the sum of its scores over those prompts, each
   prompt's target being a refusal (a positive score pushed the model towards refusing them).
   The whole TracIn matrix is kept in the plan, so the chapter that shows it runs TracIn once.
3. Remove the most-blamed examples and add the over-refused borderline train prompts with the
   base model's own helpful answers as counter-examples.

Test prompts are never used. The plan is cached as JSON, so ``zoo.load_model("repaired")`` works
without any chapter having run. ``control_examples`` makes the control: as many examples of each
label removed at random, the same counter-examples added.
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass

from .adapters import REFUSALS, SETTINGS, Example, ensure_adapter, safety_examples
from .cache import cache_dir, computing, digest, locked, read_json, write_json


@dataclass(frozen=True)
class RepairSettings:
    """What decides the repair, besides the tuned adapter (part of the cache key)."""

    remove: int = 16
    threshold: float = 0.5
    counter_examples: bool = True
    seed: int = 0


REPAIR = RepairSettings()
#: Part of the plan's cache key: raise it when the plan's contents change.
PLAN_VERSION = 2


def repair_plan(repair: RepairSettings = REPAIR) -> dict:
    """Over-refused borderline train prompts, TracIn blame of every tuned training example, and
    the indices to remove (computed once, cached as JSON)."""
    examples, settings = safety_examples(), SETTINGS
    path = cache_dir("repair") / f"plan-{digest([asdict(e) for e in examples], asdict(settings), asdict(repair), PLAN_VERSION)}.json"
    with locked(path):
        plan = read_json(path)
        if plan is None:
            with computing("the repair plan (TracIn over the tuned adapter's training set)"):
                plan = _compute_plan(examples, repair)
            write_json(path, plan)
    return plan


def _compute_plan(examples: list[Example], repair: RepairSettings) -> dict:
    from .adapters import lora_model, merged_model
    from .attribution import checkpoints, tracin
    from .data import prompts
    from .models import free_memory, load_tokenizer
    from .refusal import is_refusal_text, reference_answers, refusal_score

    folder = ensure_adapter(examples, SETTINGS, "tuned")
    tok = load_tokenizer()
    borderline = prompts("borderline", "train")
    model = merged_model(folder)  # a private copy, dropped before TracIn builds its own
    scores = refusal_score(model, tok, borderline)
    del model
    free_memory()
    over = [p for p, s in zip(borderline, scores) if s > repair.threshold]
    queries = [Example(p, REFUSALS[0], "borderline") for p in over]
    start = time.perf_counter()
    matrix = tracin(lora_model(SETTINGS), checkpoints(folder), examples, queries) if queries else None
    seconds = time.perf_counter() - start
    free_memory()
    blame = matrix.sum(1) if matrix is not None else None
    ranked = sorted(range(len(examples)), key=lambda i: -blame[i]) if blame is not None else []
    answers = reference_answers(over, SETTINGS.answer_tokens)
    counter = [{"prompt": p, "target": a, "label": "borderline"}
               for p, a in zip(over, answers) if not is_refusal_text(a)]
    return {
        "over_refused": over,
        "over_refused_scores": [s for s in scores if s > repair.threshold],
        "blame": blame.tolist() if blame is not None else [0.0] * len(examples),
        # [train example][over-refused prompt]: the training chapter reads its TracIn table from here
        "tracin": matrix.tolist() if matrix is not None else [],
        "tracin_seconds": round(seconds, 1),
        "removed": ranked[: repair.remove],
        "counter_examples": counter if repair.counter_examples else [],
    }


def _rebuild(examples: list[Example], removed: list[int], plan: dict) -> list[Example]:
    gone = set(removed)
    kept = [e for i, e in enumerate(examples) if i not in gone]
    return kept + [Example(**c) for c in plan["counter_examples"]]


def repaired_examples(repair: RepairSettings = REPAIR) -> list[Example]:
    """The tuned training set without its most-blamed examples, plus the counter-examples."""
    examples = safety_examples()
    plan = repair_plan(repair)
    return _rebuild(examples, plan["removed"], plan)


def control_examples(seed: int = 0, repair: RepairSettings = REPAIR) -> list[Example]:
    """The control: as many examples removed of each label, but chosen at random (same
    counter-examples). Matching labels matters: TracIn's most-blamed examples are mostly harmful
    ones, and removing any harmful examples lowers refusal; the control asks whether the
    *attributed* ones matter more than random ones of the same kind."""
    examples = safety_examples()
    plan = repair_plan(repair)
    rng = random.Random(seed)
    removed = []
    for label in sorted({examples[i].label for i in plan["removed"]}):
        n = sum(examples[i].label == label for i in plan["removed"])
        removed += rng.sample([i for i, e in enumerate(examples) if e.label == label], n)
    return _rebuild(examples, removed, plan)
