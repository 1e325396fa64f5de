"""Choosing a probe's layer on train prompts alone: cross-validation, grouped by prompt pair."""
from __future__ import annotations

import random

import pytest
import torch

from safetybook.directions import choose_probe_layer, probe_cv_accuracy


def _layers(n: int, d: int, separating: int, n_layers: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise at every layer; only ``separating`` moves the positives along one direction."""
    g = torch.Generator().manual_seed(seed)
    pos, neg = torch.randn(n_layers, n, d, generator=g), torch.randn(n_layers, n, d, generator=g)
    pos[separating, :, 0] += 4.0
    return pos, neg


def test_the_layer_that_separates_is_chosen():
    pos, neg = _layers(30, 16, separating=2)
    layer, cv = choose_probe_layer(pos, neg, groups=list(range(60)))
    assert layer == 2
    assert cv[2] > 0.9, cv
    assert max(cv[[0, 1, 3]]) < 0.75, cv


def test_a_prompt_pair_is_held_out_together():
    # each prompt appears twice (a twin in the same group): features are noise, so only a probe that
    # saw a held-out prompt's twin could score it above chance
    g = torch.Generator().manual_seed(1)
    pos, neg = torch.randn(1, 20, 200, generator=g), torch.randn(1, 20, 200, generator=g)
    pos, neg = pos.repeat(1, 2, 1), neg.repeat(1, 2, 1)
    twins = [i % 20 for i in range(40)] + [20 + i % 20 for i in range(40)]
    grouped = probe_cv_accuracy(pos, neg, twins)[0]
    alone = list(range(80))
    random.Random(0).shuffle(alone)  # every row its own group, twins spread over the folds
    leaky = probe_cv_accuracy(pos, neg, alone)[0]
    assert grouped < 0.7, grouped
    assert leaky > 0.9, leaky


def test_one_group_per_prompt_is_required():
    pos, neg = _layers(10, 4, separating=0, n_layers=1)
    with pytest.raises(ValueError, match="one group per prompt"):
        probe_cv_accuracy(pos, neg, groups=list(range(19)))
