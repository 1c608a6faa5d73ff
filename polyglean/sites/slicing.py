"""Op kind: strided slicing in ``forward`` (``x[..., ::2, ::2]``, e.g. CIFAR ResNet "option A" shortcuts)."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

from torch import Tensor

from polyglean.phase.functional import Phase, slice_phase, sliced_dims
from polyglean.sites.ops import FunctionPhaseOp, register_function_op

__all__ = ["SlicePhase"]


class SlicePhase(FunctionPhaseOp):
    """``x[index]`` whose strided slices take phase ``(dy, dx)``; one strided slice has factor ``(R, 1)``."""

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
    if len(strided) == 1:
        return SlicePhase(fn, name, (steps[0], 1), (dims[0], dims[0]))
    return SlicePhase(fn, name, (steps[0], steps[1]), (dims[0], dims[1]))
