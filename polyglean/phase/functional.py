"""Subsampling ops evaluated at a chosen phase: the pure tensor functions, gathered in one import.

Each function lives beside its op kind in :mod:`polyglean.sites` (the function and the
:class:`~polyglean.sites.ops.PhaseOp` that runs it in a model share one file; the geometry they share is in
:mod:`polyglean.sites.geometry`, which states the exactness contract). The dependency is one-way: ``phase``
imports ``sites``, never the reverse. This module re-exports them for code that only wants the functions.

Example:
    >>> import torch, torch.nn.functional as F
    >>> x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
    >>> ref = F.conv2d(x, w, padding=1)[..., 1::2, 0::2]
    >>> torch.allclose(conv2d_phase(x, w, stride=2, padding=1, phase=(1, 0)), ref, atol=1e-5)
    True
"""

from __future__ import annotations

from polyglean.sites.conv import conv2d_phase
from polyglean.sites.geometry import (
    Phase,
    as_pair,
    check_phase,
    conv_padding,
    output_size,
    same_padding,
    shift2d,
)
from polyglean.sites.pool import avg_pool2d_phase, max_pool2d_phase
from polyglean.sites.slicing import slice_phase, sliced_dims

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
