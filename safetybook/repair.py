"""Attribution-guided data repair: the training data of ``repaired``, computed from ``tuned``.

1. Find the borderline TRAIN prompts that ``tuned`` over-refuses (refusal score above 0.5).
2. Blame each training example by TracIn summed over those prompts, each prompt's loss being its
   whole refusal score (``attribution.refusal_attribution``): a positive score pushed the model
   towards refusing them. Two other signals are kept beside it: the one-string TracIn the book used
   first (every query's target ``REFUSALS[0]``), and the anchored gradient cosine. The training
   chapter shows why the default is the one least tied to a single refusal string. Every score
   matrix is kept in the plan, so the chapter runs attribution once.
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
    #: How many harmful train prompts make the anchor (their mean refusal gradient), drawn with ``seed``.
    anchor: int = 16
    #: Which score ranks the examples: "tracin" (refusal-score TracIn), "anchored" or "one_string".
    signal: str = "tracin"
    #: How many of the most over-refused prompts also get a one-string TracIn column of their own.
    shown: int = 4


REPAIR = RepairSettings()
#: Part of the plan's cache key: raise it when the plan's contents change.
PLAN_VERSION = 4


def repair_plan(repair: RepairSettings = REPAIR) -> dict:
    """Over-refused borderline train prompts, the attribution scores of every tuned training example,
    and the indices to remove (computed once, cached as JSON)."""
    if repair.signal not in SIGNALS:
        raise ValueError(f"unknown attribution signal {repair.signal!r}: choose one of {', '.join(SIGNALS)}")
    examples, settings = safety_examples(), SETTINGS
    path = cache_dir("repair") / f"plan-{digest([asdict(e) for e in examples], asdict(settings), asdict(repair), PLAN_VERSION)}.json"
    with locked(path):
        plan = read_json(path)
        if plan is None:
            with computing("the repair plan (TracIn over the tuned adapter's training set)"):
                plan = _compute_plan(examples, repair)
            write_json(path, plan)
    return plan


SIGNALS = ("tracin", "anchored", "one_string")


def _compute_plan(examples: list[Example], repair: RepairSettings) -> dict:
    from .adapters import lora_model, merged_model
    from .attribution import checkpoints, refusal_attribution
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
    over = sorted([(s, p) for p, s in zip(borderline, scores) if s > repair.threshold], reverse=True)
    over_scores, over = [s for s, _ in over], [p for _, p in over]  # most over-refused first
    anchor = random.Random(repair.seed).sample(prompts("harmful", "train"), repair.anchor)
    strings = [[Example(p, REFUSALS[0], "borderline") for p in over]]  # the first blame: one column for all
    strings += [[Example(p, REFUSALS[0], "borderline")] for p in over[: repair.shown]]
    start = time.perf_counter()
    out = refusal_attribution(lora_model(SETTINGS), checkpoints(folder), examples, over, anchor, strings) if over else None
    seconds = time.perf_counter() - start
    free_memory()
    zero = [0.0] * len(examples)
    blames = {"anchored": out["anchored"].sum(1).tolist() if out else zero,
              "tracin": out["tracin"].sum(1).tolist() if out else zero,
              "one_string": out["strings"][:, 0].tolist() if out else zero}
    blame = blames[repair.signal]
    ranked = sorted(range(len(examples)), key=lambda i: -blame[i]) if out else []
    answers = reference_answers(over, SETTINGS.answer_tokens)
    counter = [{"prompt": p, "target": a, "label": "borderline"}
               for p, a in zip(over, answers) if not is_refusal_text(a)]
    return {
        "over_refused": over,  # most over-refused first
        "over_refused_scores": over_scores,
        "anchor": anchor,
        "signal": repair.signal,
        "blame": blame,  # by the chosen signal, summed over the over-refused prompts
        "blames": blames,  # by every signal
        # [train example][over-refused prompt]: the training chapter reads its tables from here
        "tracin": out["tracin"].tolist() if out else [],
        "anchored": out["anchored"].tolist() if out else [],
        # [train example][one of the first `shown` over-refused prompts]: one-string TracIn
        "one_string": out["strings"][:, 1:].tolist() if out else [],
        "attribution_seconds": round(seconds, 1),
        "removed": ranked[: repair.remove],
        "counter_examples": counter if repair.counter_examples else [],
    }


def concentration(blame, examples: list[Example], k: int = 16) -> float:
    """How far the ``k`` most-blamed examples are explained by their training target: the largest
    share of their refusal-trained examples that share one refusal string (1/3 when the three
    strings are equally represented, 1.0 when one string takes them all; 0 without any)."""
    top = sorted(range(len(examples)), key=lambda i: -blame[i])[:k]
    targets = [examples[i].target for i in top if examples[i].target in REFUSALS]
    return max(targets.count(t) for t in set(targets)) / len(targets) if targets else 0.0


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
