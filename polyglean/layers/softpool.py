"""SoftPool (Stergiou, Poppe & Kalliatakis, ICCV 2021): softmax-weighted pooling, 1-D/2-D/3-D.

Each output is the softmax-weighted sum of the activations in its window, per channel::

    y = sum_{i in R} softmax(a_R)_i * a_i = sum_i e^{a_i} a_i / sum_j e^{a_j}

Compared with the original implementation, the weights here are computed per channel (its CPU path shares them
across channels and clamps activations to ``>= 0``), windows may overlap or leave gaps (``kernel_size !=
stride``), and ``padding``/``ceil_mode`` follow PyTorch's pooling layers, with padded positions treated as
absent (weight 0), not as zeros.

The computation is numerically stable: the windows are unfolded and the weights are a softmax over each window,
which subtracts the window maximum before exponentiating, i.e. the stable form
``avgpool(x * e^(x - m)) / avgpool(e^(x - m))`` with ``m`` the per-window maximum.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from polyglean.layers._registry import register_layer
from polyglean.layers._utils import check_input, ntuple, pool_windows
from polyglean.layers.phase_ops import pool_out, subsample_at
from polyglean.layers.rules import pooling_rule
from polyglean.phase.functional import Phase
from polyglean.sites.ops import ModulePhaseOp

__all__ = [
    "SoftPool1d",
    "SoftPool2dPhase",
    "SoftPool2d",
    "SoftPool3d",
    "soft_pool1d",
    "soft_pool2d",
    "soft_pool3d",
    "soft_pool_nd",
]

_IntOrSeq = int | Sequence[int]


def _normalise_args(
    dims: int,
    kernel_size: _IntOrSeq,
    stride: _IntOrSeq | None,
    padding: _IntOrSeq,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    kernel = ntuple(kernel_size, dims, "kernel_size")
    strides = kernel if stride is None else ntuple(stride, dims, "stride")
    pads = ntuple(padding, dims, "padding", minimum=0)
    return kernel, strides, pads


def soft_windows(windows: Tensor, mask: Tensor | None) -> Tensor:
    """SoftPool of unfolded windows ``(..., K)`` -> ``(...)``; ``mask`` marks the positions that exist."""
    logits = windows if mask is None else windows.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    return (weights * windows).sum(dim=-1)


def soft_pool_nd(
    x: Tensor,
    kernel_size: _IntOrSeq,
    stride: _IntOrSeq | None = None,
    padding: _IntOrSeq = 0,
    ceil_mode: bool = False,
    *,
    dims: int,
) -> Tensor:
    """SoftPool over the last ``dims`` dimensions of ``x``; see :func:`soft_pool2d` for the arguments."""
    op = f"soft_pool{dims}d"
    check_input(x, dims, op)
    kernel, strides, pads = _normalise_args(dims, kernel_size, stride, padding)
    windows, mask = pool_windows(x, kernel, strides, pads, bool(ceil_mode), op)
    return soft_windows(windows, mask)


def soft_pool1d(
    x: Tensor,
    kernel_size: _IntOrSeq,
    stride: _IntOrSeq | None = None,
    padding: _IntOrSeq = 0,
    ceil_mode: bool = False,
) -> Tensor:
    """1-D SoftPool; arguments as :func:`soft_pool2d`.

    Shape:
        - x: ``(N, C, L)``
        - output: ``(N, C, L_out)``, as ``F.avg_pool1d`` with the same arguments.
    """
    return soft_pool_nd(x, kernel_size, stride, padding, ceil_mode, dims=1)


def soft_pool2d(
    x: Tensor,
    kernel_size: _IntOrSeq,
    stride: _IntOrSeq | None = None,
    padding: _IntOrSeq = 0,
    ceil_mode: bool = False,
) -> Tensor:
    """2-D SoftPool: the softmax-weighted sum of each window, per channel.

    ``y[n, c, i, j] = sum_{r in R_ij} softmax(x[n, c, R_ij])_r * x[n, c, r]``, where ``R_ij`` is the pooling window
    of output ``(i, j)``. Padded positions are absent: they get weight 0.

    Args:
        x: Input.
        kernel_size: Window size, an int or ``(k_h, k_w)``.
        stride: Window step; defaults to ``kernel_size``.
        padding: Implicit padding on both sides, at most half the kernel size (as ``F.avg_pool2d``).
        ceil_mode: Use ``ceil`` instead of ``floor`` for the output size (as ``F.avg_pool2d``).

    Returns:
        The pooled tensor.

    Raises:
        TypeError: If ``x`` is not a floating-point tensor or an argument is not an int.
        ValueError: If ``x`` is not 4-D, or an argument is out of range.

    Shape:
        - x: ``(N, C, H, W)``
        - output: ``(N, C, H_out, W_out)``, as ``F.avg_pool2d`` with the same arguments.

    Example:
        >>> x = torch.tensor([[[[0.0, 1.0], [2.0, 1e4]]]])
        >>> soft_pool2d(x, 2)
        tensor([[[[10000.]]]])
    """
    return soft_pool_nd(x, kernel_size, stride, padding, ceil_mode, dims=2)


def soft_pool3d(
    x: Tensor,
    kernel_size: _IntOrSeq,
    stride: _IntOrSeq | None = None,
    padding: _IntOrSeq = 0,
    ceil_mode: bool = False,
) -> Tensor:
    """3-D SoftPool; arguments as :func:`soft_pool2d`.

    Shape:
        - x: ``(N, C, D, H, W)``
        - output: ``(N, C, D_out, H_out, W_out)``, as ``F.avg_pool3d`` with the same arguments.
    """
    return soft_pool_nd(x, kernel_size, stride, padding, ceil_mode, dims=3)


class _SoftPoolNd(nn.Module):
    dims: int = 0

    def __init__(
        self,
        kernel_size: _IntOrSeq,
        stride: _IntOrSeq | None = None,
        padding: _IntOrSeq = 0,
        ceil_mode: bool = False,
    ) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = _normalise_args(self.dims, kernel_size, stride, padding)
        self.ceil_mode = bool(ceil_mode)

    def forward(self, x: Tensor) -> Tensor:
        return soft_pool_nd(x, self.kernel_size, self.stride, self.padding, self.ceil_mode, dims=self.dims)

    def extra_repr(self) -> str:
        return (
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"ceil_mode={self.ceil_mode}"
        )


class SoftPool1d(_SoftPoolNd):
    """1-D SoftPool, a Module over :func:`soft_pool1d`.

    Args:
        kernel_size: Window size.
        stride: Window step; defaults to ``kernel_size``.
        padding: Implicit padding on both sides (padded positions are absent).
        ceil_mode: Use ``ceil`` for the output size.

    Shape:
        - input: ``(N, C, L)``
        - output: ``(N, C, L_out)``
    """

    dims = 1


class SoftPool2d(_SoftPoolNd):
    """2-D SoftPool, a Module over :func:`soft_pool2d`.

    Args:
        kernel_size: Window size.
        stride: Window step; defaults to ``kernel_size``.
        padding: Implicit padding on both sides (padded positions are absent).
        ceil_mode: Use ``ceil`` for the output size.

    Shape:
        - input: ``(N, C, H, W)``
        - output: ``(N, C, H_out, W_out)``

    Example:
        >>> SoftPool2d(3, stride=2, padding=1)(torch.randn(2, 4, 7, 7)).shape
        torch.Size([2, 4, 4, 4])
    """

    dims = 2


class SoftPool3d(_SoftPoolNd):
    """3-D SoftPool, a Module over :func:`soft_pool3d`.

    Args:
        kernel_size: Window size.
        stride: Window step; defaults to ``kernel_size``.
        padding: Implicit padding on both sides (padded positions are absent).
        ceil_mode: Use ``ceil`` for the output size.

    Shape:
        - input: ``(N, C, D, H, W)``
        - output: ``(N, C, D_out, H_out, W_out)``
    """

    dims = 3


class SoftPool2dPhase(ModulePhaseOp):
    """A :class:`SoftPool2d` at any phase of its stride: the stride-1 SoftPool, sliced."""

    kind = "soft_pool"

    def at_phase(self, phase: Phase, x: Tensor) -> Tensor:
        m = self.module
        y1 = soft_pool2d(x, m.kernel_size, 1, m.padding, False)
        return subsample_at(y1, self.factor, phase, pool_out(m, x))


register_layer("softpool", swap_rule=pooling_rule(SoftPool2d, "softpool"), phase_op=SoftPool2dPhase)(SoftPool2d)
