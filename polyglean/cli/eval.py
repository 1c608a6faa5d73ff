"""``polyglean eval``: the phase search on a labelled image folder at several budgets in one pass; with ``--tta``,
image-space TTA over it; with ``--downsample``/``--shift-consistency``, swapped models and shift consistency.

This module parses and checks the options, then calls :mod:`polyglean.experiments` and prints, writes and plots
what it returns.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from polyglean.cli._common import (
    Bars,
    add_model_arguments,
    add_runtime_arguments,
    check_outputs,
    delta_cells,
    int_list,
    load_model,
    phase_net,
    names,
    refuse_repeats,
    runtime,
    table,
    write_results,
)
from polyglean.cli import _stitch
from polyglean.errors import ArgumentError

PARTS = ("all", "even", "odd")
TTA_FLAGS = ("tta_policy", "tta_budget", "tta_fit_data", "tta_fit_limit", "tta_fit_part", "tta_fit_subset",
             "tta_data_part",
             "tta_weights", "tta_save", "tta_cache", "tta_seed")
"""Flags that mean something only with ``--tta``: refused without it."""
DEFAULT_BUDGETS = [1, 4, 10, 15]
"""``--budgets``' default, this object when the flag is not given (``--stitch`` refuses a given one)."""


def _subset(text: str) -> tuple[int, int]:
    from polyglean.data import parse_subset

    try:
        return parse_subset(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_parser(sub: Any, name: str) -> None:
    from polyglean.aggregate import AGGREGATORS
    from polyglean.search import CRITERIA

    p = sub.add_parser(
        name,
        help="evaluate the phase search on labelled images",
        description="Run the greedy phase search on every image of a labelled folder and report, per budget, "
        "top-1/top-5 accuracy, NLL, ECE, the change of top-1 against the plain model (budget 1) with a paired 95% "
        "bootstrap interval and McNemar's p (images fixed/broken), wall time and forward-pass equivalents (FLOPs). "
        "All budgets come from one search to the largest.",
    )
    add_model_arguments(p)
    p.add_argument("--data", required=True, help="class folders, or images/ + labels.csv (file,class_index)")
    p.add_argument("--budgets", type=int_list("--budgets"), default=DEFAULT_BUDGETS,
                   help="comma-separated (default 1,4,10,15)")
    p.add_argument("--criterion", default="entropy", choices=CRITERIA.names())
    p.add_argument("--aggregate", default="entropy",
                   help=f"one or more, comma-separated, each once, from: {', '.join(AGGREGATORS.names())} (default "
                        "entropy); all come from the same search")
    p.add_argument("--aggregator", metavar="PATH", nargs="+",
                   help="trained aggregator(s) for --aggregate learned / --criterion learned: one trained on aligned "
                        "features, one on unaligned ones, or both (with --align-both); default: the one shipped for "
                        "the preset, if any")
    p.add_argument("--aggregate-on", default="features", choices=["features", "logits"])
    p.add_argument("--no-align", action="store_true",
                   help="aggregate feature maps without aligning them, in every row; a learned row needs an "
                        "aggregator trained without alignment (refused otherwise, never replaced by the other)")
    p.add_argument("--align-both", action="store_true",
                   help="report every aggregate with and without alignment (learned: for each alignment a trained "
                        "aggregator is given for)")
    p.add_argument("--search-space", nargs="+", metavar="SITE",
                   help="sites to search, by name or index (default: all but the first and last)")
    p.add_argument("--phase-stride", type=int, default=1, metavar="N",
                   help="search every N-th phase where a site's factor exceeds N (e.g. 4: 16 of a 16x16 ViT patch "
                        "embedding's 256 phases; default 1, all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, help="evaluate only N images (evenly spread over the selection), last")
    p.add_argument("--subset", type=_subset,
                   help="START:STOP of a fixed shuffled order of the images (e.g. 650: for the half of "
                        "imagenet-val1300 an aggregator was not trained on); after --tta-data-part, before --limit")
    p.add_argument("--seed", type=int, default=0, help="seed of the random criterion and the shift offsets")
    p.add_argument("--workers", type=int, default=1, help="data-loading worker processes")
    p.add_argument("--json", dest="json_out", help="write the results here (atomically)")
    p.add_argument("--plot", help="write a figure of accuracy against budget and against cost (PNG)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_runtime_arguments(p)
    g = p.add_argument_group(
        "several processes and resuming",
        "Under torchrun (torchrun --nproc-per-node N -m polyglean eval ...) the batches are dealt to the processes "
        "and the results gathered into one JSON, identical to a one-process run with the same --batch-size.")
    g.add_argument("--parts", metavar="DIR",
                   help="save every finished batch here (default with --json: JSON.parts beside it), so that a "
                        "killed run can be resumed; removed when the results are written")
    g.add_argument("--resume", action="store_true",
                   help="continue a killed run: take the batches it saved (same settings, any number of processes)")
    g.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="under torchrun: how long a process waits for the others at a step before giving up "
                        "(longer than one batch takes; default 1800)")
    _add_tta_arguments(p)
    _add_shift_arguments(p)
    _add_dense_arguments(p)
    _add_adaptive_arguments(p)
    _stitch.add_arguments(p)


def _add_adaptive_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "adaptive budget", "stop each image's search when it no longer pays; stopped images leave the batch, so "
        "every row's forward equivalents are what was really run")
    g.add_argument("--adaptive", metavar="RULE",
                   help="confidence:T (stop at B=1 when the plain max softmax >= T), entropy:T (normalised entropy "
                        "<= T), stable:K (the aggregate unchanged for K expansions), joined with +; with "
                        "--target-cost give only confidence or entropy, the threshold is calibrated")
    g.add_argument("--target-cost", type=float, metavar="C",
                   help="calibrate the threshold on --fit-data so the mean cost is C forward equivalents at the "
                        "largest budget")
    g.add_argument("--fit-data", help="held-out labelled images for --target-cost (never the evaluated images)")
    g.add_argument("--fit-subset", type=_subset, help="START:STOP of --fit-data's fixed shuffled order")


def _check_adaptive(args: argparse.Namespace) -> None:
    from polyglean.search import parse_stop

    if args.adaptive is None:
        given = [f for f, v in (("--target-cost", args.target_cost), ("--fit-data", args.fit_data),
                                ("--fit-subset", args.fit_subset)) if v is not None]
        if given:
            raise ArgumentError(f"{', '.join(given)} apply only with --adaptive; add it or drop them")
        return
    if wants_tta(args):
        raise ArgumentError("--adaptive is not supported together with --tta yet; run it without --tta")
    if args.target_cost is None:
        if args.fit_data or args.fit_subset:
            raise ArgumentError("--fit-data/--fit-subset are for calibrating --target-cost; add it or drop them")
        parse_stop(args.adaptive)  # refuses a malformed rule now, before any work
        return
    if args.adaptive not in ("confidence", "entropy"):
        raise ArgumentError(f"--target-cost calibrates the threshold of --adaptive confidence or entropy (given "
                            f"without a value), got --adaptive {args.adaptive}")
    if not args.fit_data:
        raise ArgumentError("--target-cost needs held-out labelled images to calibrate on: --fit-data DIR")
    if not Path(args.fit_data).is_dir():
        raise ArgumentError(f"--fit-data folder not found: {args.fit_data}")
    if Path(args.fit_data).resolve() == Path(args.data).resolve():
        def span(sub: Any) -> tuple[float, float]:
            return (0, float("inf")) if sub is None else (sub[0], float("inf") if sub[1] == -1 else sub[1])

        (a0, a1), (b0, b1) = span(args.subset), span(args.fit_subset)
        if args.fit_subset is None or args.subset is None or (a0 < b1 and b0 < a1):
            raise ArgumentError("--fit-data is the evaluated folder: calibrate on other images, or give disjoint "
                                "--subset and --fit-subset ranges")
    if not args.target_cost >= 1.0:
        raise ArgumentError(f"--target-cost is in forward equivalents, at least 1 (the plain model), got "
                            f"{args.target_cost}")


def _add_tta_arguments(p: argparse.ArgumentParser) -> None:
    from polyglean.tta import POLICIES, TTA_AGGREGATORS

    g = p.add_argument_group(
        "image-space test-time augmentation (over phase search: B_total = B_image x B_phase)",
        "Every view is searched with one --aggregate (no --align-both) at the phase budgets --budgets. The --tta-* "
        "flags are refused without --tta.")
    g.add_argument("--tta", default="none",
                   help=f"TTA aggregator(s), comma-separated, each once, from: none, "
                        f"{', '.join(TTA_AGGREGATORS.names())} (default none: the phase search alone). With TTA, "
                        "--budgets are the phase budgets of every view")
    g.add_argument("--tta-policy", help=f"augmentation policy: {', '.join(POLICIES.names())} (default flip)")
    g.add_argument("--tta-budget", type=int_list("--tta-budget"),
                   help="views per image, comma-separated (mean/max/augtta/classtta: the policy's first N views; "
                        "gps: N greedy picks); default: all views of the policy")
    g.add_argument("--tta-fit-data", help="held-out labelled images to fit gps/augtta/classtta on")
    g.add_argument("--tta-fit-limit", type=int, help="fit on N images of --tta-fit-data, evenly spread")
    g.add_argument("--tta-fit-subset", type=_subset,
                   help="fit on START:STOP of a fixed shuffled order of --tta-fit-data, as --subset selects --data "
                        "(e.g. --tta-fit-subset 0:2000 with --subset 2000: for two disjoint parts of one folder)")
    g.add_argument("--tta-fit-part", choices=PARTS,
                   help="fit on the even- or odd-numbered images of --tta-fit-data (file order), before "
                        "--tta-fit-limit")
    g.add_argument("--tta-data-part", choices=PARTS,
                   help="evaluate the even- or odd-numbered images of --data (file order), before --subset and "
                        "--limit")
    g.add_argument("--tta-weights", help="load fitted gps/augtta/classtta state from this file instead of fitting")
    g.add_argument("--tta-save", help="save the fitted TTA state here (reuse it with --tta-weights)")
    g.add_argument("--tta-cache", help="folder caching every view's searched logits, keyed on the weights' and "
                                       "images' content and every setting; reused across runs")
    g.add_argument("--tta-seed", type=int, help="seed of the random-offset crops (default 0)")


def _add_shift_arguments(p: argparse.ArgumentParser) -> None:
    from polyglean.training.finetune import DOWNSAMPLES

    p.add_argument("--downsample", choices=DOWNSAMPLES.names(),
                   help="swap the model's subsampling layers to this layer (as `polyglean train --downsample`); "
                        "with --weights, a checkpoint written by `polyglean train`")
    p.add_argument("--shift-consistency", action="store_true",
                   help="also report the plain model's shift consistency: %% of images whose prediction agrees "
                        "between two random shifts (seeded by --seed)")


# ------------------------------------------------------------------------------------------------ checking options
def wants_tta(args: argparse.Namespace) -> bool:
    """Whether ``args`` ask for TTA (anything but ``--tta none``)."""
    return names(args.tta or "none") != ["none"]


def _check(args: argparse.Namespace) -> None:
    """Refuses bad values and option combinations before any work (and before any model is loaded)."""
    from polyglean.aggregate import AGGREGATORS

    if args.batch_size < 1:
        raise ArgumentError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise ArgumentError(f"--limit must be >= 1, got {args.limit}")
    if args.workers < 0:
        raise ArgumentError(f"--workers must be >= 0, got {args.workers}")
    if args.budgets[0] < 1:
        raise ArgumentError(f"budget {args.budgets[0]} out of range: budgets are >= 1")
    aggregates = refuse_repeats("--aggregate", names(args.aggregate))
    if not aggregates:
        raise ArgumentError("--aggregate is empty; choose from: " + ", ".join(AGGREGATORS.names()))
    for name in aggregates:
        AGGREGATORS.get(name)  # unknown names list the known ones
    if args.no_align and args.align_both:
        raise ArgumentError("--no-align and --align-both contradict each other; give one")
    if args.align_both and args.aggregate_on == "logits":
        raise ArgumentError("--align-both: logits are never aligned; drop it or use --aggregate-on features")
    if args.aggregator and "learned" not in aggregates and args.criterion != "learned":
        raise ArgumentError("--aggregator is used only by --aggregate learned or --criterion learned; add one of "
                            "them or drop --aggregator")
    if not Path(args.data).is_dir():
        raise ArgumentError(f"--data folder not found: {args.data}")
    check_outputs(json=args.json_out, plot=args.plot, tta_save=args.tta_save)
    _check_adaptive(args)
    rt = runtime(args)
    if rt.precision != "fp32" and (wants_tta(args) or args.shift_consistency):
        raise ArgumentError(f"--precision {rt.precision} is not supported with --tta or --shift-consistency yet; "
                            "run them at fp32")
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and (wants_tta(args) or args.shift_consistency):
        raise ArgumentError("--tta and --shift-consistency run in one process only; start them without torchrun")
    if args.resume and not (args.parts or args.json_out):
        raise ArgumentError("--resume needs the folder the killed run saved its batches in: give --parts DIR or "
                            "the same --json as that run")
    if (args.parts or args.resume) and wants_tta(args):
        raise ArgumentError("--parts/--resume are not supported with --tta (use --tta-cache)")
    if args.dist_timeout <= 0:
        raise ArgumentError(f"--dist-timeout must be > 0 seconds, got {args.dist_timeout}")
    if wants_tta(args):
        _check_tta(args, aggregates)
    else:
        given = [f"--{f.replace('_', '-')}" for f in TTA_FLAGS if getattr(args, f) is not None]
        if given:
            raise ArgumentError(f"{', '.join(given)} apply only with --tta; add --tta or drop them")


def _check_tta(args: argparse.Namespace, aggregates: list[str]) -> None:
    from polyglean.tta import POLICIES, TTA_AGGREGATORS

    if args.downsample or args.shift_consistency:
        raise ArgumentError("--downsample and --shift-consistency are not supported together with --tta yet; "
                            "run them without --tta")
    if len(aggregates) > 1:
        raise ArgumentError(f"--aggregate {args.aggregate}: with --tta every view is searched with one phase "
                            "aggregation; give one name (run again for another)")
    if args.align_both:
        raise ArgumentError("--align-both is not supported with --tta; run once with and once with --no-align")
    tta = refuse_repeats("--tta", names(args.tta))
    for name in tta:
        if name != "none":
            TTA_AGGREGATORS.get(name)
    POLICIES.get(args.tta_policy or "flip")
    if args.tta_budget and args.tta_budget[0] < 1:
        raise ArgumentError(f"--tta-budget must be >= 1, got {args.tta_budget[0]}")
    if args.tta_fit_limit is not None and args.tta_fit_limit < 1:
        raise ArgumentError(f"--tta-fit-limit must be >= 1, got {args.tta_fit_limit}")
    fitted = [n for n in tta if n != "none" and TTA_AGGREGATORS.get(n).needs_fit]
    if fitted:
        if not (args.tta_fit_data or args.tta_weights):
            raise ArgumentError(f"--tta {','.join(fitted)} must be fitted: pass held-out labelled images with "
                                "--tta-fit-data DIR, or fitted state with --tta-weights FILE")
        if args.tta_fit_data and args.tta_weights:
            raise ArgumentError("--tta-fit-data and --tta-weights: give one (fit, or load a fit)")
    else:
        extra = [f for f, v in (("--tta-fit-data", args.tta_fit_data), ("--tta-weights", args.tta_weights),
                                ("--tta-save", args.tta_save)) if v]
        if extra:
            raise ArgumentError(f"{', '.join(extra)}: --tta {args.tta} fits nothing (only gps, augtta and "
                                "classtta are fitted)")
    if (args.tta_fit_limit is not None or args.tta_fit_part or args.tta_fit_subset) and not args.tta_fit_data:
        raise ArgumentError("--tta-fit-limit, --tta-fit-part and --tta-fit-subset select images of --tta-fit-data; "
                            "give it")
    if args.tta_fit_data and not Path(args.tta_fit_data).is_dir():
        raise ArgumentError(f"--tta-fit-data folder not found: {args.tta_fit_data}")
    if args.tta_cache:
        cache = Path(args.tta_cache)
        if cache.exists() and not cache.is_dir():
            raise ArgumentError(f"--tta-cache {args.tta_cache!r} is a file; give a folder")
        check_outputs(tta_cache=str(cache / "probe"))  # the folder can be created and written


# ------------------------------------------------------------------------------------------------ shared steps
def _learned(args: argparse.Namespace, model: Any) -> dict[bool, Any]:
    """The trained aggregators named by ``--aggregator`` (or the one shipped for the preset), by alignment."""
    from polyglean.aggregate import load_aggregator, model_fingerprint, shipped_aggregator

    if "learned" not in names(args.aggregate) and args.criterion != "learned":
        return {}
    paths = args.aggregator or [shipped_aggregator(args.model)]
    if paths[0] is None:
        raise ArgumentError(f"no trained aggregator ships for {args.model!r}: train one with `polyglean "
                            "train-aggregator` and pass it with --aggregator PATH")
    fingerprint = model_fingerprint(model)
    modules: dict[bool, Any] = {}
    for path in paths:
        module = load_aggregator(path, model=args.model, fingerprint=fingerprint)
        module.meta = {**module.meta, "path": str(path)}
        al = bool(module.meta["align"])
        if al in modules:
            raise ArgumentError(f"--aggregator: {modules[al].meta['path']!r} and {str(path)!r} were both trained "
                                f"{'with' if al else 'without'} alignment; give at most one of each")
        modules[al] = module
    return modules


def _dataset(root: str, preprocess: Any, num_classes: int, part: str | None, subset: Any, limit: int | None) -> Any:
    from polyglean.data import ImageDataset
    from polyglean.experiments import ImageSelection, select_images

    dataset = ImageDataset(root, preprocess, num_classes=num_classes)  # checks the labels' range
    return select_images(dataset, ImageSelection(part=part or "all", subset=subset, limit=limit))


def _load(args: argparse.Namespace, device: Any = "cpu") -> tuple[Any, Any, Any, int]:
    from polyglean.experiments import model_classes

    model, preprocess = load_model(args.model, args.weights, downsample=args.downsample, pretrained=args.pretrained,
                                   random_weights=args.random_weights)
    model = model.to(device)
    net = phase_net(model, preprocess.input_size)
    return model, preprocess, net, model_classes(model, preprocess.input_size, device)


def _with_outcomes(rows: list[dict[str, Any]], outcomes: dict[Any, Any], key: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows with their per-image top-1 outcomes as ``correct``: one character per image, ``1`` right, ``0`` wrong
    (data set order, as ``labels``), so that any two rows can be compared image by image later."""
    out = []
    for row in rows:
        found = outcomes.get(tuple(row[k] for k in key))
        bits = "".join("1" if c else "0" for c in found.correct.tolist()) if found is not None else None
        out.append({**row, **({"correct": bits} if bits is not None else {})})
    return out


def _header(args: argparse.Namespace) -> dict[str, Any]:
    from polyglean.provenance import machine

    return {"model": args.model, "weights": args.weights, "data": str(args.data), "machine": machine(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


# ------------------------------------------------------------------------------------------------ the phase search
def _adaptive(args: argparse.Namespace, net: Any, preprocess: Any, num_classes: int, config: Any
              ) -> tuple[Any, dict[str, Any] | None]:
    """``config`` with the stop rule of ``--adaptive`` (calibrated on ``--fit-data`` for ``--target-cost``), and
    what the calibration measured."""
    import dataclasses

    from polyglean.experiments import calibrate_adaptive

    if not args.adaptive:
        return config, None
    if args.target_cost is None:
        return dataclasses.replace(config, stop=args.adaptive), {"rule": args.adaptive}
    fit = _dataset(args.fit_data, preprocess, num_classes, None, args.fit_subset, None)
    rule, info = calibrate_adaptive(net, fit, config, args.adaptive, args.target_cost)
    info = {**info, "fit_data": str(args.fit_data), "fit_subset": None if args.fit_subset is None else list(args.fit_subset)}
    return dataclasses.replace(config, stop=rule), info


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the phase-search evaluation ``args`` describe and returns the JSON payload."""
    from polyglean.experiments import ClassificationConfig, evaluate_classification, shift_consistency

    from polyglean.distributed import BatchStore, init_distributed, together
    from polyglean.experiments import store_settings

    aggregates = names(args.aggregate)
    aligns = (True, False) if args.align_both else (not args.no_align and args.aggregate_on == "features",)
    rt = runtime(args)
    ctx = init_distributed(rt.device, timeout_s=args.dist_timeout)
    args.dist = ctx
    device = ctx.device_for(rt.device)
    with together(ctx):  # a rank that cannot load the model or the data stops them all
        model, preprocess, net, num_classes = _load(args, device)
        modules = {al: m.to(device) for al, m in _learned(args, model).items()}
        config = ClassificationConfig(
            budgets=tuple(args.budgets), criterion=args.criterion, aggregates=tuple(aggregates), aligns=aligns,
            aggregate_on=args.aggregate_on, search_space=tuple(args.search_space) if args.search_space else None,
            phase_stride=args.phase_stride, learned=modules, batch_size=args.batch_size, workers=args.workers,
            seed=args.seed, device=device, precision=rt.precision)
        dataset = _dataset(args.data, preprocess, num_classes, None, args.subset, args.limit)
        config, adaptive = _adaptive(args, net, preprocess, num_classes, config)
        parts = args.parts or (f"{args.json_out}.parts" if args.json_out else None)
        store = None
        if parts:
            settings = {"model": args.model, "downsample": args.downsample,
                        **store_settings(net, dataset, config)}
            store = BatchStore(parts, settings, resume=args.resume)
    args.store = store
    started = time.perf_counter()
    with Bars(args.model, not args.no_progress and ctx.is_main) as bars:
        result = evaluate_classification(net, dataset, config, progress=bars, dist=ctx, store=store)
        if result is None:  # another rank reports
            return None  # type: ignore[return-value]
        shift = shift_consistency(model, preprocess, dataset, seed=args.seed, batch_size=args.batch_size,
                                  workers=args.workers, device=device,
                                  progress=bars) if args.shift_consistency else None
    wall = time.perf_counter() - started
    return {
        **_header(args),
        "config": {
            "criterion": args.criterion, "aggregate": aggregates, "aggregate_on": args.aggregate_on,
            "align": list(aligns), "search_align": result.search_align, "search_space": result.search_space,
            "sites": result.sites, "batch_size": args.batch_size, "limit": args.limit, "seed": args.seed,
            "subset": None if args.subset is None else list(args.subset),
            "aggregators": {("aligned" if al else "unaligned"): {"path": m.meta["path"],
                                                                 "training": m.meta.get("training")}
                            for al, m in modules.items()},
            "reference": "budget 1 of the same search (the plain model); intervals: paired bootstrap, 95%",
            "adaptive": adaptive, **rt.as_dict(), "device": str(device), "processes": ctx.world_size,
        },
        "wall_seconds": wall,
        "images_per_second": len(result.labels) / wall if wall > 0 else None,
        "results": _with_outcomes(result.rows, result.outcomes, ("aggregate", "align", "budget")),
        "labels": result.labels.tolist(),
        "downsample": args.downsample,
        **({"shift_consistency": shift.as_dict()} if shift else {}),
    }


def format_results(payload: dict[str, Any]) -> str:
    """A plain-text table of the rows, and the shift consistency."""
    cfg = payload["config"]
    head = (f"{payload['model']} on {payload['data']}  criterion={cfg['criterion']} on={cfg['aggregate_on']} "
            f"search={','.join(cfg['search_space'])}  (seconds: the search's wall time, shared by the aggregates; "
            "d_top1: change against B=1 with its 95% interval; p: McNemar)")
    cols = ("aggregate", "align", "budget", "top1", "top5", "nll", "ece", "d_top1 [95% CI]", "p", "fixed", "broken",
            "n_images", "seconds", "fwd_eq")
    rows = [(r["aggregate"], "yes" if r["align"] else "no", str(r["budget"]), f"{r['top1']:.2f}", f"{r['top5']:.2f}",
             f"{r['nll']:.4f}", f"{r['ece']:.2f}", *delta_cells(r), str(r.get("fixed", "-")),
             str(r.get("broken", "-")), str(r["n_images"]), f"{r['seconds']:.1f}", f"{r['forward_equivalents']:.2f}")
            for r in payload["results"]]
    text = table(cols, rows, head)
    sc = payload.get("shift_consistency")
    if sc:
        text += (f"\nshift consistency ({sc['protocol']}, seed {sc['seed']}, {sc['n_images']} images): "
                 f"{sc['percent']:.2f}%")
    return text


def plot_results(results: list[dict[str, Any]], title: str, path: str | Path) -> None:
    """Accuracy against budget and against cost (forward equivalents), one line per aggregation variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), constrained_layout=True)
    for a, al in dict.fromkeys((r["aggregate"], r["align"]) for r in results):
        rows = [r for r in results if (r["aggregate"], r["align"]) == (a, al)]
        label = f"{a}{' aligned' if al else ''}"
        axes[0].plot([r["budget"] for r in rows], [r["top1"] for r in rows], "o-", label=label)
        axes[1].plot([r["forward_equivalents"] for r in rows], [r["top1"] for r in rows], "o-", label=label)
    axes[0].set_xlabel("budget B (states aggregated)")
    axes[0].legend(fontsize=8)
    axes[1].set_xlabel("cost (forward-pass equivalents, FLOPs)")
    for ax in axes:
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ TTA
def evaluate_tta(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Runs the TTA evaluation ``args`` describe; returns the JSON payload and the fits (to save)."""
    from polyglean.aggregate import model_fingerprint
    from polyglean.experiments import TTAConfig
    from polyglean.experiments import evaluate_tta as run_tta
    from polyglean.tta import build_policy, load_fitted

    aggregate = names(args.aggregate)[0]
    align = not args.no_align and args.aggregate_on == "features"
    device = runtime(args).device
    model, preprocess, net, num_classes = _load(args, device)
    fingerprint = model_fingerprint(model)
    modules = _learned(args, model)
    if modules and align not in modules:
        trained = "with" if True in modules else "without"
        raise ArgumentError(f"the learned aggregator was trained {trained} alignment; run {trained} alignment "
                            f"({'drop --no-align' if trained == 'with' else 'add --no-align'}) or give another")
    config = TTAConfig(
        tta=tuple(names(args.tta)), policy=args.tta_policy or "flip",
        view_budgets=tuple(args.tta_budget) if args.tta_budget else (None,), phase_budgets=tuple(args.budgets),
        criterion=args.criterion, aggregate=aggregate, align=align, aggregate_on=args.aggregate_on,
        search_space=tuple(args.search_space) if args.search_space else None, learned=modules.get(align),
        phase_stride=args.phase_stride, seed=args.seed, tta_seed=args.tta_seed or 0, batch_size=args.batch_size,
        workers=args.workers, model_id=args.model, cache=args.tta_cache, device=device)
    states = None
    if args.tta_weights:
        views = [a.name for a in build_policy(config.policy, preprocess.input_size, seed=config.tta_seed)]
        states = load_fitted(args.tta_weights, model=args.model, policy=config.policy, views=views,
                             fingerprint=fingerprint)
    test = _dataset(args.data, preprocess, num_classes, args.tta_data_part, args.subset, args.limit)
    fit = (_dataset(args.tta_fit_data, preprocess, num_classes, args.tta_fit_part, args.tta_fit_subset,
                    args.tta_fit_limit)
           if args.tta_fit_data else None)
    with Bars(args.model, not args.no_progress) as bars:
        result = run_tta(net, preprocess, test, config, fit_dataset=fit, fitted_states=states, progress=bars)
    payload = {
        **_header(args),
        "config": {
            "tta": list(config.tta), "policy": config.policy, "views": result.views,
            "view_budgets": list(config.view_budgets), "phase_budgets": list(args.budgets),
            "criterion": args.criterion, "aggregate": aggregate, "aggregate_on": args.aggregate_on,
            "align": result.align, "search_space": result.search_space, "data_part": args.tta_data_part or "all",
            "subset": None if args.subset is None else list(args.subset), "limit": args.limit,
            "fit_data": args.tta_fit_data, "fit_part": args.tta_fit_part or "all", "fit_limit": args.tta_fit_limit,
            "fit_subset": None if args.tta_fit_subset is None else list(args.tta_fit_subset),
            "fit_images": result.fit_images, "tta_weights": args.tta_weights, "batch_size": args.batch_size,
            "seed": args.seed, "tta_seed": config.tta_seed, "model_sha256": fingerprint,
            "reference": "the plain model (input view, phase budget 1); intervals: paired bootstrap, 95%",
        },
        "results": _with_outcomes(result.rows, result.outcomes, ("tta", "view_budget", "phase_budget")),
        "labels": result.labels.tolist(),
    }
    return payload, result.fits


def format_tta(payload: dict[str, Any]) -> str:
    """A plain-text table of the TTA rows."""
    cfg = payload["config"]
    head = (f"{payload['model']} on {payload['data']} ({cfg['data_part']})  policy={cfg['policy']} "
            f"({len(cfg['views'])} views)  search={','.join(cfg['search_space'])}  criterion={cfg['criterion']}  "
            "(budget: views asked for, gps: picks; B_image: distinct views evaluated; fwd_eq, seconds: their cost; "
            "d_top1: change against the plain model with its 95% interval; p: McNemar)")
    cols = ("tta", "budget", "B_image", "B_phase", "B_total", "top1", "top5", "nll", "ece", "d_top1 [95% CI]", "p",
            "fixed", "broken", "n_images", "fwd_eq", "seconds")
    rows = [(r["tta"], "all" if r["view_budget"] is None else str(r["view_budget"]), str(r["b_image"]),
             str(r["phase_budget"]), str(r["b_total"]), f"{r['top1']:.2f}", f"{r['top5']:.2f}", f"{r['nll']:.4f}",
             f"{r['ece']:.2f}", *delta_cells(r), str(r["fixed"]), str(r["broken"]), str(r["n_images"]),
             f"{r['forward_equivalents']:.2f}", f"{r['seconds']:.1f}") for r in payload["results"]]
    return table(cols, rows, head)


def plot_tta(payload: dict[str, Any], path: str) -> None:
    """Top-1 against cost, one line per TTA aggregator and view budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), constrained_layout=True)
    for name in dict.fromkeys(r["tta"] for r in payload["results"]):
        for vb in dict.fromkeys(r["view_budget"] for r in payload["results"] if r["tta"] == name):
            rows = [r for r in payload["results"] if r["tta"] == name and r["view_budget"] == vb]
            ax.plot([r["forward_equivalents"] for r in rows], [r["top1"] for r in rows], "o-",
                    label=f"{name} x{rows[0]['b_image']} views")
    ax.set_xlabel("cost (forward-pass equivalents, FLOPs)")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"{payload['model']}: TTA over phase search ({payload['config']['policy']})", fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ dispatch
def run(args: argparse.Namespace) -> int:
    """Checks the options, runs the evaluation, prints the table, writes JSON (and a plot)."""
    if _is_dense(args):
        return run_dense(args)
    if args.labels or args.seg_tta or args.seg_tta_budget is not None or _stitch.given(args):
        raise ArgumentError(f"--labels, --seg-tta, --seg-tta-budget and --stitch* are for segmentation models; "
                            f"{args.model} is not one (e.g. --model camvid-cgnet)")
    _check(args)
    if wants_tta(args):
        from polyglean.tta import save_fitted

        payload, fits = evaluate_tta(args)
        print(format_tta(payload))
        write_results(args.json_out, payload)
        if args.plot:
            plot_tta(payload, args.plot)
        if args.tta_save:
            save_fitted(args.tta_save, fits, model=args.model, policy=payload["config"]["policy"],
                        views=payload["config"]["views"], fingerprint=payload["config"]["model_sha256"])
        return 0
    from polyglean.distributed import shutdown_distributed

    try:
        payload = evaluate(args)
        if payload is None:  # a rank other than 0: rank 0 prints and writes
            return 0
        print(format_results(payload))
        write_results(args.json_out, payload)
        if args.plot:
            plot_results(payload["results"], f"{payload['model']} — {Path(payload['data']).name}", args.plot)
        if getattr(args, "store", None) is not None:
            args.store.clear()  # the results are written: the saved batches are no longer needed
    finally:
        if getattr(args, "dist", None) is not None:
            shutdown_distributed(args.dist)
    return 0


# ------------------------------------------------------------------------------------------------ segmentation
def _add_dense_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "semantic segmentation (when --model is a segmentation preset, e.g. camvid-espnet)",
        "The search runs on the output maps: --criterion entropy (mean pixel entropy), random or delta; --aggregate "
        "mean or entropy per pixel; alignment shifts each candidate map back by its displacement (default; "
        "--no-align, --align-both). Reports mIoU (one confusion matrix over the set), per-class IoU, pixel and mean "
        "class accuracy, boundary/interior mIoU within 3 px of label edges, pixels fixed/broken, and each row's "
        "mIoU change against the plain model with a paired bootstrap interval over images.")
    g.add_argument("--labels", help="label maps sharing the images' file stems (CamVid), or gtFine/<split> beside "
                                    "leftImg8bit/<split> (Cityscapes *_labelTrainIds.png)")
    g.add_argument("--seg-tta", help="image-space TTA policies, comma-separated: flip, ms (scales 0.75, 1, 1.25, "
                                     "1.5), flip+ms; each alone and, with --seg-tta-budget, combined with the search")
    g.add_argument("--seg-tta-budget", type=int, help="phase budget searched inside every TTA view (default: TTA alone)")


def _is_dense(args: argparse.Namespace) -> bool:
    from polyglean.models import get_preset, list_models

    return args.model in list_models() and get_preset(args.model).task == "segmentation"


def _check_dense(args: argparse.Namespace) -> tuple[list[str], tuple[str, ...]]:
    from polyglean.experiments.dense import TTA_POLICIES
    from polyglean.search.dense import DENSE_AGGREGATORS, DENSE_CRITERIA

    if not args.labels:
        raise ArgumentError(f"{args.model} is a segmentation model: give its label maps with --labels DIR")
    for flag, folder in (("--data", args.data), ("--labels", args.labels)):
        if not Path(folder).is_dir():
            raise ArgumentError(f"{flag} folder not found: {folder}")
    refused = [flag for flag, given in (
        ("--subset", args.subset), ("--downsample", args.downsample),
        ("--shift-consistency", args.shift_consistency), ("--tta", wants_tta(args)),
        ("--aggregate-on logits", args.aggregate_on == "logits"), ("--phase-stride", args.phase_stride != 1),
        *((f"--{f.replace('_', '-')}", getattr(args, f) is not None)
          for f in (*TTA_FLAGS, "adaptive", "target_cost", "fit_data", "fit_subset", "parts")),
        ("--resume", args.resume), ("--device", args.device not in (None, "cpu")),
        ("--precision", args.precision != "fp32"),
        ("torchrun", int(__import__("os").environ.get("WORLD_SIZE", "1")) > 1)) if given]
    if refused:
        raise ArgumentError(f"{', '.join(refused)}: not supported for segmentation models (image-space TTA: "
                            "--seg-tta)")
    aggregates = refuse_repeats("--aggregate", names(args.aggregate))
    for name in aggregates:
        if name != "learned":
            DENSE_AGGREGATORS.get(name)
    if "learned" in aggregates and not args.aggregator:
        raise ArgumentError(f"--aggregate learned: no trained aggregator ships for {args.model!r}; train one with "
                            "`polyglean train-aggregator --labels DIR` and pass it with --aggregator PATH")
    if args.aggregator and "learned" not in aggregates:
        raise ArgumentError("--aggregator is used only by --aggregate learned; add it or drop --aggregator")
    if args.aggregator and len(args.aggregator) > 1:
        raise ArgumentError(f"--aggregator: give one trained map aggregator, got {len(args.aggregator)}")
    DENSE_CRITERIA.get(args.criterion)
    if args.no_align and args.align_both:
        raise ArgumentError("--no-align and --align-both contradict each other; give one")
    tta = tuple(refuse_repeats("--seg-tta", names(args.seg_tta or "")))
    for name in tta:
        if name not in TTA_POLICIES:
            raise ArgumentError(f"--seg-tta {name!r}: choose from {', '.join(TTA_POLICIES)}")
    if args.seg_tta_budget is not None and not tta:
        raise ArgumentError("--seg-tta-budget applies to --seg-tta views; add --seg-tta or drop it")
    if args.seg_tta_budget is not None and args.seg_tta_budget < 2:
        raise ArgumentError(f"--seg-tta-budget must be >= 2 (1 is TTA alone, always reported), got "
                            f"{args.seg_tta_budget}")
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--limit", args.limit, 1),
                             ("--workers", args.workers, 0), ("--budgets", args.budgets[0], 1)):
        if value is not None and value < low:
            raise ArgumentError(f"{flag} must be >= {low}, got {value}")
    check_outputs(json=args.json_out, plot=args.plot)
    return aggregates, tta


def evaluate_dense(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the segmentation evaluation ``args`` describe and returns the JSON payload (and maps for a plot)."""
    from torch.utils.data import Subset

    from polyglean.data.segmentation import SegmentationDataset
    from polyglean.experiments.dense import DenseEvalConfig, evaluate_segmentation
    from polyglean.models import get_preset

    aggregates, tta = _check_dense(args)
    preset = get_preset(args.model)
    model, preprocess = load_model(args.model, args.weights, pretrained=args.pretrained,
                                   random_weights=args.random_weights)
    dataset: Any = SegmentationDataset(args.data, args.labels, preprocess, num_classes=preset.num_classes,
                                       ignore_index=preset.ignore_index)
    if args.limit is not None and args.limit < len(dataset):
        dataset = Subset(dataset, list(range(args.limit)))
    aligns = (True, False) if args.align_both else (not args.no_align,)
    learned = None
    if "learned" in aggregates:
        from polyglean.aggregate import model_fingerprint
        from polyglean.aggregate.dense import load_map_aggregator

        learned = load_map_aggregator(args.aggregator[0], model=args.model, fingerprint=model_fingerprint(model))
    config = DenseEvalConfig(
        budgets=tuple(args.budgets), aggregates=tuple(aggregates), aligns=aligns, criterion=args.criterion,
        search_space=tuple(args.search_space) if args.search_space else None, tta=tta,
        tta_budget=args.seg_tta_budget or 1,
        tta_aggregate=next((a for a in aggregates if a != "learned"), "mean"), batch_size=args.batch_size,
        workers=args.workers if args.workers != 1 else 0, keep_maps=4 if args.plot else 0, seed=args.seed,
        learned=learned, learned_align=bool(learned.meta["align"]) if learned is not None else True)
    with Bars(args.model, not args.no_progress) as bars:
        report = evaluate_segmentation(model, dataset, config, num_classes=preset.num_classes,
                                       ignore_index=preset.ignore_index, input_size=preprocess.input_size,
                                       progress=lambda done, total: bars("images", done, total))
    payload = {
        **_header(args), "labels": str(args.labels), "task": "segmentation",
        "config": {"criterion": args.criterion, "aggregate": aggregates, "align": list(aligns),
                   "budgets": list(args.budgets), "search_space": report["search_space"], "sites": report["sites"],
                   "tta": list(tta), "tta_budget": config.tta_budget, "batch_size": args.batch_size,
                   **({"aggregator": {"path": str(args.aggregator[0]), "training": learned.meta.get("training")}}
                      if learned is not None else {}),
                   "limit": args.limit, "seed": args.seed, "classes": list(preset.class_names),
                   "ignore_index": preset.ignore_index,
                   "reference": "the plain model (budget 1); miou in percent; miou_delta: paired bootstrap over "
                                "images recomputing the set's confusion-matrix mIoU, 95%"},
        "num_images": report["num_images"], "results": report["results"],
    }
    if "maps" in report:
        payload["_maps"] = report["maps"]
        payload["_dataset"] = dataset
    return payload


def format_dense(payload: dict[str, Any]) -> str:
    """A plain-text table of the segmentation rows."""
    cfg = payload["config"]
    head = (f"{payload['model']} on {payload['data']} ({payload['num_images']} images)  criterion={cfg['criterion']} "
            f"search={','.join(cfg['search_space'])}  (miou, boundary within 3 px: percent; d_miou: change against "
            "the plain model with its 95% interval; fixed/broken: pixels; fwd_eq: forward equivalents)")
    cols = ("tta", "aggregate", "align", "budget", "miou", "d_miou [95% CI]", "pixel_acc", "class_acc",
            "boundary3", "fixed", "broken", "fwd_eq", "s/img")
    rows = []
    for r in payload["results"]:
        d = r.get("miou_delta")
        cell = f"{d['delta']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]" if d else "-"
        rows.append((r["tta"], r["aggregate"], "yes" if r["align"] else "no", str(r["budget"]), f"{r['miou']:.2f}",
                     cell, f"{r['pixel_acc']:.2f}", f"{r['mean_class_acc']:.2f}", f"{r['boundary_miou_k3']:.2f}",
                     str(r["pixels_fixed"]), str(r["pixels_broken"]), f"{r['forward_equivalents']:.2f}",
                     f"{r['seconds_per_image']:.2f}"))
    return table(cols, rows, head)


def plot_dense(payload: dict[str, Any], path: str) -> None:
    """For a few images: image, ground truth, plain, searched and where the two differ, in the preset's palette."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    from polyglean.models import get_preset

    preset = get_preset(payload["model"])
    palette = np.array([*preset.palette, (0, 0, 0)], dtype=np.uint8)  # void / other: black
    dataset = payload["_dataset"]
    base = dataset.dataset if hasattr(dataset, "dataset") else dataset
    maps = payload["_maps"]
    n = len(maps["plain"])
    fig, axes = plt.subplots(n, 5, figsize=(15, 2.4 * n), constrained_layout=True, squeeze=False)
    row_meta = maps["searched_row"] or {}
    titles = ("image", "ground truth", "plain", f"searched B={row_meta.get('budget')} {row_meta.get('aggregate')}",
              "changed: green fixed, red broken, white other")
    for i in range(n):
        image_path, _ = base.samples[i]
        label = base.read_label(i).numpy()
        plain, searched = maps["plain"][i].numpy(), maps["searched"][i].numpy()
        void = len(palette) - 1

        def paint(m: Any) -> Any:
            return palette[np.clip(m, 0, void)]

        diff = np.zeros((*label.shape, 3), dtype=np.uint8)
        changed = plain != searched
        diff[changed] = 255
        labelled = label != preset.ignore_index
        diff[changed & labelled & (searched == label)] = (0, 200, 0)
        diff[changed & labelled & (plain == label)] = (220, 0, 0)
        panels = (np.asarray(Image.open(image_path).convert("RGB")), paint(label), paint(plain), paint(searched), diff)
        for j, panel in enumerate(panels):
            axes[i, j].imshow(panel)
            axes[i, j].axis("off")
            if i == 0:
                axes[i, j].set_title(titles[j], fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_dense(args: argparse.Namespace) -> int:
    """The segmentation path of ``polyglean eval``."""
    sites = _stitch.check(args, DEFAULT_BUDGETS)
    if sites:
        _check_dense(args)
        return _stitch.run(args, sites, _header(args))
    payload = evaluate_dense(args)
    print(format_dense(payload))
    write_results(args.json_out, {k: v for k, v in payload.items() if not k.startswith("_")})
    if args.plot:
        plot_dense(payload, args.plot)
    return 0
