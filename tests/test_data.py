"""Checks on the prompt data in data/ (format and invariants described in data/README.md)."""

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"
PROMPTS = DATA / "prompts.jsonl"
JAILBREAKS = DATA / "jailbreaks.jsonl"
REFORMULATIONS = DATA / "reformulations.jsonl"
PHRASINGS = DATA / "phrasings.jsonl"

PROMPT_KEYS = {"prompt", "label", "category", "split", "pair"}
JAILBREAK_KEYS = {"name", "family", "template", "split"}
LABELS = {"harmful", "harmless", "borderline"}
SPLITS = {"train", "test"}
FAMILIES = {"role-play", "fiction", "ignore-instructions", "prefix-injection"}
FORMS = {"write", "instructions", "list", "hypothetical", "future", "fiction"}
MIN_COUNTS = {"harmful": 170, "harmless": 170, "borderline": 80}
MIN_CATEGORIES = 10
MIN_JAILBREAKS = 12
MIN_PER_FAMILY = 2


def read_jsonl(path):
    """Return a list of (line number, object); fail on any line that isn't a JSON object."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            assert line.strip(), f"{path.name}:{lineno}: blank line"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                pytest.fail(f"{path.name}:{lineno}: not valid JSON ({e}): {line[:80]!r}")
            assert isinstance(obj, dict), f"{path.name}:{lineno}: not a JSON object: {line[:80]!r}"
            rows.append((lineno, obj))
    assert rows, f"{path.name} is empty"
    return rows


def norm(text):
    return re.sub(r"\s+", " ", text.strip().lower())


@pytest.fixture(scope="module")
def prompts():
    return read_jsonl(PROMPTS)


@pytest.fixture(scope="module")
def jailbreaks():
    return read_jsonl(JAILBREAKS)


# --- prompts.jsonl -------------------------------------------------------------


def test_prompt_fields(prompts):
    for lineno, r in prompts:
        where = f"prompts.jsonl:{lineno}"
        assert set(r) == PROMPT_KEYS, f"{where}: keys {sorted(r)} != {sorted(PROMPT_KEYS)}"
        assert isinstance(r["prompt"], str) and r["prompt"].strip(), f"{where}: empty or non-string prompt"
        assert r["prompt"] == r["prompt"].strip(), f"{where}: leading/trailing whitespace in {r['prompt']!r}"
        assert r["label"] in LABELS, f"{where}: bad label {r['label']!r}"
        assert r["split"] in SPLITS, f"{where}: bad split {r['split']!r}"
        assert isinstance(r["category"], str) and r["category"].strip(), f"{where}: bad category {r['category']!r}"
        if r["label"] == "borderline":
            assert r["pair"] is None, f"{where}: borderline prompt has pair {r['pair']!r}: {r['prompt']!r}"
        else:
            assert isinstance(r["pair"], str) and r["pair"], (
                f"{where}: {r['label']} prompt without a pair id: {r['prompt']!r}"
            )


def test_label_counts(prompts):
    counts = Counter(r["label"] for _, r in prompts)
    for label, minimum in MIN_COUNTS.items():
        assert counts[label] >= minimum, f"only {counts[label]} {label} prompts, need >= {minimum}"


def test_categories_cover_all_labels(prompts):
    by_cat = defaultdict(set)
    for _, r in prompts:
        by_cat[r["category"]].add(r["label"])
    assert len(by_cat) >= MIN_CATEGORIES, f"only {len(by_cat)} categories: {sorted(by_cat)}"
    for cat, labels in sorted(by_cat.items()):
        assert labels == LABELS, f"category {cat!r} lacks labels {sorted(LABELS - labels)}"


def test_every_label_in_both_splits(prompts):
    seen = Counter((r["label"], r["split"]) for _, r in prompts)
    for label in sorted(LABELS):
        for split in sorted(SPLITS):
            assert seen[(label, split)] > 0, f"no {label} prompts in split {split!r}"


def test_no_duplicate_prompts(prompts):
    first = {}
    for lineno, r in prompts:
        key = norm(r["prompt"])
        assert key not in first, (
            f"prompts.jsonl:{lineno}: duplicate of line {first[key]}: {r['prompt']!r}"
        )
        first[key] = lineno


def test_no_prompt_in_both_splits(prompts):
    splits = defaultdict(set)
    for _, r in prompts:
        splits[norm(r["prompt"])].add(r["split"])
    leaked = sorted(p for p, s in splits.items() if len(s) > 1)
    assert not leaked, f"prompts in both train and test: {leaked[:5]}"


def test_pairs(prompts):
    members = defaultdict(list)
    for lineno, r in prompts:
        if r["pair"] is not None:
            members[r["pair"]].append((lineno, r))
    assert members, "no pair ids at all"
    for pid, rows in sorted(members.items()):
        where = f"pair {pid!r} (lines {[n for n, _ in rows]})"
        labels = sorted(r["label"] for _, r in rows)
        assert labels == ["harmful", "harmless"], (
            f"{where}: needs exactly one harmful and one harmless prompt, has {labels}"
        )
        splits = {r["split"] for _, r in rows}
        assert len(splits) == 1, f"{where}: members are in different splits {sorted(splits)}"
        cats = {r["category"] for _, r in rows}
        assert len(cats) == 1, f"{where}: members are in different categories {sorted(cats)}"


# --- jailbreaks.jsonl ----------------------------------------------------------


def test_jailbreak_fields(jailbreaks):
    for lineno, r in jailbreaks:
        where = f"jailbreaks.jsonl:{lineno}"
        assert set(r) == JAILBREAK_KEYS, f"{where}: keys {sorted(r)} != {sorted(JAILBREAK_KEYS)}"
        assert isinstance(r["name"], str) and re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", r["name"]), (
            f"{where}: name {r['name']!r} is not snake_case"
        )
        assert r["family"] in FAMILIES, f"{where}: bad family {r['family']!r}"
        assert r["split"] in SPLITS, f"{where}: bad split {r['split']!r}"


def test_jailbreak_templates(jailbreaks):
    for lineno, r in jailbreaks:
        where = f"jailbreaks.jsonl:{lineno} ({r.get('name')!r})"
        template = r["template"]
        assert isinstance(template, str), f"{where}: template is not a string"
        assert template.count("{prompt}") == 1, f"{where}: template must contain exactly one {{prompt}}"
        try:
            filled = template.format(prompt="x")
        except (KeyError, IndexError, ValueError) as e:
            pytest.fail(f"{where}: template is not str.format-able with prompt='x': {e!r}")
        assert "{" not in filled and "}" not in filled, (
            f"{where}: stray braces after formatting: {filled!r}"
        )


def test_jailbreak_names_unique(jailbreaks):
    first = {}
    for lineno, r in jailbreaks:
        assert r["name"] not in first, (
            f"jailbreaks.jsonl:{lineno}: name {r['name']!r} already used on line {first[r['name']]}"
        )
        first[r["name"]] = lineno


def test_jailbreak_counts_and_splits(jailbreaks):
    assert len(jailbreaks) >= MIN_JAILBREAKS, f"only {len(jailbreaks)} jailbreaks, need >= {MIN_JAILBREAKS}"
    per_family = Counter(r["family"] for _, r in jailbreaks)
    by_split = Counter((r["family"], r["split"]) for _, r in jailbreaks)
    for fam in sorted(FAMILIES):
        assert per_family[fam] >= MIN_PER_FAMILY, f"family {fam!r} has {per_family[fam]} wrappers, need >= {MIN_PER_FAMILY}"
        for split in sorted(SPLITS):
            assert by_split[(fam, split)] > 0, f"family {fam!r} has no wrapper in split {split!r}"


# --- reformulations.jsonl ------------------------------------------------------


def check_rewrites(rows, prompts, file: str, field: str, taken: frozenset = frozenset()) -> None:
    """Every harmful and harmless prompt of both splits rewritten exactly once (in ``field``), keeping the
    original's label, split and pair; no rewrite is its original, a prompt of the book, a text of ``taken``
    or another row's rewrite."""
    originals = {norm(r["prompt"]): r for _, r in prompts}
    seen = Counter()
    for lineno, r in rows:
        where = f"{file}:{lineno}"
        source = originals.get(norm(r["prompt"]))
        assert source is not None, f"{where}: {r['prompt']!r} is not a prompt of prompts.jsonl"
        assert (source["label"], source["split"], source["pair"]) == (r["label"], r["split"], r["pair"]), (
            f"{where}: label, split or pair differ from the original's"
        )
        text = r[field]
        assert isinstance(text, str) and text and text == text.strip(), f"{where}: empty rewrite or outer whitespace"
        assert norm(text) != norm(r["prompt"]), f"{where}: the rewrite is the original"
        assert norm(text) not in originals, f"{where}: the rewrite is itself a prompt of the book"
        assert norm(text) not in taken, f"{where}: the rewrite is already in another file of rewrites"
        seen[norm(r["prompt"])] += 1
    wanted = {k for k, r in originals.items() if r["split"] in SPLITS and r["label"] in ("harmful", "harmless")}
    assert set(seen) == wanted, f"{len(wanted - set(seen))} harmful or harmless prompts have no row in {file}"
    assert max(seen.values()) == 1, f"a prompt has two rows in {file}"
    texts = [norm(r[field]) for _, r in rows]
    assert len(set(texts)) == len(texts), f"two rewrites in {file} are the same"


def test_reformulations_cover_each_harmful_and_harmless_prompt_of_both_splits_once(prompts):
    rows = read_jsonl(REFORMULATIONS)
    for lineno, r in rows:
        where = f"reformulations.jsonl:{lineno}"
        assert set(r) == {"prompt", "reformulated", "tense", "label", "split", "pair"}, f"{where}: keys {sorted(r)}"
        assert r["tense"] == "past" and r["split"] in SPLITS, f"{where}: only past-tense train or test rows are expected"
    check_rewrites(rows, prompts, "reformulations.jsonl", "reformulated")


# --- phrasings.jsonl -----------------------------------------------------------


def test_phrasings_cover_each_harmful_and_harmless_prompt_of_both_splits_once(prompts):
    rows = read_jsonl(PHRASINGS)
    for lineno, r in rows:
        where = f"phrasings.jsonl:{lineno}"
        assert list(r) == ["prompt", "rephrased", "form", "label", "split", "pair"], f"{where}: keys {list(r)}"
        assert r["form"] in FORMS and r["split"] in SPLITS, f"{where}: bad form {r['form']!r} or split {r['split']!r}"
    past = frozenset(norm(r["reformulated"]) for _, r in read_jsonl(REFORMULATIONS))
    check_rewrites(rows, prompts, "phrasings.jsonl", "rephrased", taken=past)


def test_phrasings_forms_are_pair_matched_and_balanced():
    rows = read_jsonl(PHRASINGS)
    forms_of_pair = defaultdict(set)
    for _, r in rows:
        forms_of_pair[r["pair"]].add(r["form"])
    mixed = sorted(p for p, f in forms_of_pair.items() if len(f) > 1)
    assert not mixed, f"pairs whose harmful and harmless rows have different forms: {mixed[:5]}"
    for split in sorted(SPLITS):
        counts = Counter(r["form"] for _, r in rows if r["split"] == split)
        assert set(counts) == FORMS, f"split {split!r} lacks forms {sorted(FORMS - set(counts))}"
        assert max(counts.values()) <= 2 * min(counts.values()), f"split {split!r} has unbalanced forms {dict(counts)}"
