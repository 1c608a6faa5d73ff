"""Subsampling ops evaluated at a chosen phase: pure tensor functions.

A subsampling op with factor ``(R_h, R_w)`` computes its stride-1 result and keeps rows ``i * R_h`` and columns
``j * R_w``. Phase ``(dy, dx)`` keeps rows ``i * R_h + dy`` and columns ``j * R_w + dx`` instead. Every function here
meets the exactness contract of REFERENCE.md §1::

    op_phase(x, (dy, dx))[..., i, j] == op_stride1(x)[..., i * R_h + dy, j * R_w + dx]

with the output shape of the default op. Where ``i * R + d`` falls past the stride-1 map, the input is extended at the
bottom/right with the op's own pad value (zeros for convolutions and slicing, ``-inf`` for max pooling); average
pooling follows PyTorch's ``ceil_mode`` rule there, so positions beyond the padded input are not counted in the
divisor. The cheap implementation: apply the op's padding, extend, take the window starting ``(dy, dx)`` further
down/right, and run the op at its stride with no padding.

Phase ``(0, 0)`` computed by these functions equals the default op to float tolerance; callers that need bit-exact
defaults call the original op for phase ``(0, 0)`` (as :mod:`polyglean.phase.ops` does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Phase",
    "as_pair",
    "avg_pool2d_phase",
    "check_phase",
    "conv2d_phase",
    "conv_padding",
    "max_pool2d_phase",
    "output_size",
    "same_padding",
    "shift2d",
    "slice_phase",
    "sliced_dims",
]

Phase = tuple[int, int]


def as_pair(value: int | Sequence[int], name: str = "value") -> tuple[int, int]:
    """Returns ``(v, v)`` for an int, or the two entries of a length-2 sequence."""
    if isinstance(value, int):
        return (value, value)
    items = tuple(int(v) for v in value)
    if len(items) == 1:
        return (items[0], items[0])
    if len(items) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {value!r}")
    return (items[0], items[1])


def check_phase(phase: Phase, factor: tuple[int, int], where: str = "") -> None:
    """Raises ``ValueError`` unless ``0 <= dy < R_h`` and ``0 <= dx < R_w``."""
    dy, dx = phase
    if not (0 <= dy < factor[0] and 0 <= dx < factor[1]):
        at = f" at {where}" if where else ""
        raise ValueError(
            f"phase {tuple(phase)} out of range for factor {tuple(factor)}{at}; "
            f"valid phases are (dy, dx) with 0 <= dy < {factor[0]} and 0 <= dx < {factor[1]}"
        )


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF "SAME" padding ``(before, after)`` of one spatial dimension (as timm's ``pad_same``)."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return (total // 2, total - total // 2)


def conv_padding(padding: int | Sequence[int] | str, kernel: tuple[int, int], dilation: tuple[int, int]
                 ) -> tuple[int, int, int, int]:
    """Explicit ``(left, right, top, bottom)`` padding of a convolution's ``padding`` argument."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":  # stride 1 only in PyTorch; kept for completeness
            pads = []
            for k, d in ((kernel[1], dilation[1]), (kernel[0], dilation[0])):
                total = d * (k - 1)
                pads.extend((total // 2, total - total // 2))
            return (pads[0], pads[1], pads[2], pads[3])
        raise ValueError(f"unknown padding {padding!r}; expected an int, a pair, 'same' or 'valid'")
    ph, pw = as_pair(padding, "padding")
    return (pw, pw, ph, ph)


def _window(
    x: Tensor,
    pads: tuple[int, int, int, int],
    value: float,
    phase: Phase,
    needed: tuple[int, int],
    mode: str = "constant",
) -> Tensor:
    """Pads ``x`` (NC..HW), extends bottom/right with ``value`` and takes ``needed`` rows/cols from ``phase``.

    ``pads`` is ``(left, right, top, bottom)``, applied with ``mode``; the extension past them is always ``value``.
    """
    dy, dx = phase
    pl, pr, pt, pb = pads
    height, width = x.shape[-2] + pt + pb, x.shape[-1] + pl + pr
    ext_h = max(0, dy + needed[0] - height)
    ext_w = max(0, dx + needed[1] - width)
    if mode == "constant":
        padded = F.pad(x, (pl, pr + ext_w, pt, pb + ext_h), value=value) if any((pl, pr + ext_w, pt, pb + ext_h)) else x
    else:
        padded = F.pad(x, (pl, pr, pt, pb), mode=mode) if any(pads) else x
        if ext_h or ext_w:
            padded = F.pad(padded, (0, ext_w, 0, ext_h), value=value)
    return padded[..., dy:dy + needed[0], dx:dx + needed[1]]


def output_size(size: int, pad_total: int, kernel: int, stride: int, dilation: int, ceil_mode: bool,
                pad_before: int) -> int:
    """Output length of a PyTorch conv/pool along one dimension (with the ``ceil_mode`` correction)."""
    span = size + pad_total - dilation * (kernel - 1) - 1
    if ceil_mode:
        out = -(-span // stride) + 1
        if (out - 1) * stride >= size + pad_before:
            out -= 1
    else:
        out = span // stride + 1
    return out


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
    window = _window(x, pads, 0.0, phase, needed, mode)
    return F.conv2d(window, weight, bias, s, 0, d, groups)


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
    window = _window(x, pads, float("-inf"), phase, needed)
    return F.max_pool2d(window, k, s, 0, d, False)


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
    sums = F.avg_pool2d(_window(x, pads, 0.0, phase, needed), k, s, 0, False, True, 1)
    if divisor_override:
        return sums / divisor_override
    ones = x.new_ones((1, 1, x.shape[-2], x.shape[-1]))
    if count_include_pad:
        mask = _window(F.pad(ones, pads, value=1.0), (0, 0, 0, 0), 0.0, phase, needed)
    else:
        mask = _window(ones, pads, 0.0, phase, needed)
    counts = F.avg_pool2d(mask, k, s, 0, False, True, 1).clamp_min(1.0)  # windows wholly past the input read 0
    if x.dim() == 3:
        counts = counts[0]
    return sums / counts


def shift2d(x: Tensor, phase: Phase, dims: tuple[int, int] = (-2, -1), value: float = 0.0) -> Tensor:
    """Shifts ``x`` up/left by ``phase`` along ``dims``, filling the bottom/right with ``value``.

    Shape:
        - x: any, with spatial dimensions at ``dims``
        - output: same as ``x``
    """
    out = x
    for dim, shift in zip(dims, phase):
        if shift == 0:
            continue
        size = out.shape[dim]
        kept = out.narrow(dim, min(shift, size), size - min(shift, size))
        fill_shape = list(out.shape)
        fill_shape[dim] = min(shift, size)
        out = torch.cat([kept, out.new_full(fill_shape, value)], dim=dim)
    return out


def _expand_index(index: Any, ndim: int) -> list[Any]:
    """Expands ``Ellipsis`` in a getitem index to full slices; wraps a single entry in a list."""
    items = list(index) if isinstance(index, tuple) else [index]
    consumed = sum(1 for it in items if it is not None and it is not Ellipsis)
    if any(it is Ellipsis for it in items):
        at = next(i for i, it in enumerate(items) if it is Ellipsis)
        items[at:at + 1] = [slice(None)] * (ndim - consumed)
    else:
        items += [slice(None)] * (ndim - consumed)
    return items


def sliced_dims(index: Any, ndim: int) -> list[tuple[int, int, slice]]:
    """The ``(input_dim, output_dim, slice)`` entries of a getitem index whose step is greater than 1.

    Raises:
        ValueError: if the index mixes strided slices with tensor (advanced) indices, or has a negative step.
    """
    out: list[tuple[int, int, slice]] = []
    in_dim = out_dim = 0
    items = _expand_index(index, ndim)
    advanced = any(isinstance(it, (Tensor, list)) for it in items)
    for it in items:
        if it is None:
            out_dim += 1
            continue
        if isinstance(it, slice):
            step = 1 if it.step is None else it.step
            if isinstance(step, int) and step < 0:
                raise ValueError(f"negative slice step {step} is not a subsampling op")
            if isinstance(step, int) and step > 1:
                if advanced:
                    raise ValueError("a strided slice combined with tensor indices is not supported")
                out.append((in_dim, out_dim, it))
            in_dim += 1
            out_dim += 1
        elif isinstance(it, int):
            in_dim += 1
        else:  # tensor / list index
            in_dim += 1
            out_dim += 1
    return out


def slice_phase(x: Tensor, index: Any, *, phase: Phase = (0, 0)) -> Tensor:
    """``x[index]`` with the strided slices moved by ``phase``; positions past the slice's range are zero.

    The one or two slices of ``index`` whose step exceeds 1 are the subsampled dimensions, in order (``(dy, dx)``
    for ``x[..., ::2, ::2]``; ``x[..., ::2, :]`` has factor ``(2, 1)``). Their starts move by the phase; the stride-1
    op of a slice is the identity on ``[start, stop)``, so entries past ``stop`` (or the tensor) read as zero.

    Shape:
        - x: any
        - output: the shape of ``x[index]``
    """
    strided = sliced_dims(index, x.dim())
    if not strided or len(strided) > 2:
        raise ValueError(f"index {index!r} has {len(strided)} strided slices; expected 1 or 2")
    items = _expand_index(index, x.dim())
    shifts = phase if len(strided) == 2 else (phase[0],)
    if len(strided) == 1 and phase[1] != 0:
        raise ValueError(f"phase {tuple(phase)} out of range for factor ({strided[0][2].step}, 1)")
    pads: list[tuple[int, int]] = []  # (output dim, wanted length)
    new_items = list(items)
    consumed = 0
    for pos, it in enumerate(items):
        if it is None:
            continue
        for (in_dim, out_dim, sl), shift in zip(strided, shifts):
            if in_dim == consumed:
                size = x.shape[in_dim]
                start, stop, step = sl.indices(size)
                if not 0 <= shift < step:
                    raise ValueError(f"phase {tuple(phase)} out of range for slice step {step}")
                wanted = len(range(start, stop, step))
                new_items[pos] = slice(start + shift, stop, step)
                pads.append((out_dim, wanted))
        consumed += 1
    out = x[tuple(new_items)]
    for out_dim, wanted in pads:
        missing = wanted - out.shape[out_dim]
        if missing > 0:
            fill_shape = list(out.shape)
            fill_shape[out_dim] = missing
            out = torch.cat([out, out.new_zeros(fill_shape)], dim=out_dim)
    return out
