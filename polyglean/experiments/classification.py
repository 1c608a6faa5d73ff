"""The phase search evaluated on labelled images: one search to the largest budget per batch, every aggregation
variant (aggregator x alignment) at every budget, per-image outcomes and each row's change against budget 1.

Example:
    >>> config = ClassificationConfig(budgets=(1, 4), aggregates=("mean", "entropy"), aligns=(True, False))
    >>> result = evaluate_classification(PhaseNet(model, (3, 32, 32)), dataset, config)  # doctest: +SKIP
    >>> result.rows[0]["top1"], result.outcomes[("mean", True, 4)].correct.shape  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from polyglean.aggregate import AGGREGATORS, Aggregator
from polyglean.errors import ArgumentError, DataError
from polyglean.experiments.common import Outcomes, Progress, _nothing, build_search, metrics_row, model_classes
from polyglean.phase.net import PhaseNet
from polyglean.search import CRITERIA, PhaseSearch
from polyglean.data.loader import make_loader

__all__ = ["ClassificationConfig", "ClassificationResult", "calibrate_adaptive", "evaluate_classification",
           "store_settings"]

Variant = tuple[str, bool]
"""``(aggregate name, aligned)``."""


@dataclass(frozen=True)
class ClassificationConfig:
    """What :func:`evaluate_classification` runs.

    Args:
        budgets: the budgets to report (ascending, >= 1); the search always runs budget 1 too (it is free), the
            reference of every row.
        criterion: the search order (``entropy``, ``random``, ``delta``, ``learned``).
        aggregates: aggregator names, each reported for every alignment of ``aligns``; no duplicates.
        aligns: alignments to report, e.g. ``(True,)``, ``(False,)`` or ``(True, False)``; with
            ``aggregate_on="logits"`` only ``(False,)``.
        aggregate_on: ``"features"`` or ``"logits"``.
        search_space: sites to search, by name or index; None: the default.
        phase_stride: search every N-th phase where a site's factor exceeds N (1: all phases).
        learned: trained aggregators by the alignment they were trained with (for ``learned`` in ``aggregates``
            or ``criterion="learned"``). A ``learned`` row is reported for each alignment of ``aligns`` that has a
            module; with one alignment asked for, a missing module is an error (never another alignment instead).
        batch_size: images per search batch.
        workers: data-loading worker processes.
        seed: seed of the random criterion.
        device: where the model runs and the tensors live.
        stop: an adaptive budget (:mod:`polyglean.search.stop`): a rule or its text; images it stops leave the
            search early, and every row's cost is what was really run.
        precision: ``fp32``, or ``bf16`` / ``fp16`` under autocast (:class:`polyglean.runtime.Runtime`).
    """

    budgets: tuple[int, ...] = (1, 4, 10, 15)
    criterion: str = "entropy"
    aggregates: tuple[str, ...] = ("entropy",)
    aligns: tuple[bool, ...] = (True,)
    aggregate_on: str = "features"
    search_space: tuple[str | int, ...] | None = None
    phase_stride: int = 1
    learned: Mapping[bool, Aggregator] = field(default_factory=dict)
    batch_size: int = 32
    workers: int = 0
    seed: int = 0
    device: str | torch.device = "cpu"
    stop: Any = None
    precision: str = "fp32"

    def __post_init__(self) -> None:
        from polyglean.runtime import resolve_precision

        resolve_precision(self.precision, torch.device(self.device))
        if not self.budgets:
            raise ArgumentError("no budget given")
        for b in self.budgets:
            if not isinstance(b, int) or b < 1:
                raise ArgumentError(f"budget {b} out of range: budgets are integers >= 1")
        if list(self.budgets) != sorted(set(self.budgets)):
            raise ArgumentError(f"budgets must be ascending without repeats, got {list(self.budgets)}")
        if not self.aggregates:
            raise ArgumentError("no aggregate named; choose from: " + ", ".join(AGGREGATORS.names()))
        repeated = sorted({a for a in self.aggregates if self.aggregates.count(a) > 1})
        if repeated:
            raise ArgumentError(f"aggregate {repeated[0]!r} is named twice in {','.join(self.aggregates)}")
        for name in self.aggregates:
            AGGREGATORS.get(name)  # unknown names list the known ones
        CRITERIA.get(self.criterion)
        if self.aggregate_on not in ("features", "logits"):
            raise ArgumentError(f"aggregate_on must be 'features' or 'logits', got {self.aggregate_on!r}")
        if not self.aligns or len(set(self.aligns)) != len(self.aligns):
            raise ArgumentError(f"aligns must be distinct, e.g. (True,) or (True, False), got {self.aligns}")
        if self.aggregate_on == "logits" and any(self.aligns):
            raise ArgumentError("logits cannot be aligned: with aggregate_on='logits' use aligns=(False,)")
        if self.batch_size < 1:
            raise ArgumentError(f"batch size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise ArgumentError(f"workers must be >= 0, got {self.workers}")
        wants_module = "learned" in self.aggregates or self.criterion == "learned"
        if wants_module and not self.learned:
            raise ArgumentError("'learned' needs a trained aggregator (polyglean.load_aggregator); none was given")
        if not wants_module and self.learned:
            raise ArgumentError("trained aggregators were given but neither the aggregates nor the criterion is "
                                "'learned'; add learned to the aggregates or leave the aggregators out")
        if "learned" in self.aggregates and len(self.aligns) == 1 and self.aligns[0] not in self.learned:
            trained = "with" if True in self.learned else "without"
            raise ArgumentError(f"the learned aggregator was trained {trained} alignment, but the rows ask for "
                                f"{'aligned' if self.aligns[0] else 'unaligned'} features; give an aggregator "
                                f"trained {'with' if self.aligns[0] else 'without'} alignment, or ask for the "
                                "alignment it was trained with")

    def variants(self) -> list[Variant]:
        """The ``(aggregate, aligned)`` rows, in order."""
        return [(a, al) for a in self.aggregates for al in self.aligns if a != "learned" or al in self.learned]


@dataclass
class ClassificationResult:
    """What :func:`evaluate_classification` measured.

    Attributes:
        rows: one per variant and budget, then one ``learned@default`` control per trained module: top1, top5,
            nll, ece, n_images, seconds, forward_equivalents and, against budget 1 of the same search (the plain
            model), ``delta_top1`` (points) and ``delta_nll`` with 95% paired-bootstrap intervals, fixed, broken
            and ``mcnemar_p``.
        outcomes: per-image outcomes by ``(aggregate, aligned, budget)`` (and ``("learned@default", al, 1)``).
        labels: ``(N,)`` the labels, in data set order.
        search_space: names of the searched sites.
        sites: names of all sites.
        search_align: the alignment the search itself aggregated with (the criterion ``learned`` reads it).
    """

    rows: list[dict[str, Any]]
    outcomes: dict[tuple[str, bool, int], Outcomes]
    labels: Tensor
    search_space: list[str]
    sites: list[str]
    search_align: bool


@dataclass
class _Collected:
    logits: dict[tuple[str, bool, int], list[Tensor]]
    alone: dict[bool, list[Tensor]]
    labels: list[Tensor]
    seconds: dict[int, float]
    flops: dict[int, float]
    forward: float = 0.0
    used: dict[int, int] = field(default_factory=dict)


def _search(net: PhaseNet, config: ClassificationConfig, top: int
            ) -> tuple[PhaseSearch, dict[Variant, Any], Variant | None]:
    """The search to ``top``, the aggregator of every variant (a name, or the trained module), and the variant the
    search itself aggregates (its logits need no second aggregation)."""
    variants = config.variants()
    by_variant: dict[Variant, Any] = {(a, al): config.learned[al] if a == "learned" else a for a, al in variants}
    if config.criterion == "learned":  # the criterion reads the attention of a module, at its own alignment
        module = config.learned.get(config.aligns[0])
        if module is None:
            module = next(iter(config.learned.values()))
        aggregate, align = module, bool(module.meta["align"])  # type: ignore[attr-defined]
        own = ("learned", align) if ("learned", align) in by_variant else None
    else:
        aggregate, align = by_variant[variants[0]], variants[0][1]
        own = variants[0]
    search = build_search(net, budget=top, criterion=config.criterion, aggregate=aggregate, align=align,
                          search_space=list(config.search_space) if config.search_space else None,
                          aggregate_on=config.aggregate_on, seed=config.seed,
                          phase_stride=config.phase_stride, stop=config.stop)
    space = [s.name for s in search.search_space]
    for al, module in config.learned.items():  # the displacement code fits only the space it was trained on
        trained = list(getattr(module, "meta", {}).get("search_space", []))
        if trained[:1] != space[:1]:
            raise ArgumentError(f"the {'aligned' if al else 'unaligned'} learned aggregator was trained with the "
                                f"search space {trained}; its displacement code does not fit the search space "
                                f"{space} (search {' '.join(trained)})")
    return search, by_variant, own


def _key(variant: tuple[str, bool], budget: int) -> str:
    return f"{variant[0]}|{int(variant[1])}|{budget}"


def _batch(search: PhaseSearch, x: Tensor, y: Tensor, budgets: list[int], by_variant: dict[Variant, Any],
           own: Variant | None, config: ClassificationConfig, num_classes: int) -> dict[str, Any]:
    """Searches one batch and returns what the metrics need, on the CPU: every variant's logits at every budget
    (float32), the labels, the search's cost. A batch is computed the same way in one process or many."""
    from polyglean.runtime import Runtime

    net = search.net
    if len(y) and int(y.max()) >= num_classes:
        raise DataError(f"label {int(y.max())} out of range for a model with {num_classes} classes")
    runtime = Runtime(torch.device(config.device), config.precision)
    out: dict[str, Any] = {"logits": {}, "alone": {}, "labels": y.clone()}
    with runtime.autocast():
        result = search.run(x.to(runtime.device), budgets=budgets)
        for b in budgets:
            for variant, aggregator in by_variant.items():
                logits = result.logits[b] if variant == own else search.combine(result, b, aggregator, variant[1])
                out["logits"][_key(variant, b)] = logits.float().cpu()
        for al, module in config.learned.items():  # control: the trained module on the default state alone
            if result.features is not None:
                alone = net.head(module(result.features[:, :1], result.shift[:, :1]))  # type: ignore[operator]
                out["alone"][str(int(al))] = alone.float().cpu()
    out["seconds"] = [float(result.seconds_by_budget[b]) for b in budgets]
    out["flops"] = [float(result.flops_by_budget[b]) for b in budgets]
    out["used"] = [int(result.budget_used(b).sum()) for b in budgets]
    out["forward"] = float(result.forward_flops)
    return out


def _collect(search: PhaseSearch, dataset: Dataset[Any], budgets: list[int], by_variant: dict[Variant, Any],
             own: Variant | None, config: ClassificationConfig, num_classes: int, total: int, progress: Progress,
             dist: Any, store: Any) -> _Collected | None:
    """Searches every batch once (across the ranks of ``dist``) and keeps every variant's logits at every budget;
    ``None`` on ranks other than 0."""
    from polyglean.distributed import DistContext, global_batches, run_sharded

    def compute(batches: list[list[int]]) -> Any:
        loader = make_loader(dataset, batch_size=config.batch_size, workers=config.workers, batch_sampler=batches)
        for x, y in loader:
            yield _batch(search, x, y, budgets, by_variant, own, config, num_classes)

    payloads = run_sharded(global_batches(total, config.batch_size), compute, ctx=dist or DistContext(),
                           store=store, on_progress=lambda done, n: progress("search", done, n))
    if payloads is None:
        return None
    out = _Collected({(a, al, b): [] for a, al in by_variant for b in budgets}, {}, [],
                     dict.fromkeys(budgets, 0.0), dict.fromkeys(budgets, 0.0))
    for p in payloads:
        for variant in by_variant:
            for b in budgets:
                out.logits[(*variant, b)].append(p["logits"][_key(variant, b)])
        for al, logits in p["alone"].items():
            out.alone.setdefault(bool(int(al)), []).append(logits)
        for b, sec, fl, used in zip(budgets, p["seconds"], p["flops"], p["used"]):
            out.seconds[b] += sec
            out.flops[b] += fl
            out.used[b] = out.used.get(b, 0) + used
        out.forward += p["forward"]
        out.labels.append(p["labels"])
    return out


def _rows(collected: _Collected, budgets: list[int], wanted: tuple[int, ...], variants: list[Variant]
          ) -> tuple[list[dict[str, Any]], dict[tuple[str, bool, int], Outcomes], Tensor]:
    """Metrics per variant and budget against budget 1 (the plain model), and the learned@default controls."""
    target = torch.cat(collected.labels)
    if len(target) == 0:
        raise DataError("no images were evaluated")
    _, plain = metrics_row(torch.cat(collected.logits[(*variants[0], 1)]), target, None)
    rows, outcomes = [], {}
    for a, al in variants:
        for b in wanted:
            row, outcomes[(a, al, b)] = metrics_row(torch.cat(collected.logits[(a, al, b)]), target, plain)
            rows.append({"aggregate": a, "align": al, "budget": b, **row, "seconds": collected.seconds[b],
                         "forward_equivalents": collected.flops[b] / collected.forward,
                         "mean_candidates": collected.used[b] / len(target)})
    for al, parts in collected.alone.items():
        # Not a search result: the learned module applied to the plain model's features, with no other candidate.
        # What it gains here is adaptation of the features to the training data, not gleaned phases.
        row, outcomes[("learned@default", al, 1)] = metrics_row(torch.cat(parts), target, plain)
        rows.append({"aggregate": "learned@default", "align": al, "budget": 1, **row,
                     "seconds": collected.seconds[1], "forward_equivalents": 1.0})
    return rows, outcomes, target


def store_settings(net: PhaseNet, dataset: Dataset[Any], config: ClassificationConfig) -> dict[str, Any]:
    """Everything that changes a batch's results, by content, to key saved batches on
    (:class:`polyglean.distributed.BatchStore`): the weights' and the trained aggregators' SHA-256, the images
    (names, sizes, times, labels, in order) and every setting of ``config`` but the data-loading workers."""
    from polyglean.aggregate import model_fingerprint
    from polyglean.experiments.common import data_fingerprint

    return {
        "weights": model_fingerprint(net.model), "images": data_fingerprint(dataset),
        "budgets": list(config.budgets), "criterion": config.criterion, "aggregates": list(config.aggregates),
        "aligns": list(config.aligns), "aggregate_on": config.aggregate_on,
        "search_space": None if config.search_space is None else [str(v) for v in config.search_space],
        "learned": {str(al): model_fingerprint(m) for al, m in config.learned.items()},  # type: ignore[arg-type]
        "batch_size": config.batch_size, "seed": config.seed, "device": torch.device(config.device).type,
        "precision": config.precision, "phase_stride": config.phase_stride, "stop": _stop_key(config.stop),
    }


def _stop_key(stop: Any) -> Any:
    """A stop rule as plain data (its kind and public settings), for keys."""
    if stop is None or isinstance(stop, str):
        return stop
    if hasattr(stop, "rules"):
        return [_stop_key(r) for r in stop.rules]
    return {"kind": type(stop).__name__, **{k: v for k, v in vars(stop).items() if not k.startswith("_")}}


@torch.no_grad()
def evaluate_classification(net: PhaseNet, dataset: Dataset[Any], config: ClassificationConfig,
                            progress: Progress | None = None, *, dist: Any = None, store: Any = None
                            ) -> ClassificationResult | None:
    """Runs the phase search on every image of ``dataset`` and measures every variant at every budget.

    With ``dist`` (a :class:`polyglean.distributed.DistContext` of several processes, e.g. under ``torchrun``)
    every rank calls this with the same arguments; the batches of ``config.batch_size`` images are dealt to the
    ranks and the per-image results gathered on rank 0, which returns the result (the others return ``None``).
    The batches are those of a single-process run, so the metrics are identical to it.

    Args:
        net: the :class:`PhaseNet` of a classifier in eval mode, on ``config.device``.
        dataset: ``(image tensor, label)`` pairs (e.g. a selection of a :class:`polyglean.data.ImageDataset`).
        config: budgets, criterion, aggregation variants and run settings.
        progress: called after every batch (on rank 0: with the images done by all ranks).
        dist: this process among several (:func:`polyglean.distributed.init_distributed`); None: one process.
        store: a :class:`polyglean.distributed.BatchStore`: finished batches are saved there, and batches saved
            by an interrupted run are taken from it instead of computed again.

    Raises:
        ArgumentError: a budget beyond the search space's states, a trained aggregator for another search space.
        DataError: an empty data set, a label beyond the model's classes.
    """
    progress = progress or _nothing
    total = len(dataset)  # type: ignore[arg-type]
    if total == 0:
        raise DataError("the data set is empty: no images to evaluate")
    budgets = sorted({1, *config.budgets})
    search, by_variant, own = _search(net, config, budgets[-1])
    num_classes = model_classes(net.model, net.input_size, config.device)
    collected = _collect(search, dataset, budgets, by_variant, own, config, num_classes, total, progress, dist, store)
    if collected is None:
        return None
    rows, outcomes, target = _rows(collected, budgets, config.budgets, config.variants())
    return ClassificationResult(rows, outcomes, target, [s.name for s in search.search_space],
                                [s.name for s in net.sites], search.align)


@torch.no_grad()
def calibrate_adaptive(net: PhaseNet, dataset: Dataset[Any], config: ClassificationConfig, rule: str,
                       target_cost: float, progress: Progress | None = None) -> tuple[Any, dict[str, Any]]:
    """Calibrates the ``confidence`` or ``entropy`` stop rule on held-out images so that the search to
    ``max(config.budgets)`` costs ``target_cost`` forward equivalents per image on average.

    Returns:
        The stop rule, and what the calibration measured (threshold, target, achieved mean cost, images).
    """
    from polyglean.search import calibrate_stop

    progress = progress or _nothing
    total = len(dataset)  # type: ignore[arg-type]
    if total == 0:
        raise DataError("the fit data set is empty: nothing to calibrate on")
    plain = ClassificationConfig(**{**{f: getattr(config, f) for f in config.__dataclass_fields__}, "stop": None})
    search, _, _ = _search(net, plain, max(config.budgets))
    loader = make_loader(dataset, batch_size=config.batch_size, workers=config.workers)

    def batches() -> Iterable[Tensor]:
        done = 0
        for x, _ in loader:
            yield x.to(config.device)
            done += x.shape[0]
            progress("calibrate", done, total)
    from polyglean.runtime import Runtime

    with Runtime(torch.device(config.device), config.precision).autocast():
        return calibrate_stop(search, batches(), target_cost, rule)
