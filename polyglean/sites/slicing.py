"""Op kind: strided slicing in ``forward`` (``x[..., ::2, ::2]``, e.g. CIFAR ResNet "option A" shortcuts)."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from polyglean.sites.geometry import Phase
from polyglean.sites.ops import FunctionPhaseOp, register_function_op

__all__ = ["SlicePhase", "slice_phase", "sliced_dims"]


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


class SlicePhase(FunctionPhaseOp):
    """``x[index]`` whose strided slices take phase ``(dy, dx)``; one strided slice has factor ``(R, 1)``.

    A single strided slice of the last dimension (``x[..., ::2]``, the channel pairs of rotary position embeddings)
    is not taken for subsampling: a map is sliced along rows and columns together, or along rows.
    """

    kind = "slice"

    def at_phase(self, phase: Phase, x: Tensor, index: Any) -> Tensor:
        return slice_phase(x, index, phase=phase)


@register_function_op(operator.getitem)
def _getitem(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], name: str
             ) -> SlicePhase | None:
    if len(args) != 2 or kwargs or not isinstance(args[0], Tensor):
        return None
    x, index = args
    try:
        strided = sliced_dims(index, x.dim())
    except ValueError:
        return None
    if not strided:
        return None
    if len(strided) > 2:
        raise ValueError(f"slicing at '{name}' subsamples {len(strided)} dimensions; at most 2 are supported")
    steps = [sl.step for _, _, sl in strided]
    dims = tuple(d - x.dim() for d, _, _ in strided)
    if len(strided) == 1 and dims[0] == -1:
        return None  # one strided slice of the last dimension: channel pairs (rotary embeddings), not a map
        return SlicePhase(fn, name, (steps[0], 1), (dims[0], dims[0]))
    return SlicePhase(fn, name, (steps[0], steps[1]), (dims[0], dims[1]))
