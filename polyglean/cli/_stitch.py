"""``polyglean eval --stitch``: a segmentation model at a finer output stride (the eval command's options for it).

Parses and checks the ``--stitch*`` options, then calls :func:`polyglean.experiments.stitch.evaluate_stitch` and
prints, writes and plots what it returns. Used by :mod:`polyglean.cli.eval` only.
"""

from __future__ import annotations

import argparse
from typing import Any

from polyglean.cli._common import Bars, load_model, names, refuse_repeats, table, write_results
from polyglean.errors import ArgumentError

FLAGS = ("stitch", "stitch_mode", "stitch_mask", "stitch_width", "stitch_threshold", "stitch_chunk",
         "stitch_no_register")
"""The ``--stitch*`` options (``None`` when not given)."""


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--stitch-threshold must be comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--stitch-width must be comma-separated integers, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    from polyglean.experiments.stitch import STITCH_MODES

    g = p.add_argument_group(
        "finer output stride (segmentation models)",
        "Instead of the phase search: the model natively and at a finer output stride, made by removing the stride "
        "of the named sites (every later layer sees the finer map), and, with --stitch-mask, finer only where a "
        "mask says. Reports mIoU, boundary mIoU, measured FLOPs and time per configuration, with paired bootstrap "
        "intervals against the native model.")
    g.add_argument("--stitch", metavar="SITE[,SITE]",
                   help="the sites to make finer (names or indices, see `polyglean inspect`); every strided site "
                        "after the first must be named too")
    g.add_argument("--stitch-mode", choices=STITCH_MODES,
                   help="phase (default): shift-and-stitch, the trained model's phases interleaved, exact; refused "
                        "where a layer after the site sees the whole map. atrous: the dilated network, whose global "
                        "ops (e.g. CGNet's global context) are taken over the finer map: a different network")
    g.add_argument("--stitch-mask", metavar="edges|uncertain",
                   help="also report finer-only-where-masked rows: edges (class boundaries of the native "
                        "prediction, dilated by --stitch-width), uncertain (top softmax probability below "
                        "--stitch-threshold); comma-separated for both")
    g.add_argument("--stitch-width", type=_ints, metavar="W[,W]",
                   help="trimap widths of the edges mask, in cells of the model's output grid (default 2)")
    g.add_argument("--stitch-threshold", type=_floats, metavar="T[,T]",
                   help="confidence thresholds of the uncertain mask, in (0, 1] (default 0.5)")
    g.add_argument("--stitch-no-register", action="store_true",
                   help="score the finer map where the resize to the labels leaves it, not moved to where the native "
                        "map's cells sit (by (S - S/R)/2 pixels: 2 for stride 8 made 4); for checking that shift")
    g.add_argument("--stitch-chunk", type=int, metavar="N",
                   help="phase mode: most phase states run at once (bounds memory; default all)")


def given(args: argparse.Namespace) -> list[str]:
    """The ``--stitch*`` flags given."""
    return [f"--{f.replace('_', '-')}" for f in FLAGS if getattr(args, f, None) not in (None, False)]


def check(args: argparse.Namespace, default_budgets: object) -> tuple[str, ...]:
    """Refuses option combinations ``--stitch`` cannot honour, before the model is loaded; the sites, named."""
    flags = given(args)
    if args.stitch is None:
        if flags:
            raise ArgumentError(f"{', '.join(flags)} only apply with --stitch SITE[,SITE]; add it or drop them")
        return ()
    sites = tuple(refuse_repeats("--stitch", names(args.stitch)))
    if not sites:
        raise ArgumentError("--stitch is empty: name the sites (see `polyglean inspect --model ...`)")
    masks = refuse_repeats("--stitch-mask", names(args.stitch_mask or ""))
    for m in masks:
        if m not in ("edges", "uncertain"):
            raise ArgumentError(f"--stitch-mask {m!r}: choose from edges, uncertain")
    if args.stitch_mask is not None and not masks:
        raise ArgumentError("--stitch-mask is empty: give edges, uncertain or both")
    if args.stitch_width is not None and "edges" not in masks:
        raise ArgumentError("--stitch-width is the trimap width of --stitch-mask edges; add it or drop the width")
    if args.stitch_threshold is not None and "uncertain" not in masks:
        raise ArgumentError("--stitch-threshold is the confidence threshold of --stitch-mask uncertain; add it or "
                            "drop the threshold")
    if args.stitch_chunk is not None and (args.stitch_mode or "phase") != "phase":
        raise ArgumentError("--stitch-chunk bounds the phase states run at once: it applies to --stitch-mode phase")
    refused = [flag for flag, on in (
        ("--budgets", args.budgets is not default_budgets),
        ("--criterion", args.criterion != "entropy"), ("--aggregate", args.aggregate != "entropy"),
        ("--no-align", args.no_align), ("--align-both", args.align_both), ("--search-space", args.search_space),
        ("--seg-tta", args.seg_tta), ("--seg-tta-budget", args.seg_tta_budget is not None)) if on]
    if refused:
        raise ArgumentError(
            f"{', '.join(refused)}: not combined with --stitch, which uses every phase of the stitched sites "
            "(interleaved, not searched); a search over other sites' phases would need a stitched pass per state. "
            "Run the search without --stitch")
    return sites


def config(args: argparse.Namespace, sites: tuple[str, ...]) -> Any:
    """The checked :class:`~polyglean.experiments.stitch.StitchEvalConfig` of the options."""
    from polyglean.experiments.stitch import StitchEvalConfig

    masks = names(args.stitch_mask or "")
    cfg = StitchEvalConfig(
        sites=sites, mode=args.stitch_mode or "phase",
        widths=tuple(args.stitch_width or [2]) if "edges" in masks else (),
        thresholds=tuple(args.stitch_threshold or [0.5]) if "uncertain" in masks else (),
        batch_size=args.batch_size,
        workers=args.workers if args.workers != 1 else 0, chunk=args.stitch_chunk,
        register=not args.stitch_no_register, seed=args.seed)
    cfg.check()
    return cfg


def evaluate(args: argparse.Namespace, sites: tuple[str, ...], header: dict[str, Any]) -> dict[str, Any]:
    """Loads the model, checks the sites on it (named errors), then runs the evaluation; the JSON payload."""
    from torch.utils.data import Subset

    from polyglean.data.segmentation import SegmentationDataset
    from polyglean.experiments.stitch import StitchRunner, evaluate_stitch
    from polyglean.models import get_preset

    cfg = config(args, sites)
    preset = get_preset(args.model)
    model, preprocess = load_model(args.model, args.weights, pretrained=args.pretrained,
                                   random_weights=args.random_weights)
    runner = StitchRunner(model, cfg, preprocess.input_size)  # refuses bad sites / layers before any image
    dataset: Any = SegmentationDataset(args.data, args.labels, preprocess, num_classes=preset.num_classes,
                                       ignore_index=preset.ignore_index)
    if args.limit is not None and args.limit < len(dataset):  # evenly spread: CamVid's neighbours are one video
        n = len(dataset)
        dataset = Subset(dataset, sorted({round(i * (n - 1) / max(1, args.limit - 1)) for i in range(args.limit)}))
    with Bars(args.model, not args.no_progress) as bars:
        report = evaluate_stitch(model, dataset, cfg, num_classes=preset.num_classes,
                                 ignore_index=preset.ignore_index, runner=runner,
                                 progress=lambda done, total: bars("images", done, total))
    return {
        **header, "labels": str(args.labels), "task": "segmentation-stitch",
        "config": {"stitch": report["sites"], "mode": cfg.mode, "factor": report["factor"],
                   "native_stride": report["native_stride"], "stride": report["stride"],
                   "registration_shift": report["registration_shift"], "widths": list(cfg.widths), "thresholds": list(cfg.thresholds), "batch_size": cfg.batch_size,
                   "limit": args.limit, "seed": args.seed, "sites": report["all_sites"],
                   "classes": list(preset.class_names), "ignore_index": preset.ignore_index,
                   "reference": "the native model; miou in percent; *_delta: paired bootstrap over images "
                                "recomputing the set's confusion-matrix mIoU, 95%; gflops_per_image: measured with "
                                "torch.utils.flop_counter"},
        "num_images": report["num_images"], "results": report["results"],
    }


def format_results(payload: dict[str, Any]) -> str:
    """A plain-text table of the rows."""
    cfg = payload["config"]
    head = (f"{payload['model']} on {payload['data']} ({payload['num_images']} images)  stitch={','.join(cfg['stitch'])}"
            f"  mode={cfg['mode']}  (miou, boundary within 3 px: percent; d_*: change against the native model with "
            "its 95% interval; area: share of the finer grid masked; fwd_eq: FLOPs against native)")
    cols = ("stitch", "param", "OS", "miou", "d_miou [95% CI]", "boundary3", "d_boundary3 [95% CI]", "area",
            "GFLOPs", "fwd_eq", "s/img")

    def cell(d: dict[str, Any] | None) -> str:
        return f"{d['delta']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]" if d else "-"

    rows = []
    for r in payload["results"]:
        stride = r["output_stride"]
        rows.append((r["stitch"], "-" if r["mask_param"] is None else f"{r['mask_param']:g}",
                     f"{stride[0]:g}" if stride[0] == stride[1] else f"{stride[0]:g}x{stride[1]:g}",
                     f"{r['miou']:.2f}", cell(r.get("miou_delta")), f"{r['boundary_miou_k3']:.2f}",
                     cell(r.get("boundary_miou_k3_delta")),
                     "-" if r["mask_area"] is None else f"{r['mask_area']:.0%}", f"{r['gflops_per_image']:.2f}",
                     f"{r['forward_equivalents']:.2f}", f"{r['seconds_per_image']:.2f}"))
    return table(cols, rows, head)


def plot(payloads: list[dict[str, Any]], path: str) -> None:
    """mIoU and boundary mIoU against measured GFLOPs per image, one marker per row (several runs may share it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    shades = {"edges": plt.cm.Greens, "uncertain": plt.cm.Reds}
    markers = ("s", "D", "p", "h")
    span = max(r["gflops_per_image"] for p in payloads for r in p["results"]) * 0.012
    for ax, key, label in ((axes[0], "miou", "mIoU (%)"), (axes[1], "boundary_miou_k3", "boundary mIoU, 3 px (%)")):
        for k, payload in enumerate(payloads):
            rows = payload["results"]
            for r in rows:
                stride = f"OS {r['output_stride'][0]:g}"
                kind, x = r["stitch"], r["gflops_per_image"]
                if kind == "none":
                    if k:
                        continue
                    name, color, marker = f"native ({stride})", "black", "o"
                elif r["mask_param"] is None:
                    name, color, marker = f"{stride}: everywhere", "tab:blue", markers[k % len(markers)]
                else:
                    same = [q["mask_param"] for q in rows if q["stitch"] == kind]
                    pos = same.index(r["mask_param"])
                    name = f"{stride}: {kind} {r['mask_param']:g}"
                    color = shades[kind](0.45 + 0.5 * pos / max(1, len(same) - 1))
                    marker = markers[k % len(markers)]
                    x += span * (pos + 1) * (1 if kind == "uncertain" else -1)  # spread for legibility
                d = r.get("miou_delta" if key == "miou" else f"{key}_delta")
                err = None if d is None else [[d["delta"] - d["low"]], [d["high"] - d["delta"]]]
                ax.errorbar(x, r[key], yerr=err, fmt=marker, color=color, label=name, capsize=2, ms=5)
        ax.set_xlabel("GFLOPs per image (measured)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    fig.legend(seen.values(), seen.keys(), fontsize=7, loc="outside right center")
    first = payloads[0]
    fig.suptitle(f"{first['model']}: finer output stride ({first['config']['mode']}), {first['num_images']} images; "
                 "bars: 95% interval of the change against native; masked rows drawn slightly left (edges) and "
                 "right (uncertain) of their measured cost", fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace, sites: tuple[str, ...], header: dict[str, Any]) -> int:
    """The ``--stitch`` path of ``polyglean eval`` (options checked): evaluate, print, write JSON (and the figure)."""
    payload = evaluate(args, sites, header)
    print(format_results(payload))
    write_results(args.json_out, payload)
    if args.plot:
        plot([payload], args.plot)
    return 0
