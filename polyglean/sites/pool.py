"""Op kind: strided max and average pooling (modules, timm "SAME" pools, ``F.max_pool2d`` / ``F.avg_pool2d``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polyglean.phase.functional import Phase, as_pair, avg_pool2d_phase, max_pool2d_phase, same_padding
from polyglean.sites.ops import FunctionPhaseOp, ModulePhaseOp, bind, register_function_op, register_module_op

__all__ = ["AvgPool2dPhase", "AvgPool2dSamePhase", "FunctionalAvgPool2dPhase", "FunctionalMaxPool2dPhase",
           "MaxPool2dPhase", "MaxPool2dSamePhase"]

_MAX_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_MAX_DEFAULTS: dict[str, Any] = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False,
                                 "return_indices": False}
_AVG_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_AVG_DEFAULTS: dict[str, Any] = {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True,
                                 "divisor_override": None}


def _factor(kernel_size: Any, stride: Any) -> tuple[int, int]:
    return as_pair(stride if stride is not None and stride != [] else kernel_size)


def _refuse_indices(return_indices: bool, name: str) -> None:
    if return_indices:
        raise ValueError(
            f"max pooling at '{name}' returns indices (for unpooling); phases of such a layer are not supported"
        )


class MaxPool2dPhase(ModulePhaseOp):
    """An ``nn.MaxPool2d`` (padding, dilation, ``ceil_mode``) at any phase of its stride."""

    kind = "max_pool"

    def at_phase(self, phase: Phase, x: Tensor) -> Tensor:
        m = self.module
        return max_pool2d_phase(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, phase=phase)


class MaxPool2dSamePhase(ModulePhaseOp):
    """timm's ``MaxPool2dSame``: TF "SAME" padding with ``-inf``."""

    kind = "max_pool_same"

    def at_phase(self, phase: Phase, x: Tensor) -> Tensor:
        m = self.module
        k, s, d = as_pair(m.kernel_size), _factor(m.kernel_size, m.stride), as_pair(m.dilation)
        top, bottom = same_padding(x.shape[-2], k[0], s[0], d[0])
        left, right = same_padding(x.shape[-1], k[1], s[1], d[1])
        return max_pool2d_phase(x, k, s, 0, d, m.ceil_mode, phase=phase,
                                explicit_padding=(left, right, top, bottom))


class AvgPool2dPhase(ModulePhaseOp):
    """An ``nn.AvgPool2d`` (padding, ``ceil_mode``, ``count_include_pad``, ``divisor_override``)."""

    kind = "avg_pool"

    def at_phase(self, phase: Phase, x: Tensor) -> Tensor:
        m = self.module
        return avg_pool2d_phase(x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                                m.divisor_override, phase=phase)


class AvgPool2dSamePhase(ModulePhaseOp):
    """timm's ``AvgPool2dSame``: zero "SAME" padding that counts as input, then average pooling."""

    kind = "avg_pool_same"

    def at_phase(self, phase: Phase, x: Tensor) -> Tensor:
        m = self.module
        k, s = as_pair(m.kernel_size), _factor(m.kernel_size, m.stride)
        top, bottom = same_padding(x.shape[-2], k[0], s[0], 1)
        left, right = same_padding(x.shape[-1], k[1], s[1], 1)
        x = F.pad(x, (left, right, top, bottom))
        return avg_pool2d_phase(x, k, s, 0, m.ceil_mode, m.count_include_pad, phase=phase)


class FunctionalMaxPool2dPhase(FunctionPhaseOp):
    """A strided ``F.max_pool2d`` call in ``forward``."""

    kind = "max_pool"

    def at_phase(self, phase: Phase, *args: Any, **kwargs: Any) -> Tensor:
        a = bind(_MAX_ARGS, _MAX_DEFAULTS, args, kwargs)
        return max_pool2d_phase(a["input"], a["kernel_size"], a["stride"], a["padding"], a["dilation"],
                                a["ceil_mode"], phase=phase)


class FunctionalAvgPool2dPhase(FunctionPhaseOp):
    """A strided ``F.avg_pool2d`` call in ``forward``."""

    kind = "avg_pool"

    def at_phase(self, phase: Phase, *args: Any, **kwargs: Any) -> Tensor:
        a = bind(_AVG_ARGS, _AVG_DEFAULTS, args, kwargs)
        return avg_pool2d_phase(a["input"], a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"],
                                a["count_include_pad"], a["divisor_override"], phase=phase)


@register_module_op(nn.MaxPool2d)
def _max_pool2d(module: nn.Module, name: str) -> MaxPool2dPhase | None:
    factor = _factor(module.kernel_size, module.stride)
    if factor == (1, 1):
        return None
    _refuse_indices(module.return_indices, name)
    return MaxPool2dPhase(module, name, factor)


@register_module_op(nn.AvgPool2d)
def _avg_pool2d(module: nn.Module, name: str) -> AvgPool2dPhase | None:
    factor = _factor(module.kernel_size, module.stride)
    return AvgPool2dPhase(module, name, factor) if factor != (1, 1) else None


def _functional_max(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], name: str
                    ) -> FunctionalMaxPool2dPhase | None:
    a = bind(_MAX_ARGS, _MAX_DEFAULTS, args, kwargs)
    factor = _factor(a["kernel_size"], a["stride"])
    if factor == (1, 1):
        return None
    _refuse_indices(a["return_indices"], name)
    return FunctionalMaxPool2dPhase(fn, name, factor)


def _functional_avg(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], name: str
                    ) -> FunctionalAvgPool2dPhase | None:
    a = bind(_AVG_ARGS, _AVG_DEFAULTS, args, kwargs)
    factor = _factor(a["kernel_size"], a["stride"])
    return FunctionalAvgPool2dPhase(fn, name, factor) if factor != (1, 1) else None


for _fn in {F.max_pool2d, torch.max_pool2d}:
    register_function_op(_fn, _functional_max)
for _fn in {F.avg_pool2d, torch._C._nn.avg_pool2d}:
    register_function_op(_fn, _functional_avg)

try:
    from timm.layers import AvgPool2dSame as _TimmAvgSame
    from timm.layers import MaxPool2dSame as _TimmMaxSame
except ImportError:  # pragma: no cover
    _TimmAvgSame = _TimmMaxSame = None

if _TimmMaxSame is not None:

    @register_module_op(_TimmMaxSame)
    def _max_pool2d_same(module: nn.Module, name: str) -> MaxPool2dSamePhase | None:
        factor = _factor(module.kernel_size, module.stride)
        return MaxPool2dSamePhase(module, name, factor) if factor != (1, 1) else None

    @register_module_op(_TimmAvgSame)
    def _avg_pool2d_same(module: nn.Module, name: str) -> AvgPool2dSamePhase | None:
        factor = _factor(module.kernel_size, module.stride)
        return AvgPool2dSamePhase(module, name, factor) if factor != (1, 1) else None
