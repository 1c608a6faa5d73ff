"""``polyglean eval --tta ...``: image-space TTA, alone and over phase search, at matched total budgets.

Every view of the policy is searched over phases up to the largest of ``--budgets`` (one search per view gives every
smaller phase budget); the aggregators of ``--tta`` then combine the views' searched logits, for every view budget
of ``--tta-budget`` and phase budget of ``--budgets``. GPS, AugTTA and ClassTTA are fitted on the views' searched
logits of held-out images (``--tta-fit-data``) at the same phase budget, or their fitted state is loaded
(``--tta-weights``). Rows report top-1/top-5/NLL/ECE, images fixed/broken against the plain model, and the cost: the
views' searches in plain forwards (FLOPs) and seconds.

``--tta-cache DIR`` keeps every view's searched logits of a data set (one file per view, named by a hash of the
model, data, part, limit, view, search settings and budgets), so that later runs with other aggregators, policies
sharing views, or smaller budgets reuse them instead of searching again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from polyglean.cli.eval import machine, write_json_atomic
from polyglean.metrics import classification_metrics

PARTS = ("all", "even", "odd")


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _tta_budgets(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in _names(text)})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tta-budget must be comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("--tta-budget is empty")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``--tta*`` flags of ``polyglean eval``."""
    from polyglean.tta import POLICIES, TTA_AGGREGATORS

    g = p.add_argument_group("image-space test-time augmentation (over phase search: B_total = B_image x B_phase)")
    g.add_argument("--tta", default="none",
                   help=f"TTA aggregator(s), comma-separated, from: none, {', '.join(TTA_AGGREGATORS.names())} "
                        "(default none: the phase search alone). With TTA, --budgets are the phase budgets of "
                        "every view")
    g.add_argument("--tta-policy", default="flip", help=f"augmentation policy: {', '.join(POLICIES.names())} "
                                                         "(default flip)")
    g.add_argument("--tta-budget", type=_tta_budgets,
                   help="views per image, comma-separated (mean/max/augtta/classtta: the policy's first N views; "
                        "gps: N greedy picks); default: all views of the policy")
    g.add_argument("--tta-fit-data", help="held-out labelled images to fit gps/augtta/classtta on")
    g.add_argument("--tta-fit-limit", type=int, help="fit on N images of --tta-fit-data, evenly spread")
    g.add_argument("--tta-fit-part", choices=PARTS, default="all",
                   help="fit on the even- or odd-numbered images of --tta-fit-data (file order), before --tta-fit-limit")
    g.add_argument("--tta-fit-subset", help="fit on START:STOP of a fixed shuffled order of --tta-fit-data (as "
                                            "--subset does for --data; e.g. 0:2000 with --subset 2000:)")
    g.add_argument("--tta-data-part", choices=PARTS, default="all",
                   help="evaluate the even- or odd-numbered images of --data (file order), before --limit")
    g.add_argument("--tta-weights", help="load fitted TTA state from this file instead of fitting")
    g.add_argument("--tta-save", help="save the fitted TTA state here (reuse it with --tta-weights)")
    g.add_argument("--tta-cache", help="folder caching every view's searched logits, reused across runs")
    g.add_argument("--tta-seed", type=int, default=0, help="seed of the random-offset crops (default 0)")


def wants_tta(args: argparse.Namespace) -> bool:
    """Whether ``args`` ask for TTA (anything but ``--tta none``)."""
    return _names(getattr(args, "tta", "none") or "none") != ["none"]


def _part(dataset: Dataset[Any], part: str) -> Dataset[Any]:
    if part == "all":
        return dataset
    n = len(dataset)  # type: ignore[arg-type]
    return Subset(dataset, list(range(0 if part == "even" else 1, n, 2)))


def _check(args: argparse.Namespace) -> tuple[list[str], list[int | None]]:
    from polyglean.tta import POLICIES, TTA_AGGREGATORS

    names = _names(args.tta)
    if not names:
        raise ValueError("--tta is empty; choose from: none, " + ", ".join(TTA_AGGREGATORS.names()))
    for name in names:
        if name != "none":
            TTA_AGGREGATORS.get(name)  # unknown names list the known ones
    POLICIES.get(args.tta_policy)
    budgets: list[int | None] = list(args.tta_budget) if args.tta_budget else [None]
    if any(b is not None and b < 1 for b in budgets):
        raise ValueError(f"--tta-budget must be >= 1, got {min(b for b in budgets if b is not None)}")
    if args.tta_fit_limit is not None and args.tta_fit_limit < 1:
        raise ValueError(f"--tta-fit-limit must be >= 1, got {args.tta_fit_limit}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    fitted = [n for n in names if n != "none" and TTA_AGGREGATORS.get(n).needs_fit]
    if fitted and not (args.tta_fit_data or args.tta_weights):
        raise ValueError(f"--tta {','.join(fitted)} must be fitted: pass held-out labelled images with "
                         "--tta-fit-data DIR, or fitted state with --tta-weights FILE")
    if args.tta_fit_data and not Path(args.tta_fit_data).is_dir():
        raise FileNotFoundError(f"--tta-fit-data folder not found: {args.tta_fit_data}")
    return names, budgets


def _cache_file(cache: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache / f"{digest}.pt"


def collect_views(search: Any, augs: list[Any], dataset: Dataset[Any], budgets: list[int], *, key: dict[str, Any],
                  cache: str | None, batch_size: int, workers: int, progress: bool, desc: str) -> Any:
    """Every view's searched logits on ``dataset`` (reading and filling the per-view cache)."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from polyglean.tta import ViewLogits, concat_images, search_views

    n = len(dataset)  # type: ignore[arg-type]
    found: dict[str, ViewLogits] = {}
    files: dict[str, Path] = {}
    if cache:
        for aug in augs:
            path = files[aug.name] = _cache_file(Path(cache), {**key, "view": aug.name, "n": n})
            if path.is_file():
                entry = torch.load(path, map_location="cpu", weights_only=True)
                if set(budgets) <= set(entry["budgets"]):  # an entry searched further serves smaller budgets
                    found[aug.name] = ViewLogits([aug.name], list(entry["budgets"]), entry["logits"], entry["flops"],
                                                 entry["seconds"], float(entry["forward_flops"]), entry["labels"])
    missing = [a for a in augs if a.name not in found]
    labels: torch.Tensor | None = next((v.labels for v in found.values()), None)
    if missing:
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
        parts, ys = [], []
        bar = tqdm(total=n, unit="img", disable=not progress, desc=f"{desc}: {len(missing)} view(s)")
        for x, y in loader:
            parts.append(search_views(search, missing, x, budgets))
            ys.append(y)
            bar.update(len(y))
        bar.close()
        computed = concat_images(parts)
        labels = torch.cat(ys)
        for i, aug in enumerate(missing):
            one = computed.select([aug.name])
            one.labels = labels
            found[aug.name] = one
            old = files.get(aug.name)
            if cache and old is not None and not (old.is_file() and not set(budgets) >= set(
                    torch.load(old, map_location="cpu", weights_only=True)["budgets"])):
                Path(cache).mkdir(parents=True, exist_ok=True)
                tmp = files[aug.name].with_suffix(".tmp")
                torch.save({"key": {**key, "view": aug.name, "n": n}, "budgets": one.budgets,
                            "logits": one.logits.clone(), "flops": one.flops.clone(),
                            "seconds": one.seconds.clone(), "forward_flops": one.forward_flops, "labels": labels},
                           tmp)
                tmp.replace(files[aug.name])
    views = []
    for aug in augs:
        v = found[aug.name]
        idx = [v.budgets.index(b) for b in budgets]
        views.append(ViewLogits(v.views, list(budgets), v.logits[:, idx], v.flops[:, idx], v.seconds[:, idx],
                                v.forward_flops, labels))
    return ViewLogits.stack(views)


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the TTA evaluation that ``args`` describe and returns the JSON payload."""
    from polyglean.data import ImageDataset, limit_dataset, parse_subset, subset_dataset
    from polyglean.models import load_model
    from polyglean.phase.net import PhaseNet
    from polyglean.search import PhaseSearch
    from polyglean.tta import TTA_AGGREGATORS, Pixels, build_policy, fit_key, load_fitted, save_fitted

    names, view_budgets = _check(args)
    aggregate = _names(args.aggregate)[0]
    align = not args.no_align and args.aggregate_on == "features"
    model, preprocess = load_model(args.model, args.weights, pretrained=args.pretrained)
    net = PhaseNet(model, input_size=preprocess.input_size)
    phase_budgets = sorted(set(args.budgets) | {1})
    search = PhaseSearch(net, budget=phase_budgets[-1], criterion=args.criterion, aggregate=aggregate, align=align,
                         search_space=args.search_space, aggregate_on=args.aggregate_on, seed=args.seed)
    policy = build_policy(args.tta_policy, preprocess.input_size, Pixels(preprocess.mean, preprocess.std),
                          seed=args.tta_seed)
    view_names = [a.name for a in policy]
    with torch.no_grad():
        num_classes = model(torch.zeros(1, *preprocess.input_size)).shape[-1]
    settings = {"model": args.model, "weights": args.weights, "criterion": args.criterion, "aggregate": aggregate,
                "align": align, "aggregate_on": args.aggregate_on, "seed": args.seed,
                "search_space": [s.name for s in search.search_space]}

    def views_of(root: str, part: str, limit: int | None, what: str, subset: str | None) -> Any:
        dataset = ImageDataset(root, preprocess, num_classes=num_classes)  # checks the labels' range
        if subset:
            dataset = subset_dataset(dataset, *parse_subset(subset))
        dataset = limit_dataset(_part(dataset, part), limit, spread=True)
        key = {**settings, "data": str(Path(root).resolve()), "part": part, "limit": limit,
               **({"subset": subset} if subset else {})}
        return collect_views(search, policy, dataset, phase_budgets, key=key, cache=args.tta_cache,
                             batch_size=args.batch_size, workers=args.workers, progress=not args.no_progress,
                             desc=f"{args.model} {what}")

    needs_fit = [n for n in names if n != "none" and TTA_AGGREGATORS.get(n).needs_fit]
    states: dict[str, Any] = {}
    if needs_fit and args.tta_weights:
        states = load_fitted(args.tta_weights, model=args.model, policy=args.tta_policy, views=view_names)
    fit_views = None
    if needs_fit and not args.tta_weights:
        fit_views = views_of(args.tta_fit_data, args.tta_fit_part, args.tta_fit_limit, "fit", args.tta_fit_subset)
    test = views_of(args.data, args.tta_data_part, args.limit, "eval", args.subset)
    assert test.labels is not None
    target = test.labels
    reference = test.at(1)[:, 0]
    fits: dict[str, Any] = {}
    results = []
    for name in names:
        for vb in [1] if name == "none" else view_budgets:
            for b in args.budgets:
                row: dict[str, Any] = {"tta": name, "policy": "identity" if name == "none" else args.tta_policy,
                                       "view_budget": vb, "phase_budget": b}
                if name == "none":
                    used, logits, fit_seconds = [0], test.at(b)[:, 0], 0.0
                else:
                    agg = TTA_AGGREGATORS.get(name)(vb)
                    tick = time.perf_counter()
                    if agg.needs_fit:
                        key = fit_key(name, vb, b)
                        if args.tta_weights:
                            if key not in states:
                                raise ValueError(f"{args.tta_weights} holds no fit for {key}; it has: "
                                                 f"{', '.join(sorted(states)) or 'none'}")
                            agg.load_state_dict(states[key])
                        else:
                            assert fit_views is not None and fit_views.labels is not None
                            agg.fit(fit_views.at(b), fit_views.labels)
                        fits[key] = agg
                    fit_seconds = time.perf_counter() - tick
                    used = agg.views(len(policy))
                    logits = agg(test.at(b))
                    if name == "gps":
                        row["picks"] = [view_names[i] for i in agg.selected]  # type: ignore[attr-defined]
                    if name == "augtta":
                        row["weights"] = [round(float(w), 4) for w in agg.weights]  # type: ignore[attr-defined]
                fwd, seconds = test.cost(used, b)
                row.update(views=[view_names[i] for i in used], b_image=len(used), b_total=len(used) * b,
                           **classification_metrics(logits, target, reference), n_images=len(target),
                           forward_equivalents=fwd, seconds=seconds, fit_seconds=fit_seconds,
                           correct="".join("1" if c else "0" for c in (logits.argmax(-1) == target).tolist()))
                results.append(row)
    if args.tta_save:
        if not fits:
            raise ValueError("--tta-save: nothing was fitted (choose gps, augtta or classtta)")
        save_fitted(args.tta_save, fits, model=args.model, policy=args.tta_policy, views=view_names)
    return {
        "model": args.model,
        "weights": args.weights,
        "data": str(args.data),
        "config": {
            "tta": names, "policy": args.tta_policy, "views": view_names, "view_budgets": view_budgets,
            "phase_budgets": list(args.budgets), "criterion": args.criterion, "aggregate": aggregate,
            "aggregate_on": args.aggregate_on, "align": align, "search_space": settings["search_space"],
            "data_part": args.tta_data_part, "limit": args.limit, "fit_data": args.tta_fit_data,
            "fit_part": args.tta_fit_part, "fit_limit": args.tta_fit_limit, "subset": args.subset,
            "fit_subset": args.tta_fit_subset,
            "fit_images": None if fit_views is None else int(fit_views.logits.shape[2]),
            "tta_weights": args.tta_weights, "batch_size": args.batch_size, "seed": args.seed,
            "tta_seed": args.tta_seed,
        },
        "machine": machine(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "results": results,
        "labels": target.tolist(),
    }


def format_results(payload: dict[str, Any]) -> str:
    """A plain-text table of the rows."""
    cfg = payload["config"]
    head = (f"{payload['model']} on {payload['data']} ({cfg['data_part']})  policy={cfg['policy']} "
            f"({len(cfg['views'])} views)  search={','.join(cfg['search_space'])}  criterion={cfg['criterion']}  "
            "(budget: views asked for, gps: picks; B_image: distinct views evaluated; fwd_eq, seconds: their cost)")
    cols = ("tta", "budget", "B_image", "B_phase", "B_total", "top1", "top5", "nll", "ece", "fixed", "broken", "n_images",
            "fwd_eq", "seconds")
    rows = [cols]
    for r in payload["results"]:
        budget = "all" if r["view_budget"] is None else str(r["view_budget"])
        rows.append((r["tta"], budget, str(r["b_image"]), str(r["phase_budget"]), str(r["b_total"]), f"{r['top1']:.2f}",
                     f"{r['top5']:.2f}", f"{r['nll']:.4f}", f"{r['ece']:.2f}", str(r["fixed"]), str(r["broken"]),
                     str(r["n_images"]), f"{r['forward_equivalents']:.2f}", f"{r['seconds']:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    return "\n".join([head] + ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows])


def run(args: argparse.Namespace) -> int:
    """``polyglean eval`` with ``--tta``: prints the table, writes JSON (and a plot of top-1 against cost)."""
    payload = evaluate(args)
    print(format_results(payload))
    if args.json_out:
        write_json_atomic(args.json_out, payload)
    if args.plot:
        _plot(payload, args.plot)
    return 0


def _plot(payload: dict[str, Any], path: str) -> None:
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
