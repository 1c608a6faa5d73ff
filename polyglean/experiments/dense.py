"""The dense evaluation: a segmentation model on paired images / label maps, plain, with the phase search at several
budgets and aggregation variants, and with image-space TTA alone and combined with the search.

Every variant is scored with one confusion matrix over the whole set (:mod:`polyglean.metrics_dense`); its
difference to the plain model comes with a paired bootstrap interval over images that recomputes the set's mIoU.
All budgets and aggregation variants come from one search per batch; cost is reported in forward equivalents
(FLOPs for the search, pixels processed for image-space views).

Example:
    >>> report = evaluate_segmentation(model, dataset, DenseEvalConfig(budgets=(1, 4, 10)), num_classes=11,
    ...                                ignore_index=11)  # doctest: +SKIP
    >>> [(r["budget"], r["aggregate"], round(r["miou"], 2)) for r in report["results"]]  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from polyglean.errors import ArgumentError
from polyglean.metrics_dense import DenseMeter, miou_difference
from polyglean.phase.net import PhaseNet
from polyglean.search.dense import DENSE_AGGREGATORS, DENSE_CRITERIA, DenseSearch
from polyglean.tta.dense import MULTI_SCALES, tta_cost, tta_maps
from polyglean.data.loader import make_loader

__all__ = ["TTA_POLICIES", "DenseEvalConfig", "evaluate_segmentation"]

TTA_POLICIES: dict[str, tuple[tuple[float, ...], bool]] = {
    "flip": ((1.0,), True),
    "ms": (MULTI_SCALES, False),
    "flip+ms": (MULTI_SCALES, True),
}
"""Image-space policies: ``name -> (scales, flip)``."""


@dataclass(frozen=True)
class DenseEvalConfig:
    """What to evaluate.

    Args:
        budgets: Phase budgets (1 = the plain model).
        aggregates: Per-pixel aggregators (``mean``, ``entropy``, ``learned``).
        aligns: Alignment settings to report (``True``, ``False`` or both).
        criterion: Search order (``entropy``, ``random``, ``delta``).
        search_space: Sites to search (default: the main path but the first).
        tta: Image-space policies (:data:`TTA_POLICIES`).
        tta_budget: Phase budget combined with each TTA policy (``1``: TTA alone only).
        tta_aggregate: Aggregator of the search inside a TTA view.
        batch_size: Images per batch.
        workers: Data-loading worker processes.
        bands: Boundary widths ``k`` (pixels) for boundary / interior mIoU.
        keep_maps: Keep the plain and the best-budget predictions of the first images (for plots).
        keep_confusions: Return every row's per-image confusion matrices and its boundary / interior ones
            (``report["confusions"]``).
        seed: Seed of the random criterion and of the bootstrap.
        learned: The trained map aggregator for ``learned``
            (:class:`~polyglean.aggregate.dense.MapAttentionAggregator`); its rows use the alignment it was trained
            with (``learned_align``), and a ``learned@default`` control row applies it to the default candidate alone.
        learned_align: Whether ``learned`` was trained on aligned candidates.
    """

    budgets: tuple[int, ...] = (1, 4, 10)
    aggregates: tuple[str, ...] = ("mean", "entropy")
    aligns: tuple[bool, ...] = (True, False)
    criterion: str = "entropy"
    search_space: tuple[str | int, ...] | None = None
    tta: tuple[str, ...] = ()
    tta_budget: int = 1
    tta_aggregate: str = "entropy"
    batch_size: int = 2
    workers: int = 0
    bands: tuple[int, ...] = (3,)
    keep_maps: int = 0
    keep_confusions: bool = False
    seed: int = 0
    learned: Any = None
    learned_align: bool = True

    def check(self) -> None:
        """Raises :class:`ArgumentError` for a bad value or combination, before any work."""
        if not self.budgets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.budgets):
            raise ArgumentError(f"budgets must be integers >= 1, got {list(self.budgets)}")
        for name in self.aggregates:
            if name == "learned":
                if self.learned is None:
                    raise ArgumentError("aggregate 'learned' needs a trained map aggregator (learned=...; CLI: "
                                        "--aggregator PATH)")
                if self.learned_align not in self.aligns:
                    raise ArgumentError(f"the learned aggregator was trained "
                                        f"{'with' if self.learned_align else 'without'} alignment, but the rows ask "
                                        f"for {'aligned' if self.aligns[0] else 'unaligned'} candidates only")
            elif name not in DENSE_AGGREGATORS.names():
                raise ArgumentError(f"unknown dense aggregator {name!r}; choose from "
                                    f"{[*DENSE_AGGREGATORS.names(), 'learned']}")
        if self.learned is not None and "learned" not in self.aggregates:
            raise ArgumentError("a learned aggregator is given but 'learned' is not among the aggregates")
        if self.criterion not in DENSE_CRITERIA.names():
            raise ArgumentError(f"unknown dense criterion {self.criterion!r}; choose from {DENSE_CRITERIA.names()}")
        for name in self.tta:
            if name not in TTA_POLICIES:
                raise ArgumentError(f"unknown TTA policy {name!r}; choose from {sorted(TTA_POLICIES)}")
        if self.tta_budget < 1:
            raise ArgumentError(f"tta_budget must be >= 1, got {self.tta_budget}")
        if self.workers < 0:
            raise ArgumentError(f"workers must be >= 0, got {self.workers}")
        if self.batch_size < 1:
            raise ArgumentError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.aligns:
            raise ArgumentError("aligns is empty: give True, False or both")


@dataclass
class _Row:
    meta: dict[str, Any]
    meter: DenseMeter
    flops: float = 0.0
    seconds: float = 0.0
    maps: list[Tensor] = field(default_factory=list)


def evaluate_segmentation(model: nn.Module, dataset: Dataset, config: DenseEvalConfig, *, num_classes: int,
                          ignore_index: int | None, input_size: Sequence[int] | None = None,
                          progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Evaluates ``model`` on ``dataset`` (``(image tensor, label map)`` pairs) in every configured variant.

    Args:
        model: A segmentation model in eval mode returning ``(N, K', H, W)`` logits (``K' >= num_classes``) or a
            dict with them under ``"out"``.
        dataset: E.g. a :class:`~polyglean.data.segmentation.SegmentationDataset`.
        config: The variants.
        num_classes: Classes scored.
        ignore_index: Label value of unlabelled pixels.
        input_size: ``(C, H, W)`` to discover the sites at (default: the first image's).
        progress: Called with ``(images done, images total)``.

    Returns:
        ``{"results": [row, ...], "num_images": N}``; a row holds ``budget``, ``aggregate``, ``align``, ``tta``,
        ``miou``, ``pixel_acc``, ``mean_class_acc``, ``per_class_iou``, ``boundary_miou_k*``, ``interior_miou_k*``,
        ``pixels_fixed``, ``pixels_broken``, ``forward_equivalents``, ``seconds`` and ``miou_delta`` (the difference
        to the plain model with its 95% bootstrap interval). With ``keep_maps``, ``"maps"`` holds the plain and the
        largest-budget predictions of the first images.
    """
    config.check()
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ArgumentError("the dataset is empty")
    x0, _ = dataset[0]
    size = tuple(input_size) if input_size is not None else tuple(x0.shape)
    net = PhaseNet(model, size)
    budgets = sorted(set(config.budgets))
    top = budgets[-1]
    first = next(a for a in config.aggregates if a != "learned") if set(config.aggregates) != {"learned"} else "mean"
    search = DenseSearch(net, budget=top, criterion=config.criterion, aggregate=first,
                         search_space=config.search_space, seed=config.seed)
    tta_search = (DenseSearch(net, budget=config.tta_budget, criterion=config.criterion,
                              aggregate=config.tta_aggregate, search_space=config.search_space, seed=config.seed)
                  if config.tta_budget > 1 else None)
    multiple = max(net.max_reduction)  # every path's reduction must divide a view (ESPNet's skips need 8)

    def meter() -> DenseMeter:
        return DenseMeter(num_classes, ignore_index, tuple(config.bands))

    plain = _Row({"budget": 1, "aggregate": "none", "align": False, "tta": "none"}, meter())
    rows: dict[tuple, _Row] = {("plain",): plain}
    for b in budgets:
        if b == 1:
            continue
        for a in config.aggregates:
            for al in config.aligns:
                if a == "learned" and al != config.learned_align:
                    continue
                rows[("phase", b, a, al)] = _Row({"budget": b, "aggregate": a, "align": al, "tta": "none"}, meter())
    if config.learned is not None:
        # A control, not a search result: the module on the default candidate alone (what it gains here is
        # re-calibration of the plain model's logits on the training data, not gleaned phases).
        rows[("learned@default",)] = _Row({"budget": 1, "aggregate": "learned@default",
                                           "align": config.learned_align, "tta": "none"}, meter())
    for name in config.tta:
        rows[("tta", name, 1)] = _Row({"budget": 1, "aggregate": "mean-prob", "align": False, "tta": name}, meter())
        if tta_search is not None:
            rows[("tta", name, config.tta_budget)] = _Row(
                {"budget": config.tta_budget, "aggregate": f"{config.tta_aggregate}+mean-prob", "align": True,
                 "tta": name}, meter())

    loader = make_loader(dataset, batch_size=config.batch_size, workers=config.workers)
    done, total_images = 0, len(dataset)  # type: ignore[arg-type]
    forward_flops = 0.0
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    with torch.no_grad():
        for x, y in loader:
            x = x.to(device)
            tick = time.perf_counter()
            result = search.run(x, budgets=budgets)
            forward_flops += result.forward_flops
            base = result.logits[1]
            ref = _predict(base, num_classes)
            plain.meter.update(ref, y)
            plain.flops += result.forward_flops
            plain.seconds += result.seconds_by_budget.get(1, time.perf_counter() - tick)
            if len(plain.maps) < config.keep_maps:
                plain.maps.extend(ref[: config.keep_maps - len(plain.maps)])
            for key, row in rows.items():
                if key[0] != "phase":
                    continue
                _, b, a, al = key
                t0 = time.perf_counter()
                agg = config.learned if a == "learned" else a
                pred = _predict(search.combine(result, b, aggregate=agg, align=al), num_classes)
                row.meter.update(pred, y, ref)
                row.flops += result.flops_by_budget[b]
                if a == "learned":  # the attention at every pixel costs a sizeable part of a forward: counted
                    row.flops += config.learned.flops(x.shape[0], b, x.shape[-2] * x.shape[-1])
                row.seconds += result.seconds_by_budget[b] + time.perf_counter() - t0
                if b == top and len(row.maps) < config.keep_maps:
                    row.maps.extend(pred[: config.keep_maps - len(row.maps)])
            if config.learned is not None:
                t0 = time.perf_counter()
                alone = result.candidate_logits[:, :1]
                cover = torch.ones(alone.shape[0], 1, *alone.shape[-2:], dtype=torch.bool, device=alone.device)
                row = rows[("learned@default",)]
                row.meter.update(_predict(config.learned.combine(alone, cover, shift=result.shift[:, :1]),
                                          num_classes), y, ref)
                row.flops += result.forward_flops + config.learned.flops(x.shape[0], 1, x.shape[-2] * x.shape[-1])
                row.seconds += result.seconds_by_budget.get(1, 0.0) + time.perf_counter() - t0
            for name in config.tta:
                scales, flip = TTA_POLICIES[name]
                cost = tta_cost(scales, flip, tuple(x.shape[-2:]), multiple)
                t0 = time.perf_counter()
                probs = tta_maps(lambda v: _logits(model(v)), x, scales=scales, flip=flip, multiple=multiple)
                row = rows[("tta", name, 1)]
                row.meter.update(_predict(probs, num_classes), y, ref)
                row.flops += cost * result.forward_flops
                row.seconds += time.perf_counter() - t0
                if tta_search is not None:
                    spent = [0.0]

                    def searched(v: Tensor) -> Tensor:
                        r = tta_search.run(v)
                        spent[0] += r.flops_by_budget[config.tta_budget] / r.forward_flops
                        return r.logits[config.tta_budget]

                    t0 = time.perf_counter()
                    probs = tta_maps(searched, x, scales=scales, flip=flip, multiple=multiple)
                    row = rows[("tta", name, config.tta_budget)]
                    row.meter.update(_predict(probs, num_classes), y, ref)
                    # each view's search costs its forward equivalents at that view's size
                    row.flops += cost * result.forward_flops * spent[0] / len(_views(scales, flip))
                    row.seconds += time.perf_counter() - t0
            done += x.shape[0]
            if progress is not None:
                progress(done, total_images)

    out_rows = []
    base_conf = torch.stack(plain.meter.per_image)
    for key, row in rows.items():
        scores = row.meter.scores()
        entry: dict[str, Any] = {**row.meta, **scores,
                                 "forward_equivalents": row.flops / forward_flops if forward_flops else float("nan"),
                                 "seconds": row.seconds, "seconds_per_image": row.seconds / done}
        if key != ("plain",):
            diff = miou_difference(base_conf, torch.stack(row.meter.per_image), seed=config.seed)
            entry["miou_delta"] = diff.as_dict()
        out_rows.append(entry)
    report: dict[str, Any] = {"results": out_rows, "num_images": done, "sites": [s.name for s in net.sites],
                              "search_space": [s.name for s in search.search_space],
                              "criterion": config.criterion}
    if config.keep_confusions:
        report["confusions"] = [{"per_image": torch.stack(row.meter.per_image), "band": row.meter.per_band,
                                 "interior": row.meter.per_interior} for row in rows.values()]
    if config.keep_maps:
        best = max((k for k in rows if k[0] == "phase" and k[1] == top), default=None,
                   key=lambda k: rows[k].meter.scores()["miou"])
        report["maps"] = {"plain": plain.maps, "searched": rows[best].maps if best else [],
                          "searched_row": rows[best].meta if best else None}
    return report


def _views(scales: Sequence[float], flip: bool) -> list[tuple[float, bool]]:
    from polyglean.tta.dense import tta_views

    return tta_views(scales, flip)


def _logits(out: Any) -> Tensor:
    return out["out"] if isinstance(out, dict) else out


def _predict(maps: Tensor, num_classes: int) -> Tensor:
    """Class per pixel; a channel beyond the scored classes (void) can win and then counts as a miss."""
    return maps.argmax(1).cpu()
