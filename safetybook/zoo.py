"""The book's named models and artifacts: each is built on first use, cached under ``.cache/``
keyed by everything it depends on, and shared by every chapter and the CLI.

This is the library's top floor: it may call training, attribution and measurement, and nothing
below it imports it. Everything below takes a model as an argument, so the tests can hand it a
tiny one.

- models: ``"base"`` (the embedded SmolLM2-135M-Instruct), ``"tuned"`` (the safety fine-tune),
  ``"repaired"`` (its attribution-guided repair), ``"control"`` (the repair's random-removal control),
  or a hub id with a ``/`` (needs network; never used by the book itself);
- artifacts: the guard (``guard``, a probe on the request's mean activation), the last-token
  harmfulness probe (``harm_probe``), its layer (``monitor_layer``) and the generation monitor's threshold
  (``probe_threshold``), the refusal direction (``refusal_direction``) and the condition of
  conditional steering (``condition_gate``).
"""
from __future__ import annotations

import os
from dataclasses import asdict, replace

import numpy as np
import torch
from torch import nn

from .adapters import SETTINGS, Example, LoraSettings, ensure_adapter, merged_model, safety_examples
from .cache import cache_dir, computing, digest, read_json, read_tensors, write_json, write_tensors
from .data import load_prompts, prompts, wrap, wrapper_families
from .directions import (
    ADD_TARGET,
    CANDIDATE_LAYERS,
    COEFFICIENTS,
    Gate,
    Probe,
    RefusalDirection,
    choose_gate,
    choose_probe_layer,
    fit_probe,
    prompt_activations,
)
from .interventions import (
    RECIPE_DEPTH,
    RECIPE_INDUCE,
    RECIPE_KL,
    RecipeScreen,
    screen_refusal_candidates,
    select_refusal_direction,
)
from .models import (
    LOADED,
    TOKENIZERS,
    ModelError,
    decoder_layers,
    fingerprint,
    load_base,
    tokenizer_for,
    unload_model,
)
from .monitor import MONITOR_FPR, MONITOR_LAYERS, held_out_threshold, holdout_monitor
from .refusal import refusal_score

__all__ = ["LOCAL_NAMES", "READINGS", "condition_gate", "guard", "harm_probe", "load_model", "load_run", "monitor_layer",
           "monitor_probe", "pooled_monitor", "probe_activations", "probe_threshold", "recipe", "refusal_direction", "unload_model"]

LOCAL_NAMES = ("base", "tuned", "repaired", "control")


def recipe(name: str, seed: int = 0) -> tuple[list[Example], LoraSettings]:
    """The training examples and settings behind a named adapter. ``seed`` picks another training run
    of the same recipe: the training seed (the adapters' random start and the batches' order) and, for
    the control, also which examples are drawn at random. Seed 0 is the named model itself."""
    from . import repair

    if seed < 0:
        raise ValueError(f"seed must be 0 or more, not {seed}")
    settings = replace(SETTINGS, seed=seed)  # equal to SETTINGS (seed 0) for the named model
    if name == "tuned":
        return safety_examples(), settings
    if name == "repaired":
        return repair.repaired_examples(), settings
    if name == "control":
        return repair.control_examples(seed=seed), settings
    raise KeyError(name)


def load_run(name: str, seed: int) -> tuple[nn.Module, object]:
    """Another training run of a named fine-tune (``recipe(name, seed)``), trained on first use and
    cached like the named ones. Seed 0 is ``load_model(name)``. Runs are not kept in memory: the
    caller frees each one (``del``) before loading the next."""
    if name not in LOCAL_NAMES or name == "base":
        raise ModelError(f"only a fine-tune has training runs ({', '.join(LOCAL_NAMES[1:])}), not {name!r}")
    if seed == 0:
        return load_model(name)
    examples, settings = recipe(name, seed)
    return merged_model(ensure_adapter(examples, settings, name)), tokenizer_for("base")


def load_model(name: str = "base"):
    """Return ``(model, tok)`` for ``name``, loading it once per process (``unload_model`` frees it).

    The fine-tunes are trained on first use and then loaded from the cache in seconds.
    """
    if name in LOADED:
        return LOADED[name], tokenizer_for(name)
    if name == "base":
        load_base()
    elif name in LOCAL_NAMES:
        examples, settings = recipe(name)
        LOADED[name] = merged_model(ensure_adapter(examples, settings, name))
    elif "/" in name:
        LOADED[name] = _load_hub(name)
    else:
        raise ModelError(
            f"unknown model name {name!r}: use one of {', '.join(LOCAL_NAMES)} or a hub id like org/model"
        )
    return LOADED[name], tokenizer_for(name)


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
    TOKENIZERS[name] = tok
    return model.eval().requires_grad_(False)


def _weights_key(model_name: str) -> str:
    """'' for the embedded base model (it never changes); a fine-tune's weights otherwise."""
    return "" if model_name == "base" else fingerprint(load_model(model_name)[0])


def probe_sets() -> tuple[list[str], list[str], list[str], list[str], list[str]]:
    """The guard probe's train prompts: harmful, harmless, borderline, wrapped harmful, wrapped harmless."""
    harmful, harmless = prompts("harmful", "train"), prompts("harmless", "train")
    return harmful, harmless, prompts("borderline", "train"), wrap(harmful, "train"), wrap(harmless, "train")


def probe_groups() -> list[str]:
    """One group name for each of the guard probe's train prompts, positives then negatives as
    ``_probe_activations`` orders them: a harmful prompt, its harmless twin and their wrapped versions
    share a group, so cross-validation holds them out together."""
    harmful, harmless, border, _, _ = probe_sets()
    pair = {r.prompt: r.pair for r in load_prompts(split="train")}
    return ([pair[p] for p in harmful] * 2 + [pair[p] for p in harmless] * 2
            + [f"borderline-{i}" for i in range(len(border))])


def probe_rows() -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """The guard probe's train prompts as one list in the order of ``probe_groups`` (harmful, wrapped
    harmful, harmless, wrapped harmless, borderline), with whether each is harmful, whether it is
    harmless (plain or wrapped), and its wrapper family (``""`` for a plain prompt)."""
    harmful, harmless, border, harmful_wrapped, harmless_wrapped = probe_sets()
    texts = harmful + harmful_wrapped + harmless + harmless_wrapped + border
    sizes = [len(harmful), len(harmful_wrapped), len(harmless), len(harmless_wrapped), len(border)]
    kind = np.repeat(np.arange(5), sizes)
    families = ([""] * len(harmful) + wrapper_families(len(harmful), "train") + [""] * len(harmless)
                + wrapper_families(len(harmless), "train") + [""] * len(border))
    return texts, kind < 2, (kind == 2) | (kind == 3), families


#: The two readings of the residual stream that ``prompt_activations`` gives from one forward pass.
READINGS = ("last", "mean")


def probe_activations(model_name: str, reading: str = "last") -> tuple[torch.Tensor, torch.Tensor]:
    """Activations ``[layer, prompt, d]`` at every layer of ``model_name`` for the probe's positive and
    negative train prompts, read at the last prompt token (``"last"``) or averaged over the request's
    tokens (``"mean"``). One forward pass gives both readings at every layer, so every probe, gate and
    threshold on these prompts shares it; cached on disk as safetensors."""
    if reading not in READINGS:
        raise ValueError(f"unknown reading {reading!r}: use one of {', '.join(READINGS)}")
    harmful, harmless, border, harmful_wrapped, harmless_wrapped = probe_sets()
    positive, negative = harmful + harmful_wrapped, harmless + harmless_wrapped + border
    key = digest(positive, negative, _weights_key(model_name), READINGS)
    path = cache_dir("activations") / f"probe-{model_name}-{key}.safetensors"
    saved = read_tensors(path)
    if saved is None:
        with computing(f"the activations of '{model_name}' on the probe's {len(positive) + len(negative)} train prompts"):
            model, tok = load_model(model_name)
            acts = prompt_activations(model, tok, positive + negative)
            saved = {f"{kind}/{side}": a[:, rows].contiguous() for kind, a in acts.items()
                     for side, rows in (("positive", slice(0, len(positive))), ("negative", slice(len(positive), None)))}
            write_tensors(path, saved)
    return saved[f"{reading}/positive"], saved[f"{reading}/negative"]


def _probe_key(model_name: str) -> str:
    """What the probe's cached artifacts depend on: its train prompts and ``model_name``'s weights."""
    harmful, harmless, border, harmful_wrapped, harmless_wrapped = probe_sets()
    positive, negative = harmful + harmful_wrapped, harmless + harmless_wrapped + border
    weights = _weights_key(model_name)
    return digest(positive, negative) if not weights else digest(positive, negative, weights)


def probe_layer_choice(model_name: str = "base") -> tuple[int, list[float]]:
    """The layer of the book's last-token harmfulness probe on ``model_name``, and every layer's
    cross-validated balanced accuracy: the best layer by ``directions.choose_probe_layer`` (five folds
    grouped by prompt pair, ``probe_groups``) on the probe's train rows. Chosen once, cached as JSON."""
    key = _probe_key(model_name)
    path = cache_dir("probes") / f"layer-{model_name}-{key}.json"
    cached = read_json(path)
    if cached is not None:
        return cached["layer"], cached["cv_accuracy"]
    with computing(f"the harmfulness probe's layer for '{model_name}'"):
        layer, cv = choose_probe_layer(*probe_activations(model_name, "last"), probe_groups())
        write_json(path, {"layer": layer, "cv_accuracy": [float(c) for c in cv]})
    return layer, [float(c) for c in cv]


def monitor_layer(model_name: str = "base") -> int:
    """The layer the generation monitor's probe reads (``probe_layer_choice``), chosen on train."""
    return probe_layer_choice(model_name)[0]


def harm_probe(model_name: str = "base", layer: int | None = None) -> Probe:
    """The book's harmfulness probe at ``layer`` of ``model_name`` (default: ``monitor_layer``, chosen
    on train): harmful train prompts, plain and jailbreak-wrapped, against harmless ones (plain and
    wrapped, so that the wrapper alone is no cue) and borderline ones. Trained once, cached as JSON
    (never pickle)."""
    layer = monitor_layer(model_name) if layer is None else layer
    key = _probe_key(model_name)
    path = cache_dir("probes") / f"harm-{model_name}-L{layer}-{key}.json"
    cached = read_json(path)
    if cached is not None:
        return Probe(**cached)
    with computing(f"the harmfulness probe of '{model_name}' at layer {layer}"):
        pos, neg = probe_activations(model_name)
        probe = fit_probe(layer, pos[layer], neg[layer])
        write_json(path, asdict(probe))
    return probe


def probe_threshold(model_name: str = "base", layer: int | None = None, false_positive_rate: float = 0.05) -> float:
    """The monitor's threshold for ``harm_probe(model_name, layer)`` (default layer: ``monitor_layer``):
    it flags ``false_positive_rate`` of harmless train prompts (plain and wrapped), scored by probes
    that did not see them (``monitor.held_out_threshold``). Computed once, cached as JSON."""
    layer = monitor_layer(model_name) if layer is None else layer
    harmful, harmless, border, harmful_wrapped, harmless_wrapped = probe_sets()
    positive, negative = harmful + harmful_wrapped, harmless + harmless_wrapped + border
    path = cache_dir("probes") / f"threshold-{model_name}-L{layer}-{false_positive_rate}-{digest(positive, negative)}.json"
    cached = read_json(path)
    if cached is not None:
        return cached["threshold"]
    with computing(f"the monitor's threshold for '{model_name}' at layer {layer}"):
        pos, neg = probe_activations(model_name)
        acts = torch.cat([pos[layer], neg[layer]])
        labels = np.r_[np.ones(len(positive)), np.zeros(len(negative))]
        groups = list(range(len(harmful))) * 2 + [len(harmful) + i for i in range(len(harmless))] * 2
        groups += [len(harmful) + len(harmless) + i for i in range(len(border))]
        harmless_rows = slice(len(positive), len(positive) + 2 * len(harmless))
        threshold, scores = held_out_threshold(acts, labels, groups, layer, harmless_rows, false_positive_rate)
        write_json(path, {"threshold": threshold, "held_out_scores": scores.tolist()})
    return threshold


def monitor_probe(model_name: str = "base") -> tuple[Probe, float]:
    """The latent monitor's probe and threshold for ``model_name`` (for ``monitor.checked_generate``)."""
    layer = monitor_layer(model_name)
    return harm_probe(model_name, layer), probe_threshold(model_name, layer)


def pooled_monitor(model_name: str = "base") -> tuple[Probe, float]:
    """The book's latent monitor for ``model_name``, behind ``generate --monitor probe``: a probe on the
    residual stream averaged over the request (``probe_activations(model_name, "mean")``), its layer
    chosen among ``MONITOR_LAYERS`` by grouped cross-validation on the guard's train rows and its
    threshold set to flag ``MONITOR_FPR`` of their harmless rows by held-out scores
    (``monitor.holdout_monitor``, with every wrapper family seen). The generation chapter measures it
    on test prompts and on jailbreak families it never saw. Computed once, cached as JSON."""
    path = cache_dir("probes") / f"pooled-{model_name}-{digest(_probe_key(model_name), MONITOR_LAYERS, MONITOR_FPR)}.json"
    cached = read_json(path)
    if cached is not None:
        return Probe(**cached["probe"]), cached["threshold"]
    acts = torch.cat(probe_activations(model_name, "mean"), dim=1)
    with computing(f"the pooled monitor of '{model_name}'"):
        _, labels, harmless, families = probe_rows()
        probe, threshold = holdout_monitor(acts, labels, probe_groups(), families, None, harmless,
                                           list(MONITOR_LAYERS), MONITOR_FPR)
        write_json(path, {"probe": asdict(probe), "threshold": threshold})
    return probe, threshold


def refusal_direction(model_name: str = "tuned", n_select: int = 32, target: float = ADD_TARGET) -> RefusalDirection:
    """The refusal direction of ``model_name``, chosen on train prompts only
    (``interventions.select_refusal_direction``), found once and cached as JSON."""
    model, tok = load_model(model_name)
    harmful, harmless = prompts("harmful", "train"), prompts("harmless", "train")
    key = digest(fingerprint(model), harmful, harmless, n_select, target, CANDIDATE_LAYERS, COEFFICIENTS)
    path = cache_dir("directions") / f"refusal-{model_name}-{key}.json"
    cached = read_json(path)
    if cached is not None:
        return RefusalDirection(**cached)
    with computing(f"the refusal direction of '{model_name}'"):
        result = select_refusal_direction(model, tok, harmful, harmless, n_select, target)
        write_json(path, asdict(result))
    return result


#: Arditi et al.'s screen in the book: every second layer, 8 + 8 train prompts per candidate. 12 + 12
#: took 200 s on 2 cores and every layer at 16 + 16 took 460 s; both found no candidate that passes
#: all three filters, as this one does.
RECIPE_LAYER_STEP, RECIPE_SELECT = 2, 8


def recipe_screen(model_name: str = "tuned") -> RecipeScreen:
    """Arditi et al.'s selection of the refusal direction for ``model_name``
    (``interventions.screen_refusal_candidates``), from the train prompts that the model refuses
    (harmful, score above 0.5) and answers (harmless, below 0.5). Found once and cached as JSON."""
    model, tok = load_model(model_name)
    harmful, harmless = prompts("harmful", "train"), prompts("harmless", "train")
    layers = list(range(0, len(decoder_layers(model)), RECIPE_LAYER_STEP))
    book = (refusal_direction(model_name).layer, -1)  # the book's own direction, scored even where excluded
    key = digest(fingerprint(model), harmful, harmless, layers, book, RECIPE_SELECT, RECIPE_KL, RECIPE_INDUCE,
                 RECIPE_DEPTH)
    path = cache_dir("directions") / f"recipe-{model_name}-{key}.json"
    cached = read_json(path)
    if cached is None:
        with computing(f"Arditi et al.'s screen of '{model_name}'"):
            refused = [p for p, s in zip(harmful, refusal_score(model, tok, harmful)) if s > 0.5]
            answered = [p for p, s in zip(harmless, refusal_score(model, tok, harmless)) if s < 0.5]
            screen, _ = screen_refusal_candidates(model, tok, refused, answered, RECIPE_SELECT, layers=layers,
                                                  also=book)
            cached = {**asdict(screen), **{k: np.where(np.isnan(v), None, v).tolist()
                                         for k, v in (("ablated", screen.ablated), ("kl", screen.kl),
                                                      ("induced", screen.induced))}}
            write_json(path, cached)
    arrays = {k: np.array(cached[k], dtype=float) for k in ("ablated", "kl", "induced")}
    chosen = tuple(cached["chosen"]) if cached["chosen"] is not None else None
    return RecipeScreen(**{**cached, **arrays, "chosen": chosen})


def condition_gate(model_name: str = "tuned") -> Gate:
    """The condition of the book's conditional steering for ``model_name``: a probe on activations
    pooled over the prompt (``probe_activations(model_name, "mean")``), fitted on the guard's train
    prompts, with its layer and threshold chosen by cross-validation on them (``directions.choose_gate``).
    Found once and cached as JSON."""
    harmful, harmless, border, harmful_wrapped, harmless_wrapped = probe_sets()
    positive, negative = harmful + harmful_wrapped, harmless + harmless_wrapped + border
    path = cache_dir("probes") / f"gate-{model_name}-{digest(positive, negative, _weights_key(model_name))}.json"
    cached = read_json(path)
    if cached is not None:
        return Gate(**{**cached, "probe": Probe(**cached["probe"])})
    pos, neg = probe_activations(model_name, "mean")
    with computing(f"the condition gate of '{model_name}' on {len(positive) + len(negative)} train prompts"):
        gate = choose_gate(pos, neg, probe_groups())
        write_json(path, asdict(gate))
    return gate


def guard(model_name: str = "base") -> Gate:
    """The book's guard, behind ``python -m safetybook guard``: the same probe as ``condition_gate``, read
    from ``model_name``. Of the two readings, the request's mean beats the last token in cross-validation
    on the train prompts at every layer the inference chapter shows (03a), so the guard pools."""
    return condition_gate(model_name)
