"""Op kind: strided 2-D convolutions (``nn.Conv2d``, timm's "SAME"-padded ``Conv2dSame``, ``F.conv2d``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polyglean.phase.functional import Phase, as_pair, conv2d_phase, same_padding
from polyglean.sites.ops import FunctionPhaseOp, ModulePhaseOp, bind, register_function_op, register_module_op

__all__ = ["Conv2dPhase", "Conv2dSamePhase", "FunctionalConv2dPhase"]

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS: dict[str, Any] = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


class Conv2dPhase(ModulePhaseOp):
    """An ``nn.Conv2d`` (any kernel, padding, padding mode, dilation, groups) at any phase of its stride."""

    kind = "conv"

    def at_phase(self, phase: Phase, x: Tensor) -> Tensor:
        m = self.module
        return conv2d_phase(x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups,
                            phase=phase, padding_mode=m.padding_mode)


class Conv2dSamePhase(ModulePhaseOp):
    """A TF "SAME"-padded convolution (timm ``Conv2dSame``): asymmetric padding computed from the input size."""

    kind = "conv_same"

    def at_phase(self, phase: Phase, x: Tensor) -> Tensor:
        m = self.module
        k, s, d = m.weight.shape[-2:], as_pair(m.stride), as_pair(m.dilation)
        top, bottom = same_padding(x.shape[-2], k[0], s[0], d[0])
        left, right = same_padding(x.shape[-1], k[1], s[1], d[1])
        return conv2d_phase(x, m.weight, m.bias, m.stride, 0, m.dilation, m.groups,
                            phase=phase, explicit_padding=(left, right, top, bottom))


class FunctionalConv2dPhase(FunctionPhaseOp):
    """A strided ``F.conv2d`` call in ``forward`` (e.g. a depthwise blur-then-subsample layer)."""

    kind = "conv"

    def at_phase(self, phase: Phase, *args: Any, **kwargs: Any) -> Tensor:
        a = bind(_CONV_ARGS, _CONV_DEFAULTS, args, kwargs)
        return conv2d_phase(a["input"], a["weight"], a["bias"], a["stride"], a["padding"], a["dilation"],
                            a["groups"], phase=phase)


@register_module_op(nn.Conv2d)
def _conv2d(module: nn.Module, name: str) -> Conv2dPhase | None:
    factor = as_pair(module.stride)
    return Conv2dPhase(module, name, factor) if factor != (1, 1) else None


def _functional_conv2d(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], name: str
                       ) -> FunctionalConv2dPhase | None:
    factor = as_pair(bind(_CONV_ARGS, _CONV_DEFAULTS, args, kwargs)["stride"])
    return FunctionalConv2dPhase(fn, name, factor) if factor != (1, 1) else None


for _fn in {F.conv2d, torch.conv2d}:
    register_function_op(_fn, _functional_conv2d)

try:  # timm is a dependency, but keep the core importable without it
    from timm.layers import Conv2dSame as _TimmConv2dSame
except ImportError:  # pragma: no cover
    _TimmConv2dSame = None

if _TimmConv2dSame is not None:

    @register_module_op(_TimmConv2dSame)
    def _conv2d_same(module: nn.Module, name: str) -> Conv2dSamePhase | None:
        factor = as_pair(module.stride)
        return Conv2dSamePhase(module, name, factor) if factor != (1, 1) else None
