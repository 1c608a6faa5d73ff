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
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from polyglean.layers._registry import register_layer
from polyglean.layers._utils import check_input, ntuple
from polyglean.layers.phase_ops import register_phase_op
from polyglean.layers.rules import (
    Rewrite,
    SiteSwapContext,
    SwapContext,
    SwapSequential,
    conv_stride1,
    free_path,
    is_conv,
    is_pool,
    pool_stride1,
    set_submodule,
)
from polyglean.phase.functional import Phase, sliced_dims
from polyglean.sites.conv import Conv2dPhase
from polyglean.sites.ops import ModulePhaseOp, PhaseOp, PhaseValue
from polyglean.sites.pool import AvgPool2dPhase, MaxPool2dPhase
from polyglean.sites.slicing import SlicePhase

__all__ = ["APS2d", "APS2dPhase", "APSIndex2d", "NORMS", "PAD_MODES", "aps_gather2d", "aps_index2d", "aps_select2d",
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


# ------------------------------------------------------------------------------------------- phases and surgery
class APS2dPhase(ModulePhaseOp):
    """An :class:`APS2d` at any phase relative to the component it chooses (or is given) per image.

    Per-image phases are applied in one pass (the offsets are per image anyway), so a call with ``index`` keeps its
    batch intact; ``return_index=True`` runs only at the default phase.
    """

    kind = "aps"

    def forward(self, x: Tensor, index: Tensor | None = None, return_index: bool = False, *,
                phase: PhaseValue = None) -> Tensor | tuple[Tensor, Tensor]:
        flat = self._flat_phases(phase, x)
        if flat is None:
            return self.module(x, index=index, return_index=return_index)
        if return_index:
            raise NotImplementedError(
                f"APS2d at '{self.name}' is called with return_index=True; only aps(x) and aps(x, index=...) run "
                "at other phases (swap() passes the index from an APSIndex2d instead)"
            )
        return self.shifted(x, flat, index)

    def at_phase(self, phase: Phase, x: Tensor, index: Tensor | None = None) -> Tensor:
        dy, dx = phase
        flat = torch.full((x.shape[0],), dy * self.factor[1] + dx, dtype=torch.long, device=x.device)
        return self.shifted(x, flat, index)

    def _flat_phases(self, phase: PhaseValue, x: Tensor) -> Tensor | None:
        """``phase`` as ``(N,)`` flat indices, or ``None`` when every image keeps phase 0."""
        if phase is None:
            return None
        flat = (torch.full((x.shape[0],), phase, dtype=torch.long, device=x.device) if isinstance(phase, int)
                else phase.to(device=x.device, dtype=torch.long))
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= self.num_phases:
            raise ValueError(
                f"phase index {lo if lo < 0 else hi} out of range for factor {self.factor} at op '{self.name}' "
                f"(expected 0 <= p < {self.num_phases})"
            )
        return None if hi == 0 else flat

    def shifted(self, x: Tensor, flat: Tensor, index: Tensor | None = None) -> Tensor:
        """Per image ``n``, the grid ``x[n, :, i * R_h + a_n + dy_n, j * R_w + b_n + dx_n]``, zero past the map.

        ``(a_n, b_n)`` is the component APS chooses (or ``index[n]``), ``(dy_n, dx_n)`` the phase ``flat[n]``.

        Shape:
            - x: ``(N, C, H, W)``
            - flat, index: ``(N,)``
            - output: ``(N, C, ceil(H / R_h), ceil(W / R_w))``
        """
        m = self.module
        sh, sw = self.factor
        chosen = aps_index2d(x, m.stride, m.p, m.pad_mode) if index is None else index.to(x.device).long()
        comps = polyphase_components2d(x, m.stride, m.pad_mode)
        n, _, c, oh, ow = comps.shape
        # Undo the polyphase split: the input as APS extended it, (N, C, oh * sh, ow * sw).
        ext = comps.reshape(n, sh, sw, c, oh, ow).permute(0, 3, 4, 1, 5, 2).reshape(n, c, oh * sh, ow * sw)
        ext = F.pad(ext, (0, sw, 0, sh))  # room for offsets up to 2R - 2; positions past the map are zero
        offsets = torch.stack([chosen // sw + flat // sw, chosen % sw + flat % sw], dim=1)
        out = ext.new_empty((n, c, oh, ow))
        for oy, ox in torch.unique(offsets, dim=0).tolist():
            idx = ((offsets[:, 0] == oy) & (offsets[:, 1] == ox)).nonzero().squeeze(1)
            out.index_copy_(0, idx, ext.index_select(0, idx)[..., oy::sh, ox::sw][..., :oh, :ow])
        return out


def _aps_rule(ctx: SwapContext) -> Rewrite | None:
    name, m = ctx.op.name, ctx.op.module
    if is_conv(ctx):
        return Rewrite({name: SwapSequential(conv_stride1(m), APS2d(ctx.stride, **ctx.kwargs), kept=0)}, name)
    if is_pool(ctx):
        return Rewrite({name: SwapSequential(pool_stride1(m), APS2d(ctx.stride, **ctx.kwargs), kept=None)}, name)
    return None


def _stride1_module(ctx: SiteSwapContext, node: fx.Node, op: PhaseOp) -> None:
    """Makes a strided conv/pool module node compute its stride-1 map (same weights, same path)."""
    gm = ctx.graph_module
    module = gm.get_submodule(str(node.target))
    if isinstance(module, nn.Conv2d):
        conv_stride1(module)
    else:
        set_submodule(gm, str(node.target), pool_stride1(module))


def _stride1_slice(ctx: SiteSwapContext, node: fx.Node, op: PhaseOp) -> None:
    """Makes a strided slice ``x[..., ::R_h, ::R_w]`` unstrided (the identity on its range)."""
    x, index = node.args
    strided = sliced_dims(index, len(ctx.in_shapes[op.name]))
    if op.dims != (-2, -1) or any(sl.start not in (None, 0) or sl.stop is not None for _, _, sl in strided):
        raise NotImplementedError(
            f"APS at slicing op '{op.name}': only x[..., ::R_h, ::R_w] over the last two dimensions is rewritten, "
            f"got index {index!r}"
        )
    items = index if isinstance(index, tuple) else (index,)
    node.args = (x, tuple(slice(it.start, it.stop) if isinstance(it, slice) else it for it in items))


_STRIDE1: dict[type[PhaseOp], Callable[[SiteSwapContext, fx.Node, PhaseOp], None]] = {
    Conv2dPhase: _stride1_module,
    MaxPool2dPhase: _stride1_module,
    AvgPool2dPhase: _stride1_module,
    SlicePhase: _stride1_slice,
}
"""Op class -> how to make its node compute the op's stride-1 map instead, for the APS site rule."""


def _aps_site_rule(ctx: SiteSwapContext) -> dict[str, tuple[int, ...]]:
    gm, graph, site = ctx.graph_module, ctx.graph_module.graph, ctx.site
    for op in ctx.ops:
        if type(op) not in _STRIDE1:
            raise NotImplementedError(
                f"APS at site '{site.name}': op '{op.name}' ({op.kind}, {type(op).__name__}) has no stride-1 "
                "rewrite; supported in sites of several ops: nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d and strided "
                "slicing x[..., ::R_h, ::R_w]"
            )
    prefix = f"{site.name}."
    block = site.name if all(name.startswith(prefix) for name in site.ops) else ""
    aps_kwargs = dict(ctx.kwargs)
    index_path = free_path(gm, block, "aps_index")
    gm.add_submodule(index_path, APSIndex2d(site.factor, **aps_kwargs))
    checked: dict[str, tuple[int, ...]] = {}
    index_node: fx.Node | None = None
    for full, op in zip(ctx.nodes, ctx.ops):
        _STRIDE1[type(op)](ctx, full, op)
        relative = op.name[len(prefix):] if block else op.name
        gather_path = free_path(gm, block, relative.replace(".", "_") + "_aps")
        gm.add_submodule(gather_path, APS2d(site.factor, **aps_kwargs))
        after = full
        if index_node is None:  # the main branch (first op in graph order) chooses the component
            with graph.inserting_after(full):
                index_node = graph.call_module(index_path, (full,))
            after = index_node
        with graph.inserting_after(after):
            gathered = graph.call_module(gather_path, (full,), {"index": index_node})
        full.replace_all_uses_with(gathered, delete_user_cb=lambda user: user not in (gathered, index_node))
        checked[gather_path] = ctx.out_shapes[op.name]
    return checked


register_phase_op(APSIndex2d, None)  # a leaf of the trace that never subsamples
register_layer("aps", swap_rule=_aps_rule, site_rule=_aps_site_rule, phase_op=APS2dPhase)(APS2d)
