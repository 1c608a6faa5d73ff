"""Displacements of phase states and alignment of their final feature maps onto the default grid."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from polyglean.errors import ArgumentError

__all__ = ["align", "align_static", "alignment_factor", "displacement"]


def displacement(states: Tensor, factors: Sequence[tuple[int, int]], first: int) -> Tensor:
    """Displacement ``(Δy, Δx)`` of phase states, in pixels of the input grid of site ``first``.

    ``Δx = Σ_l dx_l · Π_{first <= l' < l} R_w,l'`` over sites ``l >= first`` (likewise ``Δy``); sites before
    ``first`` must be at phase 0.

    Args:
        states: Flat phase indices ``dy * R_w + dx``, one per site.
        factors: ``(R_h, R_w)`` of every site.
        first: Index of the first searched site.

    Shape:
        - states: ``(..., L)``
        - output: ``(..., 2)``
    """
    dy = torch.zeros(states.shape[:-1], dtype=torch.long, device=states.device)
    dx = torch.zeros_like(dy)
    scale_h = scale_w = 1
    for site in range(first, len(factors)):
        rh, rw = factors[site]
        dy = dy + (states[..., site] // rw) * scale_h
        dx = dx + (states[..., site] % rw) * scale_w
        scale_h, scale_w = scale_h * rh, scale_w * rw
    return torch.stack([dy, dx], -1)


def alignment_factor(factors: Sequence[tuple[int, int]], first: int) -> tuple[int, int]:
    """``T``: the total reduction from the input of site ``first`` to the final feature map (every later site)."""
    return (math.prod(f[0] for f in factors[first:]), math.prod(f[1] for f in factors[first:]))


def _shift_1d(x: Tensor, delta: int, period: int, dim: int) -> Tensor:
    """``x`` upsampled by ``period`` (nearest), shifted forward by ``delta`` (zero fill), average-pooled back."""
    if delta == 0:
        return x
    q, r = divmod(delta, period)

    def moved(k: int) -> Tensor:
        size = x.shape[dim]
        if k >= size:
            return torch.zeros_like(x)
        kept = x.narrow(dim, 0, size - k)
        pad_shape = list(x.shape)
        pad_shape[dim] = k
        return torch.cat([x.new_zeros(pad_shape), kept], dim)

    out = moved(q)
    if r:
        out = out * ((period - r) / period) + moved(q + 1) * (r / period)
    return out


def align(features: Tensor, shift: Tensor, factor: tuple[int, int], dims: tuple[int, int] = (-2, -1)) -> Tensor:
    """Brings each candidate's final feature map onto the default grid.

    Equivalent to: upsample by ``T`` (nearest), shift right/down by ``(Δx, Δy)`` with zero fill, average-pool
    ``T x T`` back (REFERENCE.md §1), computed as an exact two-tap blend per dimension.

    Args:
        features: One map per candidate.
        shift: ``(Δy, Δx)`` per candidate (:func:`displacement`).
        factor: ``T = (T_h, T_w)`` (:func:`alignment_factor`).
        dims: Spatial dimensions of ``features``.

    Shape:
        - features: ``(M, C, h, w)`` (or channels-last with ``dims=(1, 2)``)
        - shift: ``(M, 2)``
        - output: like ``features``
    """
    if features.shape[0] != shift.shape[0]:
        raise ArgumentError(f"got {features.shape[0]} feature maps but {shift.shape[0]} shifts")
    out = features.clone()
    keys = [tuple(v) for v in shift.tolist()]
    for key in set(keys):
        if key == (0, 0):
            continue
        idx = torch.tensor([i for i, k in enumerate(keys) if k == key], device=features.device)
        part = features.index_select(0, idx)
        part = _shift_1d(part, key[0], factor[0], dims[0])
        part = _shift_1d(part, key[1], factor[1], dims[1])
        out.index_copy_(0, idx, part)
    return out


def align_static(features: Tensor, shift: tuple[int, int], factor: tuple[int, int],
                 dims: tuple[int, int] = (-2, -1)) -> Tensor:
    """:func:`align` for one displacement given as Python ints: every candidate of ``features`` is moved by the
    same ``(Δy, Δx)``. Nothing depends on tensor values, so it traces and exports as a fixed graph.

    Shape:
        - features: ``(M, C, h, w)`` (or channels-last with ``dims=(1, 2)``)
        - output: like ``features``
    """
    out = _shift_1d(features, int(shift[0]), factor[0], dims[0])
    return _shift_1d(out, int(shift[1]), factor[1], dims[1])
