"""Running the downsampling layers at any phase: the shared helpers and the one call into site discovery.

Each layer module defines its op kind (a :class:`~polyglean.sites.ops.ModulePhaseOp` subclass, e.g.
:class:`~polyglean.layers.softpool.SoftPool2dPhase`) and passes it to
:func:`~polyglean.layers.register_layer`, which calls :func:`register_phase_op` here: the only place where the layers
register with :mod:`polyglean.sites`. A registered kind is a leaf of the fx trace (never traced into), so the
layers' Python input checks stay as they are. BlurPool needs none: its forward traces to a strided depthwise
``F.conv2d``, which the built-in ``conv`` kind already runs at any phase.

Every kind keeps the exactness contract of :mod:`polyglean.phase.functional`: phase ``(0, 0)`` calls the layer
itself (bit-exact), and phase ``(dy, dx)`` keeps entries ``(i * R_h + dy, j * R_w + dx)`` of the layer's stride-1
result (:func:`subsample_at`), with the default output shape; entries past the stride-1 map are zero.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from polyglean.layers._utils import pool_out_size
from polyglean.phase.functional import Phase
from polyglean.sites.ops import ModulePhaseOp, register_module_op

__all__ = ["pool_out", "register_phase_op", "subsample_at"]


def subsample_at(y1: Tensor, factor: tuple[int, int], phase: Phase, out_size: tuple[int, int]) -> Tensor:
    """Entries ``(i * R_h + dy, j * R_w + dx)`` of a stride-1 map, ``out_size`` of them, zero past its end.

    Shape:
        - y1: ``(N, C, H1, W1)``
        - output: ``(N, C, *out_size)``
    """
    (rh, rw), (dy, dx), (oh, ow) = factor, phase, out_size
    y = y1[..., dy::rh, dx::rw][..., :oh, :ow]
    missing_h, missing_w = oh - y.shape[-2], ow - y.shape[-1]
    if missing_h or missing_w:
        y = F.pad(y, (0, missing_w, 0, missing_h))
    return y


def pool_out(module: nn.Module, x: Tensor) -> tuple[int, int]:
    """Output size of a pooling layer with ``kernel_size``, ``stride``, ``padding`` and ``ceil_mode`` on ``x``."""
    k, s, p = module.kernel_size, module.stride, module.padding
    return (pool_out_size(x.shape[-2], k[0], s[0], p[0], module.ceil_mode),
            pool_out_size(x.shape[-1], k[1], s[1], p[1], module.ceil_mode))


_REGISTERED: dict[type[nn.Module], type[ModulePhaseOp] | None] = {}


def register_phase_op(cls: type[nn.Module], phase_cls: type[ModulePhaseOp] | None) -> None:
    """Registers ``phase_cls`` as the op kind of the layer class ``cls`` with site discovery.

    The kind applies where the layer's ``stride`` attribute (an int or a pair) is not 1; ``phase_cls=None`` makes the
    layer a leaf of the trace that never subsamples (as :class:`~polyglean.layers.APSIndex2d`). Registering the same
    pair again does nothing (a layer registered again after :func:`~polyglean.layers.unregister_layer`).

    Raises:
        ValueError: ``cls`` already has another op kind.
    """
    if cls in _REGISTERED:
        if _REGISTERED[cls] is not phase_cls:
            raise ValueError(f"an op kind for layer {cls.__qualname__} is already registered "
                             f"({getattr(_REGISTERED[cls], '__qualname__', None)})")
        return
    _REGISTERED[cls] = phase_cls
    if phase_cls is None:
        register_module_op(cls, lambda module, name: None)
        return

    def factory(module: nn.Module, name: str) -> ModulePhaseOp | None:
        stride = module.stride
        factor = (stride, stride) if isinstance(stride, int) else (int(stride[0]), int(stride[1]))
        return phase_cls(module, name, factor) if factor != (1, 1) else None

    register_module_op(cls, factory)
