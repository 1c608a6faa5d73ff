"""A tiny CNN with two stride-2 sites and a small labelled image folder, for fast experiment tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from polyglean.models import Preprocess


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    with torch.no_grad():
        model[-1].weight.mul_(20)  # spread the predictions over the classes
    return model.eval()


@pytest.fixture()
def preprocess() -> Preprocess:
    return Preprocess.resize_crop(resize=16, crop=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    root = tmp_path / "data"
    for cls in ("a", "b", "c"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            pixels = (torch.rand(20, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    return root
