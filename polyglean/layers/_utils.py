"""Argument checks and window helpers shared by the downsampling layers (private)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from polyglean.phase.functional import output_size

__all__ = [
    "check_input",
    "check_pool_args",
    "ntuple",
    "pool_out_size",
    "pool_windows",
]


def ntuple(value: int | Sequence[int], n: int, name: str, *, minimum: int = 1) -> tuple[int, ...]:
    """Returns ``value`` as an ``n``-tuple of ints, each at least ``minimum``.

    Args:
        value: An int (repeated ``n`` times) or a sequence of ``n`` ints (a length-1 sequence is repeated too).
        n: Number of spatial dimensions.
        name: Argument name, used in error messages.
        minimum: Smallest accepted entry.

    Raises:
        TypeError: If an entry is not an int (bools are rejected too).
        ValueError: If the length is wrong or an entry is below ``minimum``.
    """
    items: tuple[object, ...]
    if isinstance(value, Sequence) and not isinstance(value, str):
        items = tuple(value)
        if len(items) == 1:
            items = items * n
    else:
        items = (value,) * n
    if len(items) != n:
        raise ValueError(f"{name} must be an int or a sequence of {n} ints, got {value!r} ({len(items)} entries)")
    out: list[int] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int):
            raise TypeError(f"{name} must contain ints, got {value!r} (entry {item!r} of type {type(item).__name__})")
        if item < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
        out.append(item)
    return tuple(out)


def check_input(x: object, spatial_dims: int, op: str) -> None:
    """Raises unless ``x`` is a floating-point tensor of shape ``(N, C, *spatial)`` with ``spatial_dims`` dims.

    Raises:
        TypeError: If ``x`` is not a tensor, or not floating point.
        ValueError: If ``x`` has the wrong number of dimensions or an empty spatial/channel dimension.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{op} expects a torch.Tensor, got {type(x).__name__}")
    want = spatial_dims + 2
    if x.dim() != want:
        layout = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}.get(spatial_dims, "")
        raise ValueError(
            f"{op} expects a {want}-D input {layout}, got shape {tuple(x.shape)} ({x.dim()}-D); "
            f"add a batch dimension with x.unsqueeze(0) if the input is unbatched"
        )
    if not x.is_floating_point():
        raise TypeError(f"{op} expects a floating-point tensor, got dtype {x.dtype}; convert with x.float()")
    if any(s == 0 for s in x.shape[1:]):
        raise ValueError(f"{op} got an empty input of shape {tuple(x.shape)}")


def pool_out_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """Output length of a PyTorch pooling layer along one dimension (with its ``ceil_mode`` correction).

    In ``ceil_mode`` the last window must start inside the input or the left padding, as in ``F.avg_pool2d``.
    """
    return output_size(size, 2 * padding, kernel, stride, 1, ceil_mode, padding)


def check_pool_args(
    x: Tensor,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    ceil_mode: bool,
    op: str,
) -> tuple[int, ...]:
    """Validates pooling arguments against the input and returns the output spatial size."""
    for k, p in zip(kernel, padding):
        if p > k // 2:
            raise ValueError(
                f"{op}: padding {padding} must be at most half of kernel_size {kernel}; "
                f"larger padding would create windows made only of padding"
            )
    sizes = tuple(x.shape[2:])
    out = tuple(pool_out_size(s, k, st, p, ceil_mode) for s, k, st, p in zip(sizes, kernel, stride, padding))
    if any(o < 1 for o in out):
        raise ValueError(
            f"{op}: input spatial size {sizes} is too small for kernel_size {kernel} with padding {padding} "
            f"(output size would be {out}); use a smaller kernel or more padding"
        )
    return out


def pool_windows(
    x: Tensor,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    ceil_mode: bool,
    op: str,
) -> tuple[Tensor, Tensor | None]:
    """All pooling windows of ``x``, flattened, and a mask of the positions that lie inside the input.

    The input is zero-padded (``padding`` on both sides, plus whatever ``ceil_mode`` needs on the far side) and
    unfolded along every spatial dimension. Positions that are padding are marked ``False`` in the mask so that
    callers can treat them as absent.

    Returns:
        ``(windows, mask)``: ``windows`` has shape ``(N, C, *out, K)`` with ``K = prod(kernel)``; ``mask`` is
        ``None`` when no window touches padding, else a bool tensor of shape ``(1, 1, *out, K)``.
    """
    dims = len(kernel)
    out = check_pool_args(x, kernel, stride, padding, ceil_mode, op)
    sizes = tuple(x.shape[2:])
    extra = tuple(max(0, (o - 1) * s + k - (n + 2 * p)) for o, s, k, n, p in zip(out, stride, kernel, sizes, padding))
    pads: list[int] = []
    for p, e in zip(reversed(padding), reversed(extra)):  # F.pad wants the last dimension first
        pads.extend((p, p + e))
    needs_mask = any(pads)
    windows = F.pad(x, pads) if needs_mask else x
    mask = None
    if needs_mask:
        ones = torch.ones((1, 1) + sizes, dtype=torch.bool, device=x.device)
        mask = F.pad(ones, pads, value=False)
    for d in range(dims):
        windows = windows.unfold(2 + d, kernel[d], stride[d]).narrow(2 + d, 0, out[d])
        if mask is not None:
            mask = mask.unfold(2 + d, kernel[d], stride[d]).narrow(2 + d, 0, out[d])
    windows = windows.flatten(-dims)
    if mask is not None:
        mask = mask.flatten(-dims)
    return windows, mask
