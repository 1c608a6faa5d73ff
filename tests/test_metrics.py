"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from polyglean.metrics import classification_metrics, expected_calibration_error, fixed_broken, topk_accuracy


def test_topk() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0]])
    labels = torch.tensor([0, 2, 0])
    assert topk_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(logits, labels, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(logits, labels, 5) == 1.0


def test_ece_by_hand() -> None:
    # two confident right answers (conf ~0.9), one confident wrong one: ECE = |acc - conf| per bin, weighted
    p = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.6, 0.4]])
    labels = torch.tensor([0, 0, 1, 0])
    ece = expected_calibration_error(p.log(), labels, bins=15)
    expected = 3 / 4 * abs(2 / 3 - 0.9) + 1 / 4 * abs(1 - 0.6)
    assert ece == pytest.approx(expected, abs=1e-6)


def test_fixed_broken_and_nll() -> None:
    labels = torch.tensor([0, 1, 1])
    before = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    after = torch.tensor([[0.0, 2.0], [0.0, 2.0], [0.0, 2.0]])
    assert fixed_broken(after, before, labels) == (1, 1)
    m = classification_metrics(after, labels, before)
    assert m["top1"] == pytest.approx(200 / 3) and m["fixed"] == 1 and m["broken"] == 1
    nll = (2 * math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2))) / 3
    assert m["nll"] == pytest.approx(nll, rel=1e-5)
