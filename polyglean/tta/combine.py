"""Image-space TTA combined with phase search: every view searched over phases, then the views aggregated.

Each augmented view of a batch is searched with :meth:`PhaseSearch.run` at its own budget ``B_phase`` (``B_phase =
1`` is the plain model on that view); a :class:`~polyglean.tta.aggregators.TTAAggregator` then combines the views'
searched logits. A prediction evaluates ``B_image`` views at ``B_phase`` states each: ``B_total = B_image x
B_phase`` states, and its cost is the sum of the views' search costs (FLOPs, in plain forwards, and seconds).

:class:`ViewLogits` holds every view's searched logits of a data set at several phase budgets, with their costs, so
that one pass serves every aggregator, view budget and phase budget.

Example:
    >>> search = PhaseSearch(PhaseNet(model, (3, 32, 32)), budget=4)  # doctest: +SKIP
    >>> tta = AugmentedSearch(search, build_policy("flip", (3, 32, 32)), MeanTTA())  # doctest: +SKIP
    >>> out = tta.run(x, budgets=[1, 4])  # doctest: +SKIP
    >>> out.logits[4].shape, out.forward_equivalents[4]  # doctest: +SKIP
    (torch.Size([8, 10]), 5.84)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from polyglean.errors import ArgumentError, DataError
from polyglean.search import PhaseSearch
from polyglean.tta.aggregators import TTAAggregator
from polyglean.tta.augment import Augmentation

__all__ = ["AugmentedSearch", "TTAResult", "ViewLogits", "concat_images", "search_views"]


@dataclass
class ViewLogits:
    """Searched logits of every view of a data set at several phase budgets, and what each cost.

    Attributes:
        views: view names, in policy order.
        budgets: phase budgets, ascending.
        logits: ``(A, P, N, K)``: view, phase budget, image, class.
        flops: ``(A, P)``: FLOPs of the view's search to that budget, summed over the images.
        seconds: ``(A, P)``: wall time of the view's augmentation and search to that budget, summed over batches.
        forward_flops: FLOPs of one plain forward of all ``N`` images.
        labels: ``(N,)``, or None when unknown.
    """

    views: list[str]
    budgets: list[int]
    logits: Tensor
    flops: Tensor
    seconds: Tensor
    forward_flops: float
    labels: Tensor | None = None

    def _budget(self, budget: int) -> int:
        if budget not in self.budgets:
            raise ArgumentError(f"phase budget {budget} was not computed; have {self.budgets}")
        return self.budgets.index(budget)

    def at(self, budget: int) -> Tensor:
        """Every view's logits at phase budget ``budget``, ``(N, A, K)``."""
        return self.logits[:, self._budget(budget)].transpose(0, 1)

    def cost(self, views: Iterable[int], budget: int) -> tuple[float, float]:
        """``(forward equivalents, seconds)`` of evaluating ``views`` (indices) at phase budget ``budget``."""
        p = self._budget(budget)
        idx = sorted(set(views))
        return float(self.flops[idx, p].sum()) / self.forward_flops, float(self.seconds[idx, p].sum())

    def select(self, names: Sequence[str]) -> ViewLogits:
        """The views ``names``, in that order."""
        missing = [n for n in names if n not in self.views]
        if missing:
            raise ArgumentError(f"views {missing} not computed; have {self.views}")
        idx = [self.views.index(n) for n in names]
        return ViewLogits(list(names), list(self.budgets), self.logits[idx], self.flops[idx], self.seconds[idx],
                          self.forward_flops, self.labels)

    @staticmethod
    def stack(parts: Sequence[ViewLogits]) -> ViewLogits:
        """Views of the same images and budgets, side by side."""
        first = parts[0]
        if any(p.budgets != first.budgets or p.logits.shape[2:] != first.logits.shape[2:] for p in parts):
            raise ArgumentError("ViewLogits.stack needs the same images, classes and budgets in every part")
        return ViewLogits([v for p in parts for v in p.views], list(first.budgets),
                          torch.cat([p.logits for p in parts]), torch.cat([p.flops for p in parts]),
                          torch.cat([p.seconds for p in parts]), first.forward_flops, first.labels)


def search_views(search: PhaseSearch, views: Sequence[Augmentation], x: Tensor, budgets: Sequence[int]
                 ) -> ViewLogits:
    """Searches every view of the batch ``x`` to the largest of ``budgets``.

    Args:
        search: the phase search (its aggregation settings apply to every view).
        views: the augmentations.
        x: the preprocessed batch.
        budgets: the phase budgets to aggregate at.

    Shape:
        - x: ``(N, C, H, W)``
        - output logits: ``(A, P, N, K)``
    """
    budgets = sorted(set(budgets))
    logits, flops, seconds = [], [], []
    forward = 0.0
    for aug in views:
        tick = time.perf_counter()
        xa = aug(x)
        prep = time.perf_counter() - tick
        result = search.run(xa, budgets=budgets)
        logits.append(torch.stack([result.logits[b].float() for b in budgets]))
        flops.append([result.flops_by_budget[b] for b in budgets])
        seconds.append([prep + result.seconds_by_budget[b] for b in budgets])
        forward = result.forward_flops
    return ViewLogits([a.name for a in views], budgets, torch.stack(logits),
                      torch.tensor(flops, dtype=torch.float64), torch.tensor(seconds, dtype=torch.float64), forward)


def concat_images(parts: Sequence[ViewLogits]) -> ViewLogits:
    """The same views and budgets over consecutive batches of images, as one."""
    first = parts[0]
    if any(p.views != first.views or p.budgets != first.budgets for p in parts):
        raise ArgumentError("concat_images needs the same views and budgets in every part")
    labels = None if any(p.labels is None for p in parts) else torch.cat([p.labels for p in parts])  # type: ignore
    return ViewLogits(list(first.views), list(first.budgets), torch.cat([p.logits for p in parts], 2),
                      sum(p.flops for p in parts), sum(p.seconds for p in parts),  # type: ignore[arg-type]
                      sum(p.forward_flops for p in parts), labels)


@dataclass
class TTAResult:
    """What :meth:`AugmentedSearch.run` produced, per phase budget.

    Attributes:
        logits: ``{B_phase: (N, K)}``.
        views: the views evaluated (indices into the policy).
        forward_equivalents: ``{B_phase: cost in plain forwards (FLOPs)}``.
        seconds: ``{B_phase: wall time of the views' searches}``.
    """

    logits: dict[int, Tensor]
    views: list[int]
    forward_equivalents: dict[int, float]
    seconds: dict[int, float]


class AugmentedSearch:
    """Image-space TTA over phase search: ``B_total = B_image x B_phase``.

    :meth:`run` searches the views a batch needs and aggregates them; for an evaluation of many aggregators,
    :meth:`collect` searches every view of a data set once (reading and filling a :class:`~polyglean.tta.ViewCache`)
    and :meth:`aggregate` combines the collected views with any aggregator.

    Args:
        search: the phase search run on every view.
        policy: the augmentations, in policy order.
        aggregator: combines the views; fitted ones must be fitted (:meth:`fit`) or have their state loaded.
            Default: :class:`~polyglean.tta.MeanTTA` over every view.
    """

    def __init__(self, search: PhaseSearch, policy: Sequence[Augmentation],
                 aggregator: TTAAggregator | None = None) -> None:
        from polyglean.tta.aggregators import MeanTTA

        if not policy:
            raise ArgumentError("the TTA policy is empty")
        self.search = search
        self.policy = list(policy)
        self.aggregator = aggregator if aggregator is not None else MeanTTA()

    @torch.no_grad()
    def collect(self, batches: Iterable[tuple[Tensor, Tensor]], budgets: Sequence[int], *, total: int,
                cache: Any = None, device: str | torch.device = "cpu",
                progress: Callable[[str, int, int], None] | None = None) -> ViewLogits:
        """Every view's searched logits at ``budgets`` over ``total`` labelled images, in policy order.

        ``batches`` is read only when some view is not in ``cache`` (a :class:`~polyglean.tta.ViewCache`), and
        then only the missing views are searched (on ``device``); they are stored in the cache afterwards. The
        collected logits are on the CPU, whether searched or read from the cache.

        Shape:
            - batches: ``(x, y)`` with x ``(n, C, H, W)`` and y ``(n,)``, ``total`` images in all
            - output logits: ``(A, P, N, K)``
        """
        budgets = sorted(set(budgets))
        found = {a.name: v for a in self.policy if cache is not None
                 and (v := cache.get(a.name, budgets, total)) is not None}
        missing = [a for a in self.policy if a.name not in found]
        labels = next((v.labels for v in found.values()), None)
        if missing:
            parts, ys = [], []
            for x, y in batches:
                parts.append(search_views(self.search, missing, x.to(device), budgets))
                ys.append(y)
                if progress is not None:
                    progress(f"{len(missing)} view(s)", sum(len(v) for v in ys), total)
            if not parts:
                raise DataError("no images to search: the data set is empty")
            computed = concat_images(parts)
            computed.logits = computed.logits.cpu()  # collected results live on the CPU, as cached ones do
            computed.labels = labels = torch.cat(ys)
            if len(labels) != total:
                raise DataError(f"expected {total} images, the batches held {len(labels)}")
            if cache is not None:
                cache.put(computed)
            found.update({a.name: computed.select([a.name]) for a in missing})
        views = ViewLogits.stack([found[a.name] for a in self.policy])
        views.labels = labels
        return views

    def aggregate(self, views: ViewLogits, budgets: Sequence[int] | None = None,
                  aggregator: TTAAggregator | None = None) -> TTAResult:
        """Combines collected views (:meth:`collect`) at each phase budget with ``aggregator`` (default: this
        search's); the cost counts the distinct views it uses."""
        agg = aggregator if aggregator is not None else self.aggregator
        budgets = sorted(set(budgets or views.budgets))
        used = agg.views(len(self.policy))
        logits = {b: agg(views.at(b)) for b in budgets}
        cost = {b: views.cost(used, b) for b in budgets}
        return TTAResult(logits, used, {b: c[0] for b, c in cost.items()}, {b: c[1] for b, c in cost.items()})

    @torch.no_grad()
    def fit(self, x: Tensor, labels: Tensor, budget: int = 1) -> TTAAggregator:
        """Fits the aggregator on every view of the held-out batch ``x`` searched at phase budget ``budget``."""
        views = search_views(self.search, self.policy, x, [budget])
        return self.aggregator.fit(views.at(budget), labels)

    @torch.no_grad()
    def run(self, x: Tensor, budgets: Sequence[int] | None = None) -> TTAResult:
        """The aggregated prediction of ``x`` at each phase budget, searching only the views the aggregator uses."""
        budgets = sorted(set(budgets or [self.search.budget]))
        used = self.aggregator.views(len(self.policy))
        part = search_views(self.search, [self.policy[i] for i in used], x, budgets)
        full = part.logits.new_zeros(len(self.policy), *part.logits.shape[1:])
        full[used] = part.logits
        views = ViewLogits([a.name for a in self.policy], budgets, full, torch.zeros(len(self.policy), len(budgets)),
                           torch.zeros(len(self.policy), len(budgets)), part.forward_flops)
        logits = {b: self.aggregator(views.at(b)) for b in budgets}
        cost = {b: part.cost(range(len(used)), b) for b in budgets}
        return TTAResult(logits, used, {b: c[0] for b, c in cost.items()}, {b: c[1] for b, c in cost.items()})
