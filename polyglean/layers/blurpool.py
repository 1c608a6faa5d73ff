"""BlurPool (Zhang, ICML 2019, "Making Convolutional Networks Shift-Invariant Again"), 1-D/2-D/3-D.

A depthwise low-pass filter followed by subsampling: each channel is convolved with a normalised binomial filter
(the outer product of the rows ``[1]``, ``[1, 1]``, ``[1, 2, 1]``, ``[1, 3, 3, 1]``, ... of Pascal's triangle,
divided by its sum) after padding by ``(k - 1) // 2`` before and ``k // 2`` after along every spatial dimension,
and only every ``stride``-th output is computed. The two steps are one strided depthwise convolution
(``F.conv2d(..., stride=stride, groups=C)``), so site discovery sees a strided conv.

Anti-aliased rewrites: ``MaxPool(s=2) -> MaxPool(s=1) + BlurPool(s=2)``,
``Conv(s=2) + ReLU -> Conv(s=1) + ReLU + BlurPool(s=2)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polyglean.layers._registry import register_layer
from polyglean.layers._utils import check_input, ntuple

__all__ = [
    "PAD_TYPES",
    "BlurPool1d",
    "BlurPool2d",
    "BlurPool3d",
    "binomial_filter",
    "blur_pool1d",
    "blur_pool2d",
    "blur_pool3d",
    "blur_pool_nd",
]

MAX_FILTER_SIZE = 7

#: Accepted ``pad_type`` names and the ``F.pad`` mode each one means (Zhang's short names are aliases).
PAD_TYPES: dict[str, str] = {
    "reflect": "reflect",
    "refl": "reflect",
    "replicate": "replicate",
    "repl": "replicate",
    "zeros": "constant",
    "zero": "constant",
    "constant": "constant",
    "circular": "circular",
}

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _check_filter_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"filter size must be an int in 1..{MAX_FILTER_SIZE}, got {size!r}")
    if not 1 <= size <= MAX_FILTER_SIZE:
        raise ValueError(f"filter size must be in 1..{MAX_FILTER_SIZE} (binomial filters), got {size}")
    return size


def _check_pad_type(pad_type: str) -> str:
    if pad_type not in PAD_TYPES:
        known = ", ".join(repr(p) for p in PAD_TYPES)
        raise ValueError(f"unknown pad_type {pad_type!r}; expected one of {known}")
    return PAD_TYPES[pad_type]


def binomial_filter(
    size: int, dims: int = 2, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> Tensor:
    """The normalised binomial filter of ``size`` taps in ``dims`` dimensions.

    The outer product of the row ``[C(size-1, 0), ..., C(size-1, size-1)]`` with itself ``dims`` times, divided by
    its sum (``2^((size-1) * dims)``). The entries are dyadic rationals, exact in every float dtype.

    Args:
        size: Taps per dimension, 1..7.
        dims: Number of spatial dimensions, 1..3.
        dtype: Floating dtype of the result.
        device: Device of the result.

    Shape:
        - output: ``(size,) * dims``

    Example:
        >>> binomial_filter(3, 2) * 16
        tensor([[1., 2., 1.],
                [2., 4., 2.],
                [1., 2., 1.]])
    """
    _check_filter_size(size)
    if dims not in _CONV:
        raise ValueError(f"dims must be 1, 2 or 3, got {dims!r}")
    row = torch.tensor([math.comb(size - 1, i) for i in range(size)], dtype=torch.float64)
    row = row / row.sum()
    filt = row
    for _ in range(dims - 1):
        filt = filt.unsqueeze(-1) * row
    return filt.to(dtype=dtype, device=device)


def _check_blur_input(x: Tensor, dims: int, size: int, mode: str, op: str) -> None:
    """Validates the input of a blur pool (shape, dtype, and large enough for the padding mode)."""
    check_input(x, dims, op)
    after = size // 2
    sizes = tuple(x.shape[2:])
    if mode == "reflect" and after > 0 and min(sizes) <= after:
        raise ValueError(
            f"{op}: pad_type 'reflect' needs every spatial size > {after} for filter size {size}, got {sizes}; "
            f"use pad_type='replicate' or 'zeros' for tiny inputs"
        )
    if mode == "circular" and after > 0 and min(sizes) < after:
        raise ValueError(f"{op}: pad_type 'circular' needs every spatial size >= {after} for filter size {size}, "
                         f"got {sizes}")


def _blur_pool(x: Tensor, filt: Tensor, size: int, dims: int, stride: tuple[int, ...], mode: str,
               channels: int | Tensor) -> Tensor:
    """Pads ``x`` and runs the strided depthwise convolution with ``filt`` (shared by the function and Modules).

    Free of control flow on the input, so that ``torch.fx`` traces it and site discovery sees the strided conv.
    """
    before, after = (size - 1) // 2, size // 2
    if after > 0:
        x = F.pad(x, (before, after) * dims, mode=mode)
    weight = filt.to(dtype=x.dtype, device=x.device).expand((channels, 1) + (size,) * dims)
    return _CONV[dims](x, weight, stride=stride, groups=channels)


def blur_pool_nd(
    x: Tensor, filter_size: int = 3, stride: int | Sequence[int] = 2, pad_type: str = "reflect", *, dims: int
) -> Tensor:
    """BlurPool over the last ``dims`` dimensions of ``x``; see :func:`blur_pool2d` for the arguments."""
    _check_filter_size(filter_size)
    strides = ntuple(stride, dims, "stride")
    mode = _check_pad_type(pad_type)
    _check_blur_input(x, dims, filter_size, mode, f"blur_pool{dims}d")
    filt = binomial_filter(filter_size, dims, dtype=x.dtype, device=x.device)
    return _blur_pool(x, filt, filter_size, dims, strides, mode, x.shape[1])


def blur_pool1d(x: Tensor, filter_size: int = 3, stride: int | Sequence[int] = 2, pad_type: str = "reflect") -> Tensor:
    """1-D BlurPool; arguments as :func:`blur_pool2d`.

    Shape:
        - x: ``(N, C, L)``
        - output: ``(N, C, ceil(L / stride))``
    """
    return blur_pool_nd(x, filter_size, stride, pad_type, dims=1)


def blur_pool2d(x: Tensor, filter_size: int = 3, stride: int | Sequence[int] = 2, pad_type: str = "reflect") -> Tensor:
    """2-D BlurPool: depthwise binomial low-pass filtering, then subsampling by ``stride``.

    Args:
        x: Input.
        filter_size: Taps of the binomial filter per dimension, 1..7 (1 = plain subsampling).
        stride: Subsampling factor, an int or ``(s_h, s_w)``.
        pad_type: ``"reflect"``, ``"replicate"``, ``"zeros"``/``"constant"`` or ``"circular"``
            (``(k - 1) // 2`` before, ``k // 2`` after).

    Returns:
        ``conv2d(pad(x), binomial_filter, stride=stride, groups=C)``.

    Raises:
        TypeError: If ``x`` is not a floating-point tensor.
        ValueError: If ``x`` is not 4-D, ``filter_size`` is outside 1..7, ``stride < 1``, ``pad_type`` is unknown,
            or the input is too small for reflect padding.

    Shape:
        - x: ``(N, C, H, W)``
        - output: ``(N, C, ceil(H / s_h), ceil(W / s_w))``

    Example:
        >>> blur_pool2d(torch.ones(1, 2, 5, 5), filter_size=3)
        tensor([[[[1., 1., 1.],
                  [1., 1., 1.],
                  [1., 1., 1.]],
        <BLANKLINE>
                 [[1., 1., 1.],
                  [1., 1., 1.],
                  [1., 1., 1.]]]])
    """
    return blur_pool_nd(x, filter_size, stride, pad_type, dims=2)


def blur_pool3d(x: Tensor, filter_size: int = 3, stride: int | Sequence[int] = 2, pad_type: str = "reflect") -> Tensor:
    """3-D BlurPool; arguments as :func:`blur_pool2d`.

    Shape:
        - x: ``(N, C, D, H, W)``
        - output: ``(N, C, ceil(D / s_d), ceil(H / s_h), ceil(W / s_w))``
    """
    return blur_pool_nd(x, filter_size, stride, pad_type, dims=3)


class _BlurPoolNd(nn.Module):
    dims: int = 0
    filt: Tensor

    def __init__(
        self,
        channels: int | None = None,
        filter_size: int = 3,
        stride: int | Sequence[int] = 2,
        pad_type: str = "reflect",
    ) -> None:
        super().__init__()
        if channels is not None and (isinstance(channels, bool) or not isinstance(channels, int) or channels < 1):
            raise ValueError(f"channels must be a positive int or None, got {channels!r}")
        self.channels = channels
        self.filter_size = _check_filter_size(filter_size)
        self.stride = ntuple(stride, self.dims, "stride")
        self.pad_type = pad_type
        self._mode = _check_pad_type(pad_type)
        self.register_buffer("filt", binomial_filter(filter_size, self.dims), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, torch.fx.Proxy):  # checks need concrete shapes; tracing records only the ops
            _check_blur_input(x, self.dims, self.filter_size, self._mode, type(self).__name__)
            if self.channels is not None and x.shape[1] != self.channels:
                raise ValueError(
                    f"{type(self).__name__} was built for {self.channels} channels, got input {tuple(x.shape)}; "
                    f"build it with channels={x.shape[1]} or channels=None"
                )
        channels = self.channels if self.channels is not None else x.shape[1]
        return _blur_pool(x, self.filt, self.filter_size, self.dims, self.stride, self._mode, channels)

    def extra_repr(self) -> str:
        ch = "" if self.channels is None else f"channels={self.channels}, "
        return f"{ch}filter_size={self.filter_size}, stride={self.stride}, pad_type={self.pad_type!r}"


class BlurPool1d(_BlurPoolNd):
    """1-D BlurPool, a Module over :func:`blur_pool1d`; the filter is a non-persistent buffer ``filt``.

    Args:
        channels: Optional number of channels, checked in ``forward`` (``None`` accepts any).
        filter_size: Taps of the binomial filter, 1..7.
        stride: Subsampling factor.
        pad_type: ``"reflect"``, ``"replicate"``, ``"zeros"``/``"constant"`` or ``"circular"``.

    Shape:
        - input: ``(N, C, L)``
        - output: ``(N, C, ceil(L / stride))``
    """

    dims = 1


@register_layer("blurpool")
class BlurPool2d(_BlurPoolNd):
    """2-D BlurPool, a Module over :func:`blur_pool2d`; the filter is a non-persistent buffer ``filt``.

    The buffer is left out of ``state_dict()``, so a model whose layers were swapped for BlurPool still loads the
    original checkpoint with ``strict=True``.

    Args:
        channels: Optional number of channels, checked in ``forward`` (``None`` accepts any).
        filter_size: Taps of the binomial filter per dimension, 1..7.
        stride: Subsampling factor.
        pad_type: ``"reflect"``, ``"replicate"``, ``"zeros"``/``"constant"`` or ``"circular"``.

    Shape:
        - input: ``(N, C, H, W)``
        - output: ``(N, C, ceil(H / s_h), ceil(W / s_w))``

    Example:
        >>> BlurPool2d(filter_size=4)(torch.randn(1, 8, 15, 16)).shape
        torch.Size([1, 8, 8, 8])
    """

    dims = 2


class BlurPool3d(_BlurPoolNd):
    """3-D BlurPool, a Module over :func:`blur_pool3d`; the filter is a non-persistent buffer ``filt``.

    Args:
        channels: Optional number of channels, checked in ``forward`` (``None`` accepts any).
        filter_size: Taps of the binomial filter per dimension, 1..7.
        stride: Subsampling factor.
        pad_type: ``"reflect"``, ``"replicate"``, ``"zeros"``/``"constant"`` or ``"circular"``.

    Shape:
        - input: ``(N, C, D, H, W)``
        - output: ``(N, C, ceil(D / s_d), ceil(H / s_h), ceil(W / s_w))``
    """

    dims = 3
