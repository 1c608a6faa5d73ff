"""Adaptive polyphase sampling, APS (Chaman & Dokmanic, CVPR 2021), 2-D.

Subsampling by ``s`` keeps one of the ``s_h * s_w`` polyphase components ``x[..., i::s_h, j::s_w]``; the default
keeps ``(0, 0)``. APS keeps, per sample, the component with the largest l_p norm (over channels and positions),
which makes the result invariant (up to the shift itself) to integer shifts of the input. Ties go to the lowest
flattened index ``p = i * s_w + j`` (``torch.argmax`` returns the first maximum).

Odd sizes: the input is extended at the bottom/right so that every component has the same shape
``(ceil(H / s_h), ceil(W / s_w))``: with ``pad_mode="circular"`` (default, as in the paper, whose shifts are
circular) the extension wraps around (rows ``H, H+1, ...`` repeat rows ``0, 1, ...``); with ``"zeros"`` it is zero.

Residual blocks: the shortcut branch must keep the same phase as the main branch, or the two disagree spatially.
Select on one branch and reuse the index on the other, without storing anything on the module::

    y, index = aps(x, return_index=True)       # or aps_select2d(x, stride)
    shortcut = aps(identity, index=index)      # or aps_gather2d(identity, index, stride)

:class:`APSIndex2d` computes the index alone (no subsampling), so that a rewritten graph can pass it as an explicit
data edge to every branch of a block (what :func:`polyglean.swap` does for multi-op sites).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polyglean.layers._registry import register_layer
from polyglean.layers._utils import check_input, ntuple

__all__ = ["APS2d", "APSIndex2d", "NORMS", "PAD_MODES", "aps_gather2d", "aps_index2d", "aps_select2d",
           "polyphase_components2d"]

#: Accepted norm orders ``p`` (``"inf"`` is an alias of ``math.inf``).
NORMS: tuple[float, ...] = (1.0, 2.0, math.inf)
#: Accepted ways to extend odd-sized inputs at the bottom/right.
PAD_MODES: tuple[str, ...] = ("circular", "zeros")


def _check_norm(p: float | str) -> float:
    value: float | None
    if isinstance(p, str):
        value = math.inf if p.lower() == "inf" else None
    elif isinstance(p, (int, float)) and not isinstance(p, bool):
        value = float(p)
    else:
        value = None
    if value not in NORMS:
        raise ValueError(f"unknown norm p={p!r}; expected one of 1, 2, 'inf'")
    return value


def _check_pad_mode(pad_mode: str) -> str:
    if pad_mode not in PAD_MODES:
        raise ValueError(f"unknown pad_mode {pad_mode!r}; expected one of {', '.join(map(repr, PAD_MODES))}")
    return pad_mode


def polyphase_components2d(x: Tensor, stride: int | Sequence[int] = 2, pad_mode: str = "circular") -> Tensor:
    """All ``s_h * s_w`` polyphase components of ``x``, stacked in flattened-index order ``p = i * s_w + j``.

    Args:
        x: Input.
        stride: Subsampling factor ``s`` or ``(s_h, s_w)``.
        pad_mode: ``"circular"`` or ``"zeros"``: how odd sizes are extended at the bottom/right.

    Returns:
        ``out[:, i * s_w + j] == pad(x)[..., i::s_h, j::s_w]``.

    Shape:
        - x: ``(N, C, H, W)``
        - output: ``(N, s_h * s_w, C, ceil(H / s_h), ceil(W / s_w))``
    """
    check_input(x, 2, "polyphase_components2d")
    sh, sw = ntuple(stride, 2, "stride")
    _check_pad_mode(pad_mode)
    n, c, h, w = x.shape
    ph, pw = (-h) % sh, (-w) % sw
    if ph or pw:
        if pad_mode == "circular":
            rows = torch.arange(h + ph, device=x.device) % h
            cols = torch.arange(w + pw, device=x.device) % w
            x = x.index_select(2, rows).index_select(3, cols)
        else:
            x = F.pad(x, (0, pw, 0, ph))
    oh, ow = (h + ph) // sh, (w + pw) // sw
    return x.reshape(n, c, oh, sh, ow, sw).permute(0, 3, 5, 1, 2, 4).reshape(n, sh * sw, c, oh, ow)


def aps_select2d(
    x: Tensor, stride: int | Sequence[int] = 2, p: float | str = 2, pad_mode: str = "circular"
) -> tuple[Tensor, Tensor]:
    """Keeps, per sample, the polyphase component with the largest l_p norm.

    Args:
        x: Input.
        stride: Subsampling factor ``s`` or ``(s_h, s_w)``.
        p: Norm order: 1, 2 or ``"inf"`` (``math.inf``).
        pad_mode: ``"circular"`` or ``"zeros"``: how odd sizes are extended at the bottom/right.

    Returns:
        ``(y, index)``: the chosen components and their flattened indices ``i * s_w + j`` (ties: lowest index).

    Raises:
        ValueError: If ``x`` is not 4-D or an argument is unknown or out of range.

    Shape:
        - x: ``(N, C, H, W)``
        - y: ``(N, C, ceil(H / s_h), ceil(W / s_w))``
        - index: ``(N,)``, ``torch.long``

    Example:
        >>> x = torch.zeros(1, 1, 4, 4)
        >>> x[0, 0, 1, 3] = 5.0
        >>> y, index = aps_select2d(x, 2)
        >>> index
        tensor([3])
    """
    order = _check_norm(p)
    comps = polyphase_components2d(x, stride, pad_mode)
    index = _max_norm_index(comps, order)
    return comps[torch.arange(comps.shape[0], device=x.device), index], index


def _max_norm_index(comps: Tensor, order: float) -> Tensor:
    """Per sample, the flattened index of the component with the largest l_p norm (ties: the lowest)."""
    norms = torch.linalg.vector_norm(comps.detach().flatten(2), ord=order, dim=2)
    return norms.argmax(dim=1)


def aps_index2d(x: Tensor, stride: int | Sequence[int] = 2, p: float | str = 2, pad_mode: str = "circular"
                ) -> Tensor:
    """The component :func:`aps_select2d` would keep, per sample, without subsampling.

    Args:
        x: Input.
        stride: Subsampling factor ``s`` or ``(s_h, s_w)``.
        p: Norm order: 1, 2 or ``"inf"`` (``math.inf``).
        pad_mode: ``"circular"`` or ``"zeros"``: how odd sizes are extended at the bottom/right.

    Returns:
        Flattened component indices ``i * s_w + j`` (ties: lowest index); no gradient flows through them.

    Raises:
        ValueError: If ``x`` is not 4-D or an argument is unknown or out of range.

    Shape:
        - x: ``(N, C, H, W)``
        - output: ``(N,)``, ``torch.long``

    Example:
        >>> x = torch.zeros(1, 1, 4, 4)
        >>> x[0, 0, 1, 0] = 1.0
        >>> aps_index2d(x, 2)
        tensor([2])
    """
    return _max_norm_index(polyphase_components2d(x, stride, pad_mode), _check_norm(p))


def aps_gather2d(x: Tensor, index: Tensor, stride: int | Sequence[int] = 2, pad_mode: str = "circular") -> Tensor:
    """Keeps, per sample, the polyphase component ``index[n]`` (e.g. the one :func:`aps_select2d` chose).

    Args:
        x: Input.
        index: Flattened component index ``i * s_w + j`` per sample.
        stride: Subsampling factor ``s`` or ``(s_h, s_w)``.
        pad_mode: ``"circular"`` or ``"zeros"``: how odd sizes are extended at the bottom/right.

    Returns:
        ``y[n] == pad(x)[n, :, i_n::s_h, j_n::s_w]`` with ``index[n] = i_n * s_w + j_n``.

    Raises:
        ValueError: If ``index`` is not a 1-D integer tensor of length ``N`` with entries in ``[0, s_h * s_w)``.

    Shape:
        - x: ``(N, C, H, W)``
        - index: ``(N,)``
        - output: ``(N, C, ceil(H / s_h), ceil(W / s_w))``
    """
    check_input(x, 2, "aps_gather2d")
    sh, sw = ntuple(stride, 2, "stride")
    if not isinstance(index, Tensor) or index.dtype not in (torch.long, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"index must be an integer tensor of shape (N,), got {index!r}")
    if index.shape != (x.shape[0],):
        raise ValueError(
            f"index of shape {tuple(index.shape)} does not match the batch of input {tuple(x.shape)}; "
            f"expected ({x.shape[0]},), one phase per sample"
        )
    if bool(((index < 0) | (index >= sh * sw)).any()):
        raise ValueError(
            f"index values must lie in [0, {sh * sw}) for stride {(sh, sw)}, got {index.tolist()}"
        )
    comps = polyphase_components2d(x, (sh, sw), pad_mode)
    return comps[torch.arange(comps.shape[0], device=x.device), index.to(device=x.device, dtype=torch.long)]


@register_layer("aps")
class APS2d(nn.Module):
    """Adaptive polyphase sampling, a Module over :func:`aps_select2d` / :func:`aps_gather2d`.

    ``forward(x)`` selects the max-norm component per sample; ``forward(x, index=index)`` applies a given index
    (the shortcut branch of a residual block); ``return_index=True`` also returns the index used. Nothing is
    stored on the module, so one instance can serve several branches and threads.

    Args:
        stride: Subsampling factor ``s`` or ``(s_h, s_w)``.
        p: Norm order: 1, 2 or ``"inf"``.
        pad_mode: ``"circular"`` or ``"zeros"``: how odd sizes are extended at the bottom/right.

    Shape:
        - input: ``(N, C, H, W)``
        - index: ``(N,)`` (optional)
        - output: ``(N, C, ceil(H / s_h), ceil(W / s_w))``

    Example:
        >>> aps = APS2d(2)
        >>> x, identity = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
        >>> y, index = aps(x, return_index=True)
        >>> shortcut = aps(identity, index=index)
        >>> y.shape == shortcut.shape
        True
    """

    def __init__(self, stride: int | Sequence[int] = 2, p: float | str = 2, pad_mode: str = "circular") -> None:
        super().__init__()
        self.stride = ntuple(stride, 2, "stride")
        self.p = _check_norm(p)
        self.pad_mode = _check_pad_mode(pad_mode)

    def forward(
        self, x: Tensor, index: Tensor | None = None, return_index: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        if index is None:
            y, index = aps_select2d(x, self.stride, self.p, self.pad_mode)
        else:
            y = aps_gather2d(x, index, self.stride, self.pad_mode)
        return (y, index) if return_index else y

    def extra_repr(self) -> str:
        p = "inf" if math.isinf(self.p) else int(self.p)
        return f"stride={self.stride}, p={p}, pad_mode={self.pad_mode!r}"


class APSIndex2d(nn.Module):
    """The polyphase component APS chooses, per sample: a Module over :func:`aps_index2d`.

    It does not subsample; its output is the index that :class:`APS2d` (``forward(x, index=index)``) applies to
    every branch of a block, e.g. the main conv and the shortcut of a residual block rewritten by
    :func:`polyglean.swap`.

    Args:
        stride: Subsampling factor ``s`` or ``(s_h, s_w)``.
        p: Norm order: 1, 2 or ``"inf"``.
        pad_mode: ``"circular"`` or ``"zeros"``: how odd sizes are extended at the bottom/right.

    Shape:
        - input: ``(N, C, H, W)``
        - output: ``(N,)``, ``torch.long``

    Example:
        >>> x, identity = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
        >>> index = APSIndex2d(2)(x)
        >>> torch.equal(APS2d(2)(x, index=index), APS2d(2)(x))
        True
    """

    def __init__(self, stride: int | Sequence[int] = 2, p: float | str = 2, pad_mode: str = "circular") -> None:
        super().__init__()
        self.stride = ntuple(stride, 2, "stride")
        self.p = _check_norm(p)
        self.pad_mode = _check_pad_mode(pad_mode)

    def forward(self, x: Tensor) -> Tensor:
        return aps_index2d(x, self.stride, self.p, self.pad_mode)

    def extra_repr(self) -> str:
        p = "inf" if math.isinf(self.p) else int(self.p)
        return f"stride={self.stride}, p={p}, pad_mode={self.pad_mode!r}"
