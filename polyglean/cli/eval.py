"""``polyglean eval``: the phase search on a labelled image folder, at several budgets in one pass."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from polyglean.cli._args import add_model_arguments
from polyglean.metrics import classification_metrics


def _budgets(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budgets must be comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("--budgets is empty")
    return values


def add_parser(sub: Any, name: str) -> None:
    from polyglean.aggregate import AGGREGATORS
    from polyglean.search import CRITERIA

    p = sub.add_parser(
        name,
        help="evaluate the phase search on labelled images",
        description="Run the greedy phase search on every image of a labelled folder and report, per budget, "
        "top-1/top-5 accuracy, NLL, ECE, images fixed/broken against the plain model (budget 1), wall time and "
        "forward-pass equivalents (FLOPs). All budgets come from one search to the largest.",
    )
    add_model_arguments(p)
    p.add_argument("--data", required=True, help="class folders, or images/ + labels.csv (file,class_index)")
    p.add_argument("--budgets", type=_budgets, default=[1, 4, 10, 15], help="comma-separated (default 1,4,10,15)")
    p.add_argument("--criterion", default="entropy", choices=CRITERIA.names())
    p.add_argument("--aggregate", default="entropy",
                   help=f"one or more, comma-separated, from: {', '.join(AGGREGATORS.names())} (default entropy); "
                        "all come from the same search")
    p.add_argument("--aggregator", metavar="PATH", nargs="+",
                   help="trained aggregator(s) for --aggregate learned / --criterion learned: one trained on aligned "
                        "features, one on unaligned ones, or both (with --align-both); default: the one shipped for "
                        "the preset, if any")
    p.add_argument("--aggregate-on", default="features", choices=["features", "logits"])
    p.add_argument("--no-align", action="store_true", help="aggregate feature maps without aligning them")
    p.add_argument("--align-both", action="store_true", help="report every aggregate with and without alignment")
    p.add_argument("--search-space", nargs="+", metavar="SITE",
                   help="sites to search, by name or index (default: all but the first and last)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, help="evaluate only the first N images (evenly spread over the classes)")
    p.add_argument("--subset", help="START:STOP of a fixed shuffled order of the images (e.g. 650: for the half of "
                                    "imagenet-val1300 an aggregator was not trained on)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random criterion")
    p.add_argument("--workers", type=int, default=1, help="data-loading worker processes")
    p.add_argument("--json", dest="json_out", help="write the results here (atomically)")
    p.add_argument("--plot", help="write a figure of accuracy against budget and against cost (PNG)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from polyglean.cli import eval_tta

    eval_tta.add_arguments(p)
    from polyglean.cli import eval_shift

    eval_shift.add_arguments(p)


def machine() -> dict[str, Any]:
    """Where a result was measured: machine, library versions and the repository commit."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, check=False).stdout.strip() or None
    except OSError:
        commit = None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "commit": commit,
    }


def write_json_atomic(path: str | Path, payload: dict[str, Any]) -> None:
    """Writes JSON to a temporary file beside ``path`` and renames it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot_results(results: list[dict[str, Any]], title: str, path: str | Path) -> None:
    """Accuracy against budget and against cost (forward equivalents), one line per aggregation variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), constrained_layout=True)
    variants = dict.fromkeys((r["aggregate"], r["align"]) for r in results)
    for a, al in variants:
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


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from polyglean.data import DataError, ImageDataset, limit_dataset, parse_subset, subset_dataset
    from polyglean.phase.net import PhaseNet
    from polyglean.search import PhaseSearch

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    from polyglean.aggregate import AGGREGATORS

    aggregates = [a.strip() for a in args.aggregate.split(",") if a.strip()]
    for name in aggregates:
        AGGREGATORS.get(name)  # unknown names fail before any work
    aligns = [True, False] if args.align_both else [not args.no_align]
    if args.aggregate_on == "logits":
        aligns = [False]
    from polyglean.cli import eval_shift

    model, preprocess = eval_shift.load(args)  # load_model, or with --downsample the swapped architecture
    net = PhaseNet(model, input_size=preprocess.input_size)
    top = args.budgets[-1]
    modules: dict[bool, Any] = {}  # trained aggregators by the alignment they were trained with
    if "learned" in aggregates or args.criterion == "learned":
        modules = _learned_aggregators(args, model)
        if not any(al in modules for al in aligns):
            aligns = sorted(modules, reverse=True)
    variants = [(a, al) for a in aggregates for al in aligns if a != "learned" or al in modules]
    if not variants:
        raise ValueError("no aggregation left to report: the learned aggregator was trained "
                         f"{'with' if True in modules else 'without'} alignment")
    by_name = {(a, al): (modules[al] if a == "learned" else a) for a, al in variants}
    learned = modules.get(aligns[0]) or next(iter(modules.values()), None)
    if args.criterion == "learned":
        aligns = [bool(learned.meta["align"]), *[al for al in aligns if al != learned.meta["align"]]]
    first = learned if args.criterion == "learned" else by_name[variants[0]]
    search = PhaseSearch(net, budget=top, criterion=args.criterion, aggregate=first,
                         align=aligns[0], search_space=args.search_space, aggregate_on=args.aggregate_on,
                         seed=args.seed)
    for module in modules.values():  # the displacement code is only meaningful for the search space it was trained on
        _check_learned(module, [s.name for s in search.search_space], module.meta["path"])
    with torch.no_grad():
        num_classes = model(torch.zeros(1, *preprocess.input_size)).shape[-1]
    dataset = ImageDataset(args.data, preprocess, num_classes=num_classes)
    if args.subset:
        dataset = subset_dataset(dataset, *parse_subset(args.subset))
    dataset = limit_dataset(dataset, args.limit, spread=True)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    logits: dict[tuple[str, bool, int], list[torch.Tensor]] = {(a, al, b): [] for a, al in variants
                                                                for b in args.budgets}
    labels: list[torch.Tensor] = []
    module_alone: dict[bool, list[torch.Tensor]] = {}
    seconds = dict.fromkeys(args.budgets, 0.0)
    flops = dict.fromkeys(args.budgets, 0.0)
    forward = 0.0
    bar = tqdm(total=len(dataset), unit="img", disable=args.no_progress, desc=f"{args.model} B<={top}")
    correct = 0
    for x, y in loader:
        if int(y.max()) >= num_classes:
            raise DataError(f"label {int(y.max())} out of range for a model with {num_classes} classes")
        result = search.run(x, budgets=args.budgets)
        for b in args.budgets:
            for a, al in variants:
                same = al == aligns[0] and by_name[(a, al)] is first
                out = result.logits[b] if same else search.combine(result, b, by_name[(a, al)], al)
                logits[(a, al, b)].append(out.float())
            seconds[b] += result.seconds_by_budget[b]
            flops[b] += result.flops_by_budget[b]
        for al, module in modules.items():  # control: the trained module on the default state alone
            with torch.no_grad():
                alone = net.head(module(result.features[:, :1], result.shift[:, :1]))
            module_alone.setdefault(al, []).append(alone.float())
        forward += result.forward_flops
        labels.append(y)
        correct += int((result.logits[top].argmax(-1) == y).sum())
        bar.update(len(y))
        bar.set_postfix({f"top1@{top}": f"{100 * correct / sum(len(v) for v in labels):.2f}"})
    bar.close()
    target = torch.cat(labels)
    results = []
    for a, al in variants:
        reference = torch.cat(logits[(a, al, 1)]) if 1 in args.budgets else None
        for b in args.budgets:
            row = {"aggregate": a, "align": al, "budget": b,
                   **classification_metrics(torch.cat(logits[(a, al, b)]), target, reference)}
            row.update(n_images=len(target), seconds=seconds[b], forward_equivalents=flops[b] / forward,
                       correct=_outcomes(torch.cat(logits[(a, al, b)]), target))
            results.append(row)
    plain = torch.cat(logits[(variants[0][0], variants[0][1], 1)]) if 1 in args.budgets else None
    for al, parts in module_alone.items():
        # Not a search result: the learned module applied to the plain model's features, with no other candidate.
        # What it gains here is adaptation of the features to the training data, not gleaned phases.
        row = {"aggregate": "learned@default", "align": al, "budget": 1,
               **classification_metrics(torch.cat(parts), target, plain)}
        row.update(n_images=len(target), seconds=seconds.get(1, 0.0), forward_equivalents=1.0,
                   correct=_outcomes(torch.cat(parts), target))
        results.append(row)
    shift_consistency = eval_shift.measure(args, model, preprocess, dataset)
    return {
        "model": args.model,
        "weights": args.weights,
        "data": str(args.data),
        "config": {
            "criterion": args.criterion, "aggregate": aggregates, "aggregate_on": args.aggregate_on,
            "align": aligns, "search_space": [s.name for s in search.search_space],
            "sites": [s.name for s in net.sites], "batch_size": args.batch_size, "limit": args.limit,
            "seed": args.seed, "subset": args.subset,
            "aggregators": {("aligned" if al else "unaligned"): {"path": m.meta["path"],
                                                                 "training": m.meta.get("training")}
                            for al, m in modules.items()},
        },
        "machine": machine(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "results": results,
        "labels": target.tolist(),
        "downsample": args.downsample,
        **({"shift_consistency": shift_consistency} if shift_consistency else {}),
    }


def _outcomes(logits: torch.Tensor, target: torch.Tensor) -> str:
    """Per-image top-1 outcomes in data-set order, ``"1"`` right and ``"0"`` wrong (for paired statistics)."""
    return "".join("1" if c else "0" for c in (logits.argmax(-1) == target).tolist())


def _learned_aggregators(args: argparse.Namespace, model: torch.nn.Module) -> dict[bool, Any]:
    """The trained aggregators named by ``--aggregator`` (or the one shipped for the preset), by alignment."""
    from polyglean.aggregate import load_aggregator, model_fingerprint, shipped_aggregator

    paths = args.aggregator or [shipped_aggregator(args.model)]
    if paths[0] is None:
        raise ValueError(f"no trained aggregator ships for {args.model!r}: train one with `polyglean "
                         "train-aggregator` and pass it with --aggregator PATH")
    fingerprint = model_fingerprint(model)
    modules: dict[bool, Any] = {}
    for path in paths:
        module = load_aggregator(path, model=args.model, fingerprint=fingerprint)
        module.meta = {**module.meta, "path": str(path)}
        al = bool(module.meta["align"])
        if al in modules:
            raise ValueError(f"--aggregator: {modules[al].meta['path']!r} and {str(path)!r} were both trained "
                             f"{'with' if al else 'without'} alignment; give at most one of each")
        modules[al] = module
    return modules


def _check_learned(module: Any, space: list[str], name: str) -> None:
    trained = list(module.meta.get("search_space", []))
    if trained[:1] != space[:1]:
        raise ValueError(f"aggregator {name!r} was trained with the search space {trained}; its displacement code "
                         f"does not fit the search space {space} (pass --search-space {' '.join(trained)})")


def format_results(payload: dict[str, Any]) -> str:
    cfg = payload["config"]
    head = (f"{payload['model']} on {payload['data']}  criterion={cfg['criterion']} on={cfg['aggregate_on']} "
            f"search={','.join(cfg['search_space'])}  (seconds: the search's wall time, shared by the aggregates)")
    cols = ("aggregate", "align", "budget", "top1", "top5", "nll", "ece", "fixed", "broken", "n_images", "seconds", "fwd_eq")
    rows = [cols]
    for r in payload["results"]:
        rows.append((r["aggregate"], "yes" if r["align"] else "no", str(r["budget"]), f"{r['top1']:.2f}", f"{r['top5']:.2f}", f"{r['nll']:.4f}",
                     f"{r['ece']:.2f}", str(r.get("fixed", "-")), str(r.get("broken", "-")), str(r["n_images"]),
                     f"{r['seconds']:.1f}", f"{r['forward_equivalents']:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = [head] + ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    from polyglean.cli import eval_shift

    lines += [line for line in [eval_shift.format_line(payload.get("shift_consistency"))] if line]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from polyglean.cli import eval_shift, eval_tta

    eval_shift.check(args)
    if eval_tta.wants_tta(args):  # image-space TTA, alone and over the phase search
        return eval_tta.run(args)
    payload = evaluate(args)
    print(format_results(payload))
    if args.json_out:
        write_json_atomic(args.json_out, payload)
    if args.plot:
        plot_results(payload["results"], f"{payload['model']} — {Path(payload['data']).name}", args.plot)
    return 0
