"""Op kind: strided max and average pooling (modules, timm "SAME" pools, ``F.max_pool2d`` / ``F.avg_pool2d``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polyglean.sites.geometry import Phase, as_pair, check_phase, output_size, same_padding, window
from polyglean.sites.ops import FunctionPhaseOp, ModulePhaseOp, bind, register_function_op, register_module_op

__all__ = ["AvgPool2dPhase", "AvgPool2dSamePhase", "FunctionalAvgPool2dPhase", "FunctionalMaxPool2dPhase",
           "MaxPool2dPhase", "MaxPool2dSamePhase", "avg_pool2d_phase", "max_pool2d_phase"]

_MAX_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_MAX_DEFAULTS: dict[str, Any] = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False,
                                 "return_indices": False}
_AVG_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_AVG_DEFAULTS: dict[str, Any] = {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True,
                                 "divisor_override": None}


def max_pool2d_phase(
    x: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    ceil_mode: bool = False,
    *,
    phase: Phase = (0, 0),
    explicit_padding: tuple[int, int, int, int] | None = None,
) -> Tensor:
    """2-D max pooling at phase ``phase`` of its stride; padding and the extension are ``-inf``.

    Args:
        x: Input.
        kernel_size: As ``F.max_pool2d``.
        stride: As ``F.max_pool2d`` (defaults to ``kernel_size``).
        padding: As ``F.max_pool2d``; ignored when ``explicit_padding`` is given.
        dilation: As ``F.max_pool2d``.
        ceil_mode: As ``F.max_pool2d``; it only changes the output size.
        phase: ``(dy, dx)``.
        explicit_padding: ``(left, right, top, bottom)`` of ``-inf``, e.g. TF "SAME".

    Shape:
        - x: ``(N, C, H, W)`` or ``(C, H, W)``
        - output: the shape of the default pooling.
    """
    k = as_pair(kernel_size, "kernel_size")
    s = as_pair(stride if stride is not None and stride != [] else kernel_size, "stride")
    d = as_pair(dilation, "dilation")
    check_phase(phase, s)
    if explicit_padding is not None:
        pads = explicit_padding
    else:
        ph, pw = as_pair(padding, "padding")
        pads = (pw, pw, ph, ph)
    pl, pr, pt, pb = pads
    out_h = output_size(x.shape[-2], pt + pb, k[0], s[0], d[0], ceil_mode, pt)
    out_w = output_size(x.shape[-1], pl + pr, k[1], s[1], d[1], ceil_mode, pl)
    needed = ((out_h - 1) * s[0] + d[0] * (k[0] - 1) + 1, (out_w - 1) * s[1] + d[1] * (k[1] - 1) + 1)
    shifted = window(x, pads, float("-inf"), phase, needed)
    return F.max_pool2d(shifted, k, s, 0, d, False)


def avg_pool2d_phase(
    x: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
    *,
    phase: Phase = (0, 0),
) -> Tensor:
    """2-D average pooling at phase ``phase`` of its stride.

    Sums use zero padding. The divisor follows PyTorch: with ``count_include_pad`` it is the window's overlap with
    the padded input, else with the input; positions past the padded input (``ceil_mode`` windows, the phase
    extension) are never counted, and a window with nothing to count gives 0. ``divisor_override`` replaces the
    divisor.

    Shape:
        - x: ``(N, C, H, W)`` or ``(C, H, W)``
        - output: the shape of the default pooling.
    """
    k = as_pair(kernel_size, "kernel_size")
    s = as_pair(stride if stride is not None and stride != [] else kernel_size, "stride")
    check_phase(phase, s)
    ph, pw = as_pair(padding, "padding")
    pads = (pw, pw, ph, ph)
    out_h = output_size(x.shape[-2], 2 * ph, k[0], s[0], 1, ceil_mode, ph)
    out_w = output_size(x.shape[-1], 2 * pw, k[1], s[1], 1, ceil_mode, pw)
    needed = ((out_h - 1) * s[0] + k[0], (out_w - 1) * s[1] + k[1])
    sums = F.avg_pool2d(window(x, pads, 0.0, phase, needed), k, s, 0, False, True, 1)
    if divisor_override:
        return sums / divisor_override
    ones = x.new_ones((1, 1, x.shape[-2], x.shape[-1]))
    if count_include_pad:
        mask = window(F.pad(ones, pads, value=1.0), (0, 0, 0, 0), 0.0, phase, needed)
    else:
        mask = window(ones, pads, 0.0, phase, needed)
    counts = F.avg_pool2d(mask, k, s, 0, False, True, 1).clamp_min(1.0)  # windows wholly past the input read 0
    if x.dim() == 3:
        counts = counts[0]
    return sums / counts


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

try:  # timm.layers does not export MaxPool2dSame (timm 1.0): import both from their own module
    from timm.layers.pool2d_same import AvgPool2dSame as _TimmAvgSame
    from timm.layers.pool2d_same import MaxPool2dSame as _TimmMaxSame
except ImportError:  # pragma: no cover
    _TimmAvgSame = _TimmMaxSame = None

if _TimmMaxSame is not None and _TimmAvgSame is not None:

    @register_module_op(_TimmMaxSame)
    def _max_pool2d_same(module: nn.Module, name: str) -> MaxPool2dSamePhase | None:
        factor = _factor(module.kernel_size, module.stride)
        return MaxPool2dSamePhase(module, name, factor) if factor != (1, 1) else None

    @register_module_op(_TimmAvgSame)
    def _avg_pool2d_same(module: nn.Module, name: str) -> AvgPool2dSamePhase | None:
        factor = _factor(module.kernel_size, module.stride)
        return AvgPool2dSamePhase(module, name, factor) if factor != (1, 1) else None
