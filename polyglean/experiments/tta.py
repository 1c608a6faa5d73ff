"""Image-space TTA, alone and over phase search, evaluated on labelled images at matched total budgets.

Every view of the policy is searched over phases up to the largest phase budget (one search per view gives every
smaller budget) through :meth:`polyglean.tta.AugmentedSearch.collect`; the TTA aggregators then combine the views'
searched logits for every view budget and phase budget. GPS, AugTTA and ClassTTA are fitted on the views' searched
logits of held-out images at the same phase budget, or their fitted state is given. Each row reports
top-1/top-5/NLL/ECE, the change against the plain model (the input view at phase budget 1) with a paired 95%
bootstrap interval and McNemar's p, and the cost: the views' searches in plain forwards (FLOPs) and seconds.

With ``cache``, every view's searched logits are kept in a :class:`polyglean.tta.ViewCache` keyed on content: the
model's weights (SHA-256), the preprocessing, the selected images (names, sizes, modification times, labels), the
search settings (criterion, aggregation, alignment, search space, seed, a learned aggregator's SHA-256), the view.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from polyglean.errors import ArgumentError, DataError
from polyglean.experiments.common import (
    Outcomes,
    Progress,
    _nothing,
    build_search,
    data_fingerprint,
    metrics_row,
    model_classes,
)
from polyglean.models import Preprocess
from polyglean.phase.net import PhaseNet

__all__ = ["TTAConfig", "TTAEvalResult", "evaluate_tta"]

CACHE_FORMAT = 2
"""Bumped whenever the cached content changes meaning; older entries are never read."""


@dataclass(frozen=True)
class TTAConfig:
    """What :func:`evaluate_tta` runs.

    Args:
        tta: TTA aggregator names (``none``: the phase search alone on the input), no repeats.
        policy: the augmentation policy.
        view_budgets: views per image (None: every view of the policy); gps: greedy picks.
        phase_budgets: phase budgets of every view (ascending); budget 1 is always searched, as the reference.
        criterion: the search order.
        aggregate: the phase aggregation of every view (one name; ``learned`` needs ``learned``).
        align: align the candidates' feature maps (features only).
        aggregate_on: ``"features"`` or ``"logits"``.
        search_space: sites to search; None: the default.
        learned: the trained aggregator for ``aggregate="learned"``.
        seed: seed of the random criterion.
        tta_seed: seed of the random-offset crops.
        batch_size: images per batch.
        workers: data-loading worker processes.
        device: where the model runs.
        model_id: the model spec, recorded in the cache key.
        cache: folder of the view cache, or None.
    """

    tta: tuple[str, ...] = ("none", "mean")
    policy: str = "flip"
    view_budgets: tuple[int | None, ...] = (None,)
    phase_budgets: tuple[int, ...] = (1,)
    criterion: str = "entropy"
    aggregate: str = "entropy"
    align: bool = True
    aggregate_on: str = "features"
    search_space: tuple[str | int, ...] | None = None
    learned: Any = None
    seed: int = 0
    tta_seed: int = 0
    batch_size: int = 32
    workers: int = 0
    device: str | torch.device = "cpu"
    model_id: str = ""
    cache: str | Path | None = None

    def __post_init__(self) -> None:
        from polyglean.aggregate import AGGREGATORS
        from polyglean.tta import POLICIES, TTA_AGGREGATORS

        if not self.tta:
            raise ArgumentError("no TTA aggregator named; choose from: none, " + ", ".join(TTA_AGGREGATORS.names()))
        repeated = sorted({a for a in self.tta if self.tta.count(a) > 1})
        if repeated:
            raise ArgumentError(f"TTA aggregator {repeated[0]!r} is named twice in {','.join(self.tta)}")
        for name in self.tta:
            if name != "none":
                TTA_AGGREGATORS.get(name)  # unknown names list the known ones
        POLICIES.get(self.policy)
        AGGREGATORS.get(self.aggregate)
        if any(b is not None and b < 1 for b in self.view_budgets) or not self.view_budgets:
            raise ArgumentError(f"--tta-budget must be >= 1, got {min(b or 0 for b in self.view_budgets)}")
        if not self.phase_budgets or any(b < 1 for b in self.phase_budgets):
            raise ArgumentError(f"budget {min(self.phase_budgets, default=0)} out of range: budgets are >= 1")
        if self.batch_size < 1:
            raise ArgumentError(f"batch size must be >= 1, got {self.batch_size}")
        if (self.aggregate == "learned") != (self.learned is not None):
            raise ArgumentError("aggregate 'learned' needs its trained aggregator (and a trained aggregator needs "
                                "aggregate 'learned')")
        if self.learned is not None and bool(self.learned.meta.get("align")) != (self.align and
                                                                               self.aggregate_on == "features"):
            trained = "with" if self.learned.meta.get("align") else "without"
            raise ArgumentError(f"the learned aggregator was trained {trained} alignment; evaluate it {trained} "
                                "alignment")

    def fitted(self) -> list[str]:
        """The aggregators that must be fitted (or have their state given)."""
        from polyglean.tta import TTA_AGGREGATORS

        return [n for n in self.tta if n != "none" and TTA_AGGREGATORS.get(n).needs_fit]


@dataclass
class TTAEvalResult:
    """What :func:`evaluate_tta` measured.

    Attributes:
        rows: one per aggregator, view budget and phase budget (see the module docstring).
        outcomes: per-image outcomes by ``(tta, view_budget, phase_budget)``.
        labels: ``(N,)``.
        fits: the fitted aggregators by :func:`polyglean.tta.fit_key` (to save them).
        views: the policy's view names.
        search_space: names of the searched sites.
        align: whether the phase aggregation aligned the candidates.
        fit_images: images the fits were made on (None when states were given).
    """

    rows: list[dict[str, Any]]
    outcomes: dict[tuple[str, int | None, int], Outcomes]
    labels: Tensor
    fits: dict[str, Any]
    views: list[str]
    search_space: list[str]
    align: bool
    fit_images: int | None


def _cache(config: TTAConfig, net: PhaseNet, preprocess: Preprocess, search: Any, dataset: Dataset[Any]) -> Any:
    """The view cache of ``dataset``, keyed on everything its logits depend on."""
    from polyglean.aggregate import model_fingerprint
    from polyglean.tta import ViewCache

    if config.cache is None:
        return None
    key = {
        "format": CACHE_FORMAT, "model": config.model_id, "model_sha256": model_fingerprint(net.model),
        "preprocess": [repr(preprocess), list(preprocess.mean), list(preprocess.std)],
        "data_sha256": data_fingerprint(dataset), "criterion": config.criterion, "aggregate": config.aggregate,
        "aggregator_sha256": None if config.learned is None else model_fingerprint(config.learned),
        "align": search.align, "aggregate_on": config.aggregate_on, "seed": config.seed,
        "search_space": [s.name for s in search.search_space], "sites": [s.name for s in net.sites],
        "device": torch.device(config.device).type,
    }
    return ViewCache(config.cache, key)


def _views(tta: Any, dataset: Dataset[Any], budgets: list[int], config: TTAConfig, cache: Any, num_classes: int,
           stage: str, progress: Progress) -> Any:
    total = len(dataset)  # type: ignore[arg-type]
    if total == 0:
        raise DataError(f"the {stage} data set is empty")

    def batches() -> Any:
        for x, y in DataLoader(dataset, batch_size=config.batch_size, num_workers=config.workers):
            if len(y) and int(y.max()) >= num_classes:
                raise DataError(f"label {int(y.max())} out of range for a model with {num_classes} classes")
            yield x, y

    return tta.collect(batches(), budgets, total=total, cache=cache, device=config.device,
                       progress=lambda what, done, n: progress(f"{stage}: {what}", done, n))


def _aggregator(name: str, vb: int | None, b: int, states: Mapping[str, Any] | None, fit_views: Any) -> Any:
    """The TTA aggregator ``name`` with ``vb`` views, fitted at phase budget ``b`` (or its state loaded)."""
    from polyglean.tta import TTA_AGGREGATORS, fit_key

    agg = TTA_AGGREGATORS.get(name)(vb)
    if not agg.needs_fit:
        return agg
    key = fit_key(name, vb, b)
    if states is not None:
        if key not in states:
            raise ArgumentError(f"the fitted TTA state holds no fit for {key}; it has: "
                                f"{', '.join(sorted(states)) or 'none'}")
        agg.load_state_dict(states[key])
    else:
        agg.fit(fit_views.at(b), fit_views.labels)
    return agg


def _rows(tta: Any, test: Any, config: TTAConfig, states: Mapping[str, Any] | None, fit_views: Any
          ) -> tuple[list[dict[str, Any]], dict[tuple[str, int | None, int], Outcomes], dict[str, Any]]:
    from polyglean.tta import fit_key

    names = [a.name for a in tta.policy]
    target = test.labels
    _, plain = metrics_row(test.at(1)[:, 0], target, None)
    rows, outcomes, fits = [], {}, {}
    for name in config.tta:
        for vb in [1] if name == "none" else config.view_budgets:
            for b in config.phase_budgets:
                row: dict[str, Any] = {"tta": name, "policy": "identity" if name == "none" else config.policy,
                                       "view_budget": vb, "phase_budget": b}
                if name == "none":
                    used, logits, fit_seconds = [0], test.at(b)[:, 0], 0.0
                    fwd, seconds = test.cost(used, b)
                else:
                    tick = time.perf_counter()
                    agg = _aggregator(name, vb, b, states, fit_views)
                    fit_seconds = time.perf_counter() - tick
                    if agg.needs_fit:
                        fits[fit_key(name, vb, b)] = agg
                    out = tta.aggregate(test, [b], agg)
                    used, logits, fwd, seconds = out.views, out.logits[b], out.forward_equivalents[b], out.seconds[b]
                    if name == "gps":
                        row["picks"] = [names[i] for i in agg.selected]
                    if name == "augtta":
                        row["weights"] = [round(float(w), 4) for w in agg.weights]
                metrics, outcomes[(name, vb, b)] = metrics_row(logits, target, plain)
                row.update(views=[names[i] for i in used], b_image=len(used), b_total=len(used) * b, **metrics,
                           forward_equivalents=fwd, seconds=seconds, fit_seconds=fit_seconds)
                rows.append(row)
    return rows, outcomes, fits


@torch.no_grad()
def evaluate_tta(net: PhaseNet, preprocess: Preprocess, dataset: Dataset[Any], config: TTAConfig, *,
                 fit_dataset: Dataset[Any] | None = None, fitted_states: Mapping[str, Any] | None = None,
                 progress: Progress | None = None) -> TTAEvalResult:
    """Evaluates the TTA aggregators of ``config`` over phase search on ``dataset``.

    Args:
        net: the :class:`PhaseNet` of a classifier in eval mode, on ``config.device``.
        preprocess: its preprocessing (the policy's geometry and normalisation come from it).
        dataset: the labelled test images.
        config: what to run.
        fit_dataset: held-out labelled images to fit gps/augtta/classtta on.
        fitted_states: their fitted states instead (from :func:`polyglean.tta.load_fitted`).
        progress: called after every batch.

    Raises:
        ArgumentError: a fitted aggregator with neither or both of ``fit_dataset`` and ``fitted_states``, fit data
            or states without a fitted aggregator, a state missing for a budget.
        DataError: an empty data set, a label beyond the model's classes.
    """
    from polyglean.tta import AugmentedSearch, Pixels, build_policy

    progress = progress or _nothing
    fitted = config.fitted()
    if fitted and (fit_dataset is None) == (fitted_states is None):
        raise ArgumentError(f"--tta {','.join(fitted)} must be fitted: pass held-out labelled images "
                            "(--tta-fit-data) or fitted state (--tta-weights), one of them")
    if not fitted and (fit_dataset is not None or fitted_states is not None):
        raise ArgumentError(f"--tta {','.join(config.tta)} fits nothing: fit data and fitted states apply only to "
                            "gps, augtta and classtta")
    budgets = sorted({1, *config.phase_budgets})
    search = build_search(net, budget=budgets[-1], criterion=config.criterion,
                          aggregate=config.learned if config.learned is not None else config.aggregate,
                          align=config.align, search_space=list(config.search_space) if config.search_space else None,
                          aggregate_on=config.aggregate_on, seed=config.seed)
    policy = build_policy(config.policy, preprocess.input_size, Pixels(preprocess.mean, preprocess.std),
                          seed=config.tta_seed)
    tta = AugmentedSearch(search, policy)
    for vb in config.view_budgets:
        if vb is not None and vb > len(policy) and any(n not in ("none", "gps") for n in config.tta):
            raise ArgumentError(f"--tta-budget {vb} exceeds the {len(policy)} views of policy {config.policy!r}")
    num_classes = model_classes(net.model, net.input_size, config.device)
    fit_views = None
    if fitted and fit_dataset is not None:
        fit_views = _views(tta, fit_dataset, budgets, config, _cache(config, net, preprocess, search, fit_dataset),
                           num_classes, "fit", progress)
    test = _views(tta, dataset, budgets, config, _cache(config, net, preprocess, search, dataset), num_classes,
                  "eval", progress)
    rows, outcomes, fits = _rows(tta, test, config, fitted_states, fit_views)
    return TTAEvalResult(rows, outcomes, test.labels, fits, [a.name for a in policy],
                         [s.name for s in search.search_space], search.align,
                         None if fit_views is None else int(fit_views.logits.shape[2]))
