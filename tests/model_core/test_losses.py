"""Losses against independent brute-force references."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from model_core import LOSSES
from model_core.losses import cosent, distill_cosine, distill_mse, mnrl

torch.manual_seed(0)
U, V = torch.randn(6, 8), torch.randn(6, 8)
SCORES = torch.tensor([0.0, 1.5, 3.0, 3.0, 4.2, 5.0])


def _cos(i):
    return F.cosine_similarity(U[i], V[i], dim=0).item()


def test_cosent_equals_its_definition():
    scale = 20.0
    terms = [math.exp(scale * (_cos(i) - _cos(j)))
             for i, j in itertools.permutations(range(6), 2) if SCORES[i] < SCORES[j]]
    expected = math.log(1 + sum(terms))
    assert cosent(U, V, SCORES, scale=scale).item() == pytest.approx(expected, rel=1e-5)


def test_cosent_only_depends_on_the_order_of_the_gold_scores():
    torch.testing.assert_close(cosent(U, V, SCORES), cosent(U, V, SCORES * 7 + 3))


def test_mnrl_is_cross_entropy_over_in_batch_candidates():
    scale = 20.0
    expected = 0.0
    for i in range(6):
        logits = [scale * F.cosine_similarity(U[i], V[j], dim=0).item() for j in range(6)]
        expected += -logits[i] + math.log(sum(math.exp(x) for x in logits))
    assert mnrl(U, V, scale=scale).item() == pytest.approx(expected / 6, rel=1e-5)


def test_symmetric_mnrl_averages_both_directions():
    torch.testing.assert_close(LOSSES["mnrl_symmetric"](U, V), (mnrl(U, V) + mnrl(V, U)) / 2)


def test_cosine_loss_is_mse_of_cosine_to_score():
    target = SCORES / 5
    expected = sum((_cos(i) - target[i].item()) ** 2 for i in range(6)) / 6
    assert LOSSES["cosine"](U, V, target).item() == pytest.approx(expected, rel=1e-5)


def test_distillation_losses_vanish_on_the_teacher_and_not_elsewhere():
    assert distill_mse(U, U).item() == 0.0 and distill_cosine(U, 3 * U).item() == pytest.approx(0.0, abs=1e-6)
    assert distill_mse(U, V).item() == pytest.approx(((U - V) ** 2).mean().item())
    assert distill_cosine(U, -U).item() == pytest.approx(2.0)


def test_classification_losses_match_torch_references():
    logits, labels = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    torch.testing.assert_close(LOSSES["cross_entropy"](logits, labels), F.cross_entropy(logits, labels))
    multi_hot = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0], [1, 0, 0]]).float()
    expected = -(multi_hot * F.logsigmoid(logits) + (1 - multi_hot) * F.logsigmoid(-logits)).mean()
    torch.testing.assert_close(LOSSES["bce"](logits, multi_hot), expected)


def test_losses_run_in_float32_on_half_precision_outputs():
    for name in ("mnrl", "cosent", "distill_mse"):
        args = (U.half(), V.half(), SCORES) if name == "cosent" else (U.half(), V.half())
        assert LOSSES[name](*args).dtype == torch.float32
