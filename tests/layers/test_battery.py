"""The shared layer battery covers every registered layer, and it fails on a layer that breaks its contract."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch
from torch import nn

import tests.layers
from polyglean.layers import LAYERS, SoftPool2d, soft_pool2d
from tests.layers.battery import LayerBattery, LayerCase


def _battery_layers() -> set[str]:
    for info in pkgutil.iter_modules(tests.layers.__path__):
        if info.name.startswith("test_"):
            importlib.import_module(f"tests.layers.{info.name}")
    found, todo = set(), list(LayerBattery.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if hasattr(cls, "case"):
            found.add(cls.case.layer)
    return found


# Layers the single-input battery cannot drive, each with where its checks live instead.
OWN_TESTS = {"cad": "two inputs (features, mask): tests/layers/test_cad.py (naive loop, gradcheck, masks, swap)"}


def test_every_registered_layer_has_a_battery() -> None:
    missing = set(LAYERS) - _battery_layers() - set(OWN_TESTS)
    assert not missing, f"layers without a LayerBattery subclass in tests/layers: {sorted(missing)}"


class _Broken(nn.Module):
    """SoftPool whose forward ignores its padding: its function and its Module disagree."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = SoftPool2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return soft_pool2d(x, 3, 2, 0, True)


BROKEN = LayerCase(layer="broken", make=_Broken, function=lambda m, x: soft_pool2d(x, 3, 2, 1),
                   reference=lambda m, x: soft_pool2d(x, 3, 2, 1) + 1e-6, shapes=[((1, 2, 7, 7), (1, 2, 4, 4))],
                   grad_shape=(1, 1, 5, 5))


def test_the_battery_can_fail() -> None:
    battery = type("TestBroken", (LayerBattery,), {"case": BROKEN})()
    with pytest.raises(AssertionError):
        battery.test_module_equals_function(torch.float64, "cpu")
    with pytest.raises(AssertionError):
        battery.test_matches_naive_reference()
    with pytest.raises(AssertionError):
        battery.test_shapes()
    battery.case = LayerCase(layer="identity", make=nn.Identity, function=lambda m, x: x,
                             reference=lambda m, x: x, shapes=[((1, 2, 4, 4), (1, 2, 4, 4))], grad_shape=(1, 1, 2, 2))
    with pytest.raises(pytest.fail.Exception):  # a Module that accepts any input raises nothing
        battery.test_bad_input_raises()
