"""PASA, pixel-adaptive spatial anti-aliasing (Zou, Xiao, Yu & Lee, BMVC 2020), 2-D.

A content-aware low-pass filter before subsampling. A ``k x k`` convolution followed by batch norm predicts
``G * k^2`` logits per pixel; each group of ``k^2`` logits is normalised with its own softmax, so every channel
group ``g`` (the channels split into ``G`` consecutive groups) gets a ``k x k`` filter per pixel whose weights sum to
1 (the original code takes one softmax over all ``G * k^2`` logits, so a group's weights do not sum to 1). The
input is reflect-padded by ``(k - 1) // 2`` before and ``k // 2`` after, filtered, and subsampled by ``stride``::

    w[n, g, (u, v), i, j] = softmax_{(u, v)}(BN(Conv(pad(x)))[n, g * k^2 + u * k + v, i, j])
    y[n, c, i, j] = sum_{u, v} w[n, g(c), (u, v), i * s, j * s] * pad(x)[n, c, i * s + u, j * s + v]

Subsampling: the logits are predicted (and batch-normalised) at full resolution, as in the paper, but the filter
is evaluated only at the kept positions ``(i * s, j * s)`` — which equals filtering everywhere and slicing
``[..., ::s, ::s]``, at ``1 / s^2`` of the cost.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polyglean.layers._registry import register_layer
from polyglean.layers._utils import check_input
from polyglean.layers.phase_ops import subsample_at
from polyglean.layers.rules import (
    Rewrite,
    SwapContext,
    SwapSequential,
    conv_stride1,
    is_conv,
    is_pool,
    is_same_conv,
    pool_stride1,
    square_stride,
)
from polyglean.phase.functional import Phase
from polyglean.sites.ops import ModulePhaseOp

__all__ = ["PASA2d", "PASA2dPhase", "pasa2d", "pasa_weights"]


def _check_int(value: object, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _reflect_pad(x: Tensor, kernel_size: int, op: str) -> Tensor:
    before, after = (kernel_size - 1) // 2, kernel_size // 2
    if after == 0:
        return x
    if min(x.shape[-2:]) <= after:
        raise ValueError(
            f"{op}: reflect padding by {after} needs spatial size > {after}, got {tuple(x.shape[-2:])}; "
            f"use a smaller kernel_size or a larger input"
        )
    return F.pad(x, (before, after, before, after), mode="reflect")


def pasa_weights(logits: Tensor, kernel_size: int = 3) -> Tensor:
    """Per-pixel filter weights from the predicted logits: a softmax over each group's ``k^2`` logits.

    Args:
        logits: ``G * k^2`` logits per pixel, group-major (channel ``g * k^2 + u * k + v``).
        kernel_size: ``k``.

    Returns:
        Weights ``w[n, g, u * k + v, i, j]``, non-negative and summing to 1 over ``u * k + v`` for each group.

    Shape:
        - logits: ``(N, G * k^2, H, W)``
        - output: ``(N, G, k^2, H, W)``
    """
    k = _check_int(kernel_size, "kernel_size")
    if not isinstance(logits, Tensor) or logits.dim() != 4:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"pasa_weights expects 4-D logits (N, G*k^2, H, W), got {shape}")
    n, ch, h, w = logits.shape
    if ch % (k * k) or ch == 0:
        raise ValueError(
            f"logits have {ch} channels, not a positive multiple of kernel_size^2 = {k * k}; "
            f"the predictor must output groups * kernel_size^2 channels"
        )
    return torch.softmax(logits.reshape(n, ch // (k * k), k * k, h, w), dim=2)


def pasa2d(x: Tensor, logits: Tensor, kernel_size: int = 3, stride: int = 2) -> Tensor:
    """Pixel-adaptive low-pass filtering with per-group softmax weights, then subsampling.

    Args:
        x: Input.
        logits: Predicted filter logits at full resolution, ``G * k^2`` per pixel (group-major, see
            :func:`pasa_weights`); ``G`` is inferred and must divide ``C``.
        kernel_size: ``k``; the input is reflect-padded by ``(k - 1) // 2`` before and ``k // 2`` after.
        stride: Subsampling factor ``s``.

    Returns:
        ``y[n, c, i, j] = sum_{u,v} w[n, g(c), u*k+v, i*s, j*s] * pad(x)[n, c, i*s+u, j*s+v]`` with
        ``g(c) = c // (C / G)``, evaluated only at the kept positions.

    Raises:
        ValueError: If shapes disagree, ``G`` does not divide ``C``, or an argument is out of range.

    Shape:
        - x: ``(N, C, H, W)``
        - logits: ``(N, G * k^2, H, W)``
        - output: ``(N, C, ceil(H / s), ceil(W / s))``

    Example:
        >>> x = torch.randn(2, 4, 8, 8)
        >>> pasa2d(x, torch.zeros(2, 2 * 9, 8, 8)).shape  # zero logits: a 3x3 box filter
        torch.Size([2, 4, 4, 4])
    """
    check_input(x, 2, "pasa2d")
    k = _check_int(kernel_size, "kernel_size")
    s = _check_int(stride, "stride")
    weights = pasa_weights(logits, k)
    n, c, h, w = x.shape
    groups = weights.shape[1]
    if logits.shape[0] != n or tuple(logits.shape[2:]) != (h, w):
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} do not match input {tuple(x.shape)}; expected "
            f"(N, G*k^2, H, W) = ({n}, G*{k * k}, {h}, {w})"
        )
    if c % groups:
        raise ValueError(f"groups={groups} (from the logits) does not divide the {c} input channels")
    weights = weights[..., ::s, ::s]
    out_h, out_w = weights.shape[-2:]
    patches = F.unfold(_reflect_pad(x, k, "pasa2d"), k, stride=s)  # (N, C * k^2, out_h * out_w)
    patches = patches.reshape(n, groups, c // groups, k * k, out_h, out_w)
    out = (patches * weights.unsqueeze(2)).sum(dim=3)
    return out.reshape(n, c, out_h, out_w)


class PASA2d(nn.Module):
    """Pixel-adaptive spatial anti-aliasing, a Module over :func:`pasa2d`.

    ``logits = BN(Conv_kxk(reflect_pad(x)))`` with ``G * k^2`` output channels (no conv bias, as BN follows), then
    :func:`pasa2d`. The weights are normalised per group (see the module docstring).

    Args:
        in_channels: Input channels ``C``.
        kernel_size: Filter size ``k``.
        stride: Subsampling factor.
        groups: Number of channel groups ``G``, each with its own filter; must divide ``in_channels``.

    Shape:
        - input: ``(N, C, H, W)``
        - output: ``(N, C, ceil(H / stride), ceil(W / stride))``

    Example:
        >>> PASA2d(8, groups=2)(torch.randn(2, 8, 9, 9)).shape
        torch.Size([2, 8, 5, 5])
    """

    def __init__(self, in_channels: int, kernel_size: int = 3, stride: int = 2, groups: int = 2) -> None:
        super().__init__()
        self.in_channels = _check_int(in_channels, "in_channels")
        self.kernel_size = _check_int(kernel_size, "kernel_size")
        self.stride = _check_int(stride, "stride")
        self.groups = _check_int(groups, "groups")
        if in_channels % groups:
            raise ValueError(
                f"groups={groups} must divide in_channels={in_channels}; "
                f"choose groups from the divisors of {in_channels}"
            )
        k = self.kernel_size
        self.conv = nn.Conv2d(in_channels, groups * k * k, k, bias=False)
        self.bn = nn.BatchNorm2d(groups * k * k)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def logits(self, x: Tensor) -> Tensor:
        """The predicted filter logits ``BN(Conv(reflect_pad(x)))``, ``(N, G * k^2, H, W)``."""
        check_input(x, 2, "PASA2d")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"PASA2d expects {self.in_channels} input channels, got input {tuple(x.shape)}")
        return self.bn(self.conv(_reflect_pad(x, self.kernel_size, "PASA2d")))

    def forward(self, x: Tensor) -> Tensor:
        return pasa2d(x, self.logits(x), self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, kernel_size={self.kernel_size}, stride={self.stride}, groups={self.groups}"


class PASA2dPhase(ModulePhaseOp):
    """A :class:`PASA2d` at any phase of its stride."""

    kind = "pasa"

    def at_phase(self, phase: Phase, x: Tensor) -> Tensor:
        m = self.module
        y1 = pasa2d(x, m.logits(x), m.kernel_size, 1)
        s = m.stride
        out = (-(-x.shape[-2] // s), -(-x.shape[-1] // s))
        return subsample_at(y1, self.factor, phase, out)


def _pasa(channels: int, stride: int, kwargs: dict[str, Any]) -> PASA2d:
    """PASA2d with ``groups`` (default 2) reduced to a divisor of ``channels`` (e.g. 1 for an RGB stem)."""
    kwargs = dict(kwargs)
    groups = math.gcd(int(kwargs.pop("groups", 2)), channels)
    return PASA2d(channels, stride=stride, groups=groups, **kwargs)


def _pasa_rule(ctx: SwapContext) -> Rewrite | None:
    name, m = ctx.op.name, ctx.op.module
    s = square_stride(ctx, "PASA2d")
    if is_conv(ctx):
        if is_same_conv(m):  # Zou et al.: the adaptive low-pass before subsampling, then the conv at stride 1
            return Rewrite({name: SwapSequential(_pasa(m.in_channels, s, ctx.kwargs), conv_stride1(m), kept=1)},
                           name)
        return Rewrite({name: SwapSequential(conv_stride1(m), _pasa(m.out_channels, s, ctx.kwargs), kept=0)}, name)
    if is_pool(ctx):
        return Rewrite({name: SwapSequential(pool_stride1(m), _pasa(ctx.channels, s, ctx.kwargs), kept=None)},
                       name)
    return None


register_layer("pasa", swap_rule=_pasa_rule, phase_op=PASA2dPhase)(PASA2d)
