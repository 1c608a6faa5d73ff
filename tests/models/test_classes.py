"""models.num_classes: the one place a model's class count comes from."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from polyglean.errors import ModelError
from polyglean.models import num_classes


def test_counts_logits_without_touching_a_model_in_train_mode() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 13)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert num_classes(model, (3, 8, 8)) == 13
    assert model.training  # its mode is restored
    for key, value in model.state_dict().items():  # and no BatchNorm statistic moved
        assert torch.equal(value, before[key]), key


def test_follows_the_model_dtype() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).to(torch.float64)
    assert num_classes(model, (3, 2, 2)) == 5


def test_refuses_what_is_not_a_classifier() -> None:
    with pytest.raises(ModelError, match=r"gives \(1, 4, 6, 6\) .* not \(1, classes\) logits"):
        num_classes(nn.Conv2d(3, 4, 3), (3, 8, 8))
