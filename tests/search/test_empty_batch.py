"""An empty batch is a clear error, not ``min() arg is an empty sequence``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from polyglean.errors import ArgumentError
from polyglean.phase.net import PhaseNet
from polyglean.search import PhaseSearch


def test_empty_batch_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    search = PhaseSearch(PhaseNet(model, (3, 16, 16)), budget=2)
    with pytest.raises(ArgumentError, match="the batch is empty"):
        search.run(torch.zeros(0, 3, 16, 16))
