"""Op kind: strided 2-D convolutions (``nn.Conv2d``, timm's "SAME"-padded ``Conv2dSame``, ``F.conv2d``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polyglean.sites.geometry import Phase, as_pair, conv_padding, check_phase, output_size, same_padding, window
from polyglean.sites.ops import FunctionPhaseOp, ModulePhaseOp, bind, register_function_op, register_module_op

__all__ = ["Conv2dPhase", "Conv2dSamePhase", "FunctionalConv2dPhase", "StdConv2dSamePhase", "conv2d_phase"]

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS: dict[str, Any] = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def conv2d_phase(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    *,
    phase: Phase = (0, 0),
    padding_mode: str = "zeros",
    explicit_padding: tuple[int, int, int, int] | None = None,
) -> Tensor:
    """A 2-D convolution at phase ``phase`` of its stride.

    Args:
        x: Input.
        weight: Filters, ``(C_out, C_in / groups, k_h, k_w)``.
        bias: Optional bias ``(C_out,)``.
        stride: The subsampling factor ``(R_h, R_w)``.
        padding: As ``F.conv2d``; ignored when ``explicit_padding`` is given.
        dilation: As ``F.conv2d``.
        groups: As ``F.conv2d``.
        phase: ``(dy, dx)`` with ``0 <= dy < R_h``, ``0 <= dx < R_w``.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"`` (as ``nn.Conv2d``).
        explicit_padding: ``(left, right, top, bottom)``, for asymmetric padding such as TF "SAME".

    Returns:
        The convolution's stride-1 output sampled at rows ``i * R_h + dy``, columns ``j * R_w + dx``.

    Shape:
        - x: ``(N, C_in, H, W)``
        - output: ``(N, C_out, H_out, W_out)``, the shape of the default (phase ``(0, 0)``) convolution.

    Example:
        >>> x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
        >>> ref = F.conv2d(x, w, padding=1)[..., 1::2, 0::2]
        >>> torch.allclose(conv2d_phase(x, w, stride=2, padding=1, phase=(1, 0)), ref, atol=1e-5)
        True
    """
    s, d = as_pair(stride, "stride"), as_pair(dilation, "dilation")
    k = (weight.shape[-2], weight.shape[-1])
    pads = explicit_padding if explicit_padding is not None else conv_padding(padding, k, d)
    check_phase(phase, s)
    pl, pr, pt, pb = pads
    out_h = output_size(x.shape[-2], pt + pb, k[0], s[0], d[0], False, pt)
    out_w = output_size(x.shape[-1], pl + pr, k[1], s[1], d[1], False, pl)
    needed = ((out_h - 1) * s[0] + d[0] * (k[0] - 1) + 1, (out_w - 1) * s[1] + d[1] * (k[1] - 1) + 1)
    mode = "constant" if padding_mode == "zeros" else padding_mode
    shifted = window(x, pads, 0.0, phase, needed, mode)
    return F.conv2d(shifted, weight, bias, s, 0, d, groups)


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


class StdConv2dSamePhase(ModulePhaseOp):
    """timm's weight-standardised convolutions with dynamic "SAME" padding (``StdConv2dSame``,
    ``ScaledStdConv2dSame``; untraceable, so kept whole): the standardised weight, then the convolution at a phase."""

    kind = "std_conv_same"

    def standardized_weight(self) -> Tensor:
        """The weight the module convolves with (zero mean, unit variance per filter; scaled by ``gain * scale``)."""
        m = self.module
        gain = getattr(m, "gain", None)
        scale = (gain * m.scale).view(-1) if gain is not None else None
        flat = F.batch_norm(m.weight.reshape(1, m.out_channels, -1), None, None, weight=scale, training=True,
                            momentum=0.0, eps=m.eps)
        return flat.reshape_as(m.weight)

    def at_phase(self, phase: Phase, x: Tensor) -> Tensor:
        m = self.module
        k, s, d = m.weight.shape[-2:], as_pair(m.stride), as_pair(m.dilation)
        if m.same_pad:
            top, bottom = same_padding(x.shape[-2], k[0], s[0], d[0])
            left, right = same_padding(x.shape[-1], k[1], s[1], d[1])
            return conv2d_phase(x, self.standardized_weight(), m.bias, m.stride, 0, m.dilation, m.groups,
                                phase=phase, explicit_padding=(left, right, top, bottom))
        return conv2d_phase(x, self.standardized_weight(), m.bias, m.stride, m.padding, m.dilation, m.groups,
                            phase=phase)


try:
    from timm.layers.std_conv import ScaledStdConv2dSame as _TimmScaledStdSame
    from timm.layers.std_conv import StdConv2dSame as _TimmStdSame
except ImportError:  # pragma: no cover
    _TimmScaledStdSame = _TimmStdSame = None


def _std_conv_same(module: nn.Module, name: str) -> StdConv2dSamePhase | None:
    factor = as_pair(module.stride)
    return StdConv2dSamePhase(module, name, factor) if factor != (1, 1) else None


for _cls in (_TimmStdSame, _TimmScaledStdSame):
    if _cls is not None:
        register_module_op(_cls, _std_conv_same)
