"""Phase geometry shared by every op kind: phases, padding, output sizes, and the shifted window.

A subsampling op with factor ``(R_h, R_w)`` computes its stride-1 result and keeps rows ``i * R_h`` and columns
``j * R_w``. Phase ``(dy, dx)`` keeps rows ``i * R_h + dy`` and columns ``j * R_w + dx`` instead. Every op kind's
tensor function (``conv2d_phase`` in :mod:`polyglean.sites.conv`, ``max_pool2d_phase`` / ``avg_pool2d_phase`` in
:mod:`polyglean.sites.pool`, ``slice_phase`` in :mod:`polyglean.sites.slicing`) meets the exactness contract::

    op_phase(x, (dy, dx))[..., i, j] == op_stride1(x)[..., i * R_h + dy, j * R_w + dx]

with the output shape of the default op. Where ``i * R + d`` falls past the stride-1 map, the input is extended at the
bottom/right with the op's own pad value (zeros for convolutions and slicing, ``-inf`` for max pooling); average
pooling follows PyTorch's ``ceil_mode`` rule there, so positions beyond the padded input are not counted in the
divisor. The cheap implementation (:func:`window`): apply the op's padding, extend, take the window starting
``(dy, dx)`` further down/right, and run the op at its stride with no padding.

Phase ``(0, 0)`` computed by these functions equals the default op to float tolerance; a :class:`~polyglean.sites.ops.PhaseOp`
calls the original op for phase ``(0, 0)``, so its default is bit-exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Phase", "as_pair", "check_phase", "conv_padding", "output_size", "same_padding", "shift2d", "window"]

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

def window(
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
