"""Op kinds for the downsampling layers, so that site discovery and ``PhaseNet`` run models that use them.

BlurPool needs none: its forward traces to a strided depthwise ``F.conv2d``, which the built-in ``conv`` kind
already runs at any phase. SoftPool, adaPool and PASA subsample with ``unfold`` (plus a slice of the PASA weights)
and APS with a data-dependent gather, which no built-in kind recognises, so each gets a kind here and is kept a
leaf of the fx trace (a registered kind is never traced into, so their Python input checks stay as they are).

Every kind keeps the exactness contract of :mod:`polyglean.phase.functional`: phase ``(0, 0)`` calls the layer
itself (bit-exact), and phase ``(dy, dx)`` keeps entries ``(i * R_h + dy, j * R_w + dx)`` of the layer's stride-1
result, with the default output shape; entries past the stride-1 map are zero.

For APS the "stride-1 result" is the input itself, read from the component APS chose: phase ``(dy, dx)`` keeps
``x[n, :, i * R_h + a_n + dy, j * R_w + b_n + dx]`` where ``(a_n, b_n)`` is the component chosen for image ``n``
(after APS's own extension of odd sizes), so phase ``(0, 0)`` is APS itself and the other phases are the
neighbouring grids relative to its choice. A call with a given ``index`` (the branches of a block rewritten by
:func:`polyglean.swap`, which all receive the index of :class:`~polyglean.layers.APSIndex2d`) takes ``(a_n, b_n)``
from that index, so every branch of the site moves by the same phase. :class:`~polyglean.layers.APSIndex2d`
itself does not subsample; it is registered as a kind that never matches, which keeps it a leaf of the trace.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polyglean.layers._utils import pool_out_size
from polyglean.layers.adapool import AdaPool2d, edscw_pool2d
from polyglean.layers.aps import APS2d, APSIndex2d, aps_index2d, polyphase_components2d
from polyglean.layers.pasa import PASA2d, pasa2d
from polyglean.layers.softpool import SoftPool2d, soft_pool2d
from polyglean.phase.functional import Phase
from polyglean.sites.ops import ModulePhaseOp, PhaseValue, register_module_op

__all__ = ["APS2dPhase", "AdaPool2dPhase", "PASA2dPhase", "SoftPool2dPhase", "subsample_at"]


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


def _pool_out(module: nn.Module, x: Tensor) -> tuple[int, int]:
    k, s, p = module.kernel_size, module.stride, module.padding
    return (pool_out_size(x.shape[-2], k[0], s[0], p[0], module.ceil_mode),
            pool_out_size(x.shape[-1], k[1], s[1], p[1], module.ceil_mode))


class SoftPool2dPhase(ModulePhaseOp):
    """A :class:`~polyglean.layers.SoftPool2d` at any phase of its stride."""

    kind = "soft_pool"

    def at_phase(self, phase: Phase, x: Tensor) -> Tensor:
        m = self.module
        y1 = soft_pool2d(x, m.kernel_size, 1, m.padding, False)
        return subsample_at(y1, self.factor, phase, _pool_out(m, x))


class AdaPool2dPhase(ModulePhaseOp):
    """An :class:`~polyglean.layers.AdaPool2d` at any phase of its stride (scalar or per-position ``beta``)."""

    kind = "ada_pool"

    def at_phase(self, phase: Phase, x: Tensor) -> Tensor:
        m = self.module
        out = _pool_out(m, x)
        edscw1 = edscw_pool2d(x, m.kernel_size, 1, m.padding, False, similarity=m.similarity)
        edscw = subsample_at(edscw1, self.factor, phase, out)
        soft = subsample_at(soft_pool2d(x, m.kernel_size, 1, m.padding, False), self.factor, phase, out)
        beta = m.beta.to(dtype=x.dtype)
        return beta * edscw + (1 - beta) * soft


class PASA2dPhase(ModulePhaseOp):
    """A :class:`~polyglean.layers.PASA2d` at any phase of its stride."""

    kind = "pasa"

    def at_phase(self, phase: Phase, x: Tensor) -> Tensor:
        m = self.module
        y1 = pasa2d(x, m.logits(x), m.kernel_size, 1)
        s = m.stride
        out = (-(-x.shape[-2] // s), -(-x.shape[-1] // s))
        return subsample_at(y1, self.factor, phase, out)


class APS2dPhase(ModulePhaseOp):
    """An :class:`~polyglean.layers.APS2d` at any phase relative to the component it chooses (or is given) per image.

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


def _factory(phase_cls: type[ModulePhaseOp]) -> Any:
    def factory(module: nn.Module, name: str) -> ModulePhaseOp | None:
        stride = module.stride
        factor = (stride, stride) if isinstance(stride, int) else (int(stride[0]), int(stride[1]))
        return phase_cls(module, name, factor) if factor != (1, 1) else None

    return factory


register_module_op(SoftPool2d, _factory(SoftPool2dPhase))
register_module_op(AdaPool2d, _factory(AdaPool2dPhase))
register_module_op(PASA2d, _factory(PASA2dPhase))
register_module_op(APS2d, _factory(APS2dPhase))
register_module_op(APSIndex2d, lambda module, name: None)  # a leaf that never subsamples
