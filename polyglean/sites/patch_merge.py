"""Op kind: Swin patch merging (2x2 space-to-depth on channels-last maps, then norm and a linear reduction).

A patch-merging layer concatenates ``x[..., 0::2, 0::2, :]``, ``x[..., 1::2, 0::2, :]``, ... ; at phase
``(dy, dx)`` the 2x2 grid starts ``(dy, dx)`` further down/right, which is the layer applied to its input shifted
up/left by ``(dy, dx)`` with zeros entering at the bottom/right.
"""

from __future__ import annotations

from torch import Tensor, nn

from polyglean.sites.geometry import Phase, shift2d
from polyglean.sites.ops import ModulePhaseOp, register_module_op

__all__ = ["PatchMergingPhase"]


class PatchMergingPhase(ModulePhaseOp):
    """A channels-last ``(N, H, W, C)`` patch-merging layer at any of its 2x2 phases."""

    kind = "patch_merge"

    def at_phase(self, phase: Phase, x: Tensor) -> Tensor:
        return self.module(shift2d(x, phase, dims=(-3, -2)))


def _patch_merging(module: nn.Module, name: str) -> PatchMergingPhase:
    return PatchMergingPhase(module, name, (2, 2), dims=(-3, -2))


try:
    from torchvision.models.swin_transformer import PatchMerging as _TvPatchMerging
    from torchvision.models.swin_transformer import PatchMergingV2 as _TvPatchMergingV2
except ImportError:  # pragma: no cover
    _TvPatchMerging = _TvPatchMergingV2 = None
try:
    from timm.models.swin_transformer import PatchMerging as _TimmPatchMerging
except ImportError:  # pragma: no cover
    _TimmPatchMerging = None

for _cls in (_TvPatchMerging, _TvPatchMergingV2, _TimmPatchMerging):
    if _cls is not None:
        register_module_op(_cls, _patch_merging)
