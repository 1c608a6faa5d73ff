"""The op-kind registries: the one Registry class, duplicates refused, subclasses that keep their base's forward."""

from __future__ import annotations

import pytest
import torch.nn.functional as F
from torch import nn

from polyglean.registry import Registry
from polyglean.sites import conv
from polyglean.sites.ops import (
    FUNCTION_KINDS,
    MODULE_KINDS,
    function_kinds,
    match_module,
    module_kinds,
    register_function_op,
    register_module_op,
)


def test_kinds_are_registries() -> None:
    assert isinstance(MODULE_KINDS, Registry) and isinstance(FUNCTION_KINDS, Registry)
    assert "torch.nn.modules.conv.Conv2d" in MODULE_KINDS
    assert nn.Conv2d in module_kinds() and nn.MaxPool2d in module_kinds()
    assert F.conv2d in function_kinds() and F.max_pool2d in function_kinds()


def test_timm_same_pools_are_registered() -> None:
    from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame

    assert MaxPool2dSame in module_kinds() and AvgPool2dSame in module_kinds()
    op = match_module(MaxPool2dSame(3, 2), "pool")
    assert op is not None and op.kind == "max_pool_same" and op.factor == (2, 2)


def test_duplicate_registration_is_an_error() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_module_op(nn.Conv2d, conv._conv2d)
    with pytest.raises(ValueError, match="already registered"):
        register_function_op(F.conv2d, conv._functional_conv2d)


def test_register_and_unregister_a_module_kind() -> None:
    class Strided(nn.Module):
        def forward(self, x):  # pragma: no cover - never run
            return x[..., ::2, ::2]

    def factory(module: nn.Module, name: str) -> None:
        return None

    register_module_op(Strided, factory)
    try:
        assert Strided in module_kinds()
        assert match_module(Strided(), "s") is None
    finally:
        MODULE_KINDS.unregister(f"{Strided.__module__}.{Strided.__qualname__}")
    assert Strided not in module_kinds()


def test_subclass_with_its_own_forward_is_not_matched() -> None:
    class Renamed(nn.Conv2d):
        pass

    class Changed(nn.Conv2d):
        def forward(self, x):  # pragma: no cover - never run
            return super().forward(x) * 2

    assert match_module(Renamed(3, 3, 3, stride=2), "r").factor == (2, 2)
    assert match_module(Changed(3, 3, 3, stride=2), "c") is None
