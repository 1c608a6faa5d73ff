"""``export``: choose K phase states on held-out images, build the :class:`PhaseEnsemble`, check it, write it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from polyglean.errors import ArgumentError
from polyglean.export.ensemble import PhaseEnsemble
from polyglean.export.formats import export_module, format_from_path
from polyglean.export.select import METRICS, collect_features, search_pool, select_states, space_states
from polyglean.io import check_writable, write_json
from polyglean.phase.net import PhaseNet
from polyglean.data.loader import make_loader

__all__ = ["ExportConfig", "export_ensemble"]

log = logging.getLogger(__name__)


@dataclass
class ExportConfig:
    """What ``polyglean export`` does (see :func:`export_ensemble`).

    Attributes:
        model: A preset, ``torchvision:NAME`` or ``timm:NAME``.
        fit_data: Labelled images to choose the states on (never the images you report on).
        out: The file to write.
        states: K, the number of states (the default state included).
        weights: A checkpoint for the model.
        fmt: ``torchscript``, ``onnx`` or ``pt2`` (default: from the file's suffix).
        subset: ``START:STOP`` of the fit data's fixed shuffled order.
        limit: Use only the first N fit images.
        metric: ``nll`` or ``accuracy``: what each greedy step optimises.
        aggregate: ``mean`` or ``entropy``.
        align: Align the final feature maps before aggregating them.
        search_space: Sites whose phases are candidates (default: as the search's).
        pool_size: Candidates when the search space has more states than this: the states the search keeps most.
        batch_size: Images per batch.
        json_out: Also write the selection and the checks as JSON here.
        pretrained: Download the library's weights (torchvision/timm), as :func:`polyglean.load_model`.
        random_weights: A seed: random weights on purpose, as :func:`polyglean.load_model`.
        device: Where the states are run while choosing them (default: cuda when available); the ensemble is
            exported from the CPU.
    """

    model: str
    fit_data: str
    out: str
    states: int
    weights: str | None = None
    fmt: str | None = None
    subset: str | None = None
    limit: int | None = None
    metric: str = "nll"
    aggregate: str = "mean"
    align: bool = True
    search_space: Sequence[str | int] | None = None
    pool_size: int = 16
    batch_size: int = 64
    json_out: str | None = None
    device: str | None = None
    pretrained: bool = False
    random_weights: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _validate(cfg: ExportConfig) -> str:
    fmt = format_from_path(cfg.out, cfg.fmt)
    if isinstance(cfg.states, bool) or not isinstance(cfg.states, int) or cfg.states < 1:
        raise ArgumentError(f"--states must be a positive integer, got {cfg.states!r}")
    if cfg.metric not in METRICS:
        raise ArgumentError(f"--metric must be one of {', '.join(METRICS)}, got {cfg.metric!r}")
    if cfg.aggregate not in ("mean", "entropy"):
        raise ArgumentError(f"--aggregate must be mean or entropy for an exported ensemble, got {cfg.aggregate!r}")
    if cfg.pool_size < 1 or cfg.batch_size < 1 or (cfg.limit is not None and cfg.limit < 1):
        raise ArgumentError("--pool-size, --batch-size and --limit must be positive")
    check_writable(cfg.out, "--out")
    if cfg.json_out:
        check_writable(cfg.json_out, "--json")
    return fmt


def export_ensemble(cfg: ExportConfig, progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Chooses ``cfg.states`` states on the fit data, builds the ensemble and writes it in the chosen format.

    Args:
        cfg: What to do.
        progress: Called as ``progress(stage, done, total)`` while images are processed.

    Returns:
        A summary: the states (flat and by site), the fit-data NLL and top-1 after each added state, the export
        check (largest difference to the eager module per batch size) and the files written.
    """
    from polyglean.data import ImageDataset, limit_dataset, parse_subset, subset_dataset
    from polyglean.models import load_model, num_classes
    from polyglean.provenance import machine
    from polyglean.search import PhaseSearch

    from polyglean.runtime import Runtime

    fmt = _validate(cfg)
    device = Runtime.resolve(cfg.device).device
    model, preprocess = load_model(cfg.model, cfg.weights, pretrained=cfg.pretrained,
                                   random_weights=cfg.random_weights)
    net = PhaseNet(model.to(device), input_size=preprocess.input_size)
    space = PhaseSearch(net, budget=1, search_space=cfg.search_space).search_space
    all_states = space_states(net, [s.name for s in space])
    if cfg.states > len(all_states):
        raise ArgumentError(f"--states {cfg.states} out of range: the search space "
                            f"{[s.name for s in space]} has {len(all_states)} states")
    dataset = ImageDataset(cfg.fit_data, preprocess, num_classes=num_classes(model, preprocess.input_size))
    if cfg.subset:
        dataset = subset_dataset(dataset, *parse_subset(cfg.subset))
    dataset = limit_dataset(dataset, cfg.limit, spread=True)
    n = len(dataset)
    loader = make_loader(dataset, batch_size=cfg.batch_size)

    def tick(stage: str) -> Callable[[int], None]:
        done = [0]

        def step(k: int) -> None:
            done[0] += k
            if progress is not None:
                progress(stage, done[0], n)
        return step

    if len(all_states) <= cfg.pool_size:
        pool = all_states
    else:
        step = tick("pool")

        def images() -> Any:
            for x, _ in loader:
                yield x.to(device)
                step(x.shape[0])
        pool = search_pool(net, images(), [s.name for s in space], cfg.pool_size)
    if cfg.states > len(pool):
        raise ArgumentError(f"--states {cfg.states} is more than the {len(pool)} candidate states (--pool-size)")
    batches = ((x.to(device), y.to(device)) for x, y in loader)
    feats, logits, labels = collect_features(net, batches, pool, align=cfg.align, progress=tick("features"))
    selection = select_states(net, feats, logits, labels, pool, cfg.states, metric=cfg.metric,
                              aggregate=cfg.aggregate)
    del feats
    net = net.cpu()  # exported from the CPU
    ensemble = PhaseEnsemble(net, selection.states, aggregate=cfg.aggregate, align=cfg.align).eval()
    example = next(iter(make_loader(dataset, batch_size=min(4, n))))[0]
    checks = export_module(ensemble, example, cfg.out, fmt)
    by_site = [{s.name: list(divmod(p, s.factor[1])) for s, p in zip(net.sites, st) if p}
               for st in selection.states]
    summary = {"model": cfg.model, "weights": cfg.weights, "format": fmt, "out": str(Path(cfg.out)),
               "input_size": list(preprocess.input_size), "states": [list(s) for s in selection.states],
               "states_by_site": by_site, "fit": {"data": cfg.fit_data, "subset": cfg.subset, "images": n,
                                                  "metric": cfg.metric, "nll": selection.nll,
                                                  "top1": selection.top1},
               "pool": len(pool), "aggregate": cfg.aggregate, "align": cfg.align,
               "segment_runs": ensemble.segment_runs, "device": str(device), "export_check_max_abs_diff": checks,
               "config": {k: v for k, v in asdict(cfg).items() if k != "extra"}, "machine": machine()}
    if cfg.json_out:
        write_json(cfg.json_out, summary)
    return summary
