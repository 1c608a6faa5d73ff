"""Phase search for dense prediction: the same best-first search, with criteria and aggregation defined on maps.

A segmentation model returns logits ``(N, K, H, W)`` at the input size (or a dict holding them, as torchvision's
segmentation models do under ``"out"``). :class:`DenseSearch` runs :class:`~polyglean.search.PhaseSearch` unchanged
(prefix sharing, batching, budgets, cost accounting) on those maps:

- **criteria** (:data:`DENSE_CRITERIA`, lower is expanded first): ``entropy`` — the mean over pixels of the
  normalised per-pixel entropy; ``random``; ``delta`` — ``Δx + Δy`` in input pixels.
- **displacement** of a state in input pixels: a site's phase ``(dy, dx)`` moves its output by ``(dy, dx)`` cells
  of its input grid, i.e. by ``(dy, dx)`` times the input pixels per such cell; the default search space keeps
  sites off the path to the output (:func:`main_path`, e.g. the average pools of an image projection) at phase 0.
- **alignment** (the border rule): a candidate's output at pixel ``p`` shows the content at ``p + Δ`` (its sampling
  grid is displaced by ``Δ``), so it is shifted back: ``aligned[y, x] = out[y − Δy, x − Δx]``. Pixels with
  ``y < Δy`` or ``x < Δx`` have no value in that candidate; each pixel is aggregated over the candidates that cover
  it (the default candidate covers every pixel, so none is left empty).
- **aggregation** per pixel (:data:`DENSE_AGGREGATORS`): ``mean`` of the covering candidates' logits, or ``entropy``
  weighting ``w_s(p) = 1 − H(softmax z_s(p)) / log K``.

Example:
    >>> net = PhaseNet(model, (3, 360, 480))  # doctest: +SKIP
    >>> search = DenseSearch(net, budget=10)  # doctest: +SKIP
    >>> result = search.run(x, budgets=[1, 4, 10])  # doctest: +SKIP
    >>> maps = result.logits[10]  # (N, K, H, W)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from polyglean.errors import ArgumentError
from polyglean.phase.net import PhaseNet
from polyglean.registry import Registry
from polyglean.search.criteria import Criterion, DeltaCriterion, RandomCriterion
from polyglean.search.engine import PhaseSearch, SearchResult
from polyglean.sites import Site

__all__ = ["DENSE_AGGREGATORS", "DENSE_CRITERIA", "DenseSearch", "MapAggregator", "MapEntropyAggregator",
           "MapEntropyCriterion", "MapMeanAggregator", "align_maps", "main_path", "pixel_displacement",
           "pixel_entropy"]


def pixel_entropy(logits: Tensor) -> Tensor:
    """Normalised entropy ``H(softmax z) / log K`` of every pixel.

    Shape:
        - logits: ``(..., K, H, W)``
        - output: ``(..., H, W)``
    """
    logp = torch.log_softmax(logits.float(), -3)
    return -(logp.exp() * logp).sum(-3) / math.log(logits.shape[-3])


# ------------------------------------------------------------------------------------------------- criteria
DENSE_CRITERIA: Registry[type[Criterion]] = Registry("dense criterion")


@DENSE_CRITERIA.register("entropy")
class MapEntropyCriterion(Criterion):
    """Mean normalised pixel entropy of the map: the most confident candidate is expanded first.

    Shape:
        - logits: ``(M, K, H, W)``
        - output: ``(M,)``
    """

    def score(self, logits: Tensor, shift: Tensor, generator: torch.Generator) -> Tensor:
        return pixel_entropy(logits).flatten(1).mean(1)


DENSE_CRITERIA.register("random")(RandomCriterion)
DENSE_CRITERIA.register("delta")(DeltaCriterion)


# ----------------------------------------------------------------------------------------------- aggregators
class MapAggregator:
    """Combines aligned candidate maps per pixel over the candidates that cover the pixel.

    Shape:
        - maps: ``(N, B, K, H, W)``
        - valid: ``(N, B, H, W)`` bool, true where the candidate covers the pixel
        - output: ``(N, K, H, W)``
    """

    def combine(self, maps: Tensor, valid: Tensor) -> Tensor:
        raise NotImplementedError


DENSE_AGGREGATORS: Registry[type[MapAggregator]] = Registry("dense aggregator")


def _weighted(maps: Tensor, weights: Tensor) -> Tensor:
    w = weights.to(maps.dtype)
    total = w.sum(1, keepdim=True)
    if bool((total == 0).any()):
        raise ValueError("a pixel is covered by no candidate (the default candidate must be among them)")
    return (maps * (w / total).unsqueeze(2)).sum(1)


@DENSE_AGGREGATORS.register("mean")
class MapMeanAggregator(MapAggregator):
    """The mean of the covering candidates' logits at each pixel."""

    def combine(self, maps: Tensor, valid: Tensor) -> Tensor:
        return _weighted(maps, valid)


@DENSE_AGGREGATORS.register("entropy")
class MapEntropyAggregator(MapAggregator):
    """Per-pixel confidence weighting: ``w_s(p) = 1 − H(softmax z_s(p)) / log K`` over the covering candidates."""

    def combine(self, maps: Tensor, valid: Tensor) -> Tensor:
        w = (1.0 - pixel_entropy(maps)).clamp_min(1e-12) * valid
        return _weighted(maps, w)


def _resolve(registry: Registry, value: Any, base: type) -> Any:
    if isinstance(value, str):
        return registry.get(value)()
    if isinstance(value, base):
        return value
    raise ArgumentError(f"expected a {registry.kind} name ({', '.join(registry.names())}) or a {base.__name__}, "
                        f"got {value!r}")


# ------------------------------------------------------------------------------------------------ geometry
def main_path(sites: Sequence[Site]) -> list[Site]:
    """The sites on the path to the output: from the last site back, each continues the latest earlier site whose
    output size is its input size (else the site before it), until a site that reads the input.

    Side branches (the average pools of an image projection beside the stem, the spatial-reduction convs of
    efficient attention) are left out.
    """
    if not sites:
        return []
    full = tuple(sites[0].in_size)
    chain = [sites[-1]]
    while tuple(chain[-1].in_size) != full and chain[-1].index > 0:
        i = chain[-1].index
        before = [s for s in sites[:i] if tuple(s.out_size) == tuple(chain[-1].in_size)]
        chain.append(before[-1] if before else sites[i - 1])
    return chain[::-1]


def pixel_displacement(states: Tensor, sites: Sequence[Site]) -> Tensor:
    """Displacement ``(Δy, Δx)`` of phase states in input pixels: ``Σ_l (dy_l, dx_l) · S_l``, where ``S_l`` is the
    input pixels per cell of site ``l``'s input grid (its input size over the model's).

    Args:
        states: Flat phase indices ``dy * R_w + dx``, one per site.
        sites: All the net's sites.

    Shape:
        - states: ``(..., L)``
        - output: ``(..., 2)`` int64
    """
    dy = torch.zeros(states.shape[:-1], dtype=torch.long, device=states.device)
    dx = torch.zeros_like(dy)
    for s in sites:
        sh, sw = _scale_of(s, sites)
        rw = s.factor[1]
        dy = dy + (states[..., s.index] // rw) * sh
        dx = dx + (states[..., s.index] % rw) * sw
    return torch.stack([dy, dx], -1)


def _scale_of(site: Site, sites: Sequence[Site]) -> tuple[int, int]:
    """Input pixels per cell of a site's input grid, from its input size."""
    ih, iw = sites[0].in_size
    return (max(1, round(ih / site.in_size[0])), max(1, round(iw / site.in_size[1])))


def align_maps(maps: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    """Shifts each candidate map back by its displacement: ``aligned[y, x] = map[y − Δy, x − Δx]``.

    Args:
        maps: Candidate maps at the input resolution.
        shift: ``(Δy, Δx) >= 0`` in input pixels.

    Returns:
        The aligned maps (zero where uncovered) and the mask of covered pixels.

    Shape:
        - maps: ``(M, K, H, W)``
        - shift: ``(M, 2)``
        - output: ``(M, K, H, W)``, ``(M, H, W)`` bool
    """
    if maps.shape[0] != shift.shape[0]:
        raise ValueError(f"got {maps.shape[0]} maps but {shift.shape[0]} shifts")
    if bool((shift < 0).any()):
        raise ValueError(f"displacements must be >= 0, got {shift.min().item()}")
    m, _, h, w = maps.shape
    out = torch.zeros_like(maps)
    valid = torch.zeros(m, h, w, dtype=torch.bool, device=maps.device)
    for i, (dy, dx) in enumerate(shift.tolist()):
        if dy >= h or dx >= w:
            continue
        out[i, :, dy:, dx:] = maps[i, :, : h - dy, : w - dx]
        valid[i, dy:, dx:] = True
    return out, valid


# --------------------------------------------------------------------------------------------------- search
class DenseSearch(PhaseSearch):
    """The phase search for segmentation models: per-image best-first search over output maps, aligned and
    aggregated per pixel.

    Args:
        net: The :class:`PhaseNet` of a model returning ``(N, K, H, W)`` logits at the input size, or a dict of
            them (``output_key``).
        budget: ``B >= 1``; ``B = 1`` is the plain model, bit for bit.
        criterion: ``entropy`` (mean pixel entropy), ``random``, ``delta``, or a :class:`Criterion` scoring maps.
        aggregate: ``mean`` or ``entropy`` (per pixel), or a :class:`MapAggregator`.
        align: Shift each candidate's map back by its displacement before aggregating (the border rule above).
        search_space: Sites to search. Default: the main-path sites but the first (for ESPNet and CGNet on CamVid,
            the 1/4 and 1/8 reductions: 16 states).
        output_key: The entry of a dict output holding the logits.
        seed: Seed of the random criterion.
        phase_stride: Search every N-th phase where a site's factor exceeds N (as :class:`PhaseSearch`).
    """

    def __init__(self, net: PhaseNet, budget: int = 10, criterion: str | Criterion = "entropy",
                 aggregate: str | MapAggregator = "entropy", align: bool = True,
                 search_space: Sequence[str | int] | None = None, output_key: str = "out", seed: int = 0,
                 phase_stride: int = 1) -> None:
        self.output_key = output_key
        crit = _resolve(DENSE_CRITERIA, criterion, Criterion)
        if getattr(crit, "needs_features", False) or getattr(crit, "rescore", False):
            raise ArgumentError(f"criterion {type(crit).__name__} needs feature maps; a dense search scores output "
                                f"maps: use one of {', '.join(DENSE_CRITERIA.names())}")
        super().__init__(net, budget, crit, "mean", align=False, search_space=search_space, aggregate_on="logits",
                         seed=seed, phase_stride=phase_stride)
        self.aggregator = _resolve(DENSE_AGGREGATORS, aggregate, MapAggregator)
        self.align = bool(align)

    def _space(self, search_space: Sequence[str | int] | None) -> list[Site]:
        if search_space is not None:
            return super()._space(search_space)
        chain = main_path(self.net.sites)
        return chain[1:] if len(chain) > 1 else chain

    def _displacement(self, states: Tensor) -> Tensor:
        return pixel_displacement(states, self.net.sites)

    def _as_logits(self, out: Any) -> Tensor:
        if isinstance(out, dict):
            if self.output_key not in out:
                raise ValueError(f"the model returned a dict without {self.output_key!r} (keys: {sorted(out)}); "
                                 "pass output_key")
            out = out[self.output_key]
        if not isinstance(out, Tensor) or out.dim() != 4:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"a dense search needs a model returning logits (N, K, H, W); the model returned {shape}")
        return out

    def __call__(self, x: Tensor) -> Tensor:
        """Aggregated logits ``(N, K, H, W)`` at ``self.budget``."""
        return self.run(x).logits[self.budget]

    @torch.no_grad()
    def combine(self, result: SearchResult, budget: int, aggregate: str | MapAggregator | None = None,
                align: bool | None = None) -> Tensor:
        """Aggregates the first ``budget`` candidates per pixel (another aggregator or alignment may be given; one
        with ``needs_shift`` also gets the displacements ``(N, B, 2)``, as the learned one does)."""
        aggregator = self.aggregator if aggregate is None else _resolve(DENSE_AGGREGATORS, aggregate, MapAggregator)
        do_align = self.align if align is None else bool(align)
        if budget == 1:
            return result.candidate_logits[:, 0]
        maps, shift = result.candidate_logits[:, :budget], result.shift[:, :budget]
        n, b = maps.shape[:2]
        if do_align:
            flat, valid = align_maps(maps.flatten(0, 1), shift.reshape(-1, 2))
            maps, valid = flat.reshape(maps.shape), valid.reshape(n, b, *maps.shape[-2:])
        else:
            valid = torch.ones(n, b, *maps.shape[-2:], dtype=torch.bool, device=maps.device)
        if getattr(aggregator, "needs_shift", False):  # the learned aggregator codes each candidate's displacement
            return aggregator.combine(maps, valid, shift=shift)
        return aggregator.combine(maps, valid)
