"""``polyglean export``: a static phase ensemble chosen on held-out images, as TorchScript, ONNX or ``.pt2``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from polyglean.cli._common import add_model_arguments


def add_parser(sub: Any, name: str) -> None:
    p = sub.add_parser(
        name,
        help="export a static phase ensemble (no search) for deployment",
        description="Choose K phase states greedily on held-out labelled images (the default state always in; "
        "each step adds the state whose aligned aggregation with the chosen ones has the lowest NLL), build a plain "
        "module that runs them with the shared prefix computed once, and write it as TorchScript, ONNX (opset 18) "
        "or torch.export (.pt2), with a dynamic batch dimension, after checking it against the eager module.",
    )
    add_model_arguments(p)
    p.add_argument("--states", type=int, required=True, metavar="K", help="number of states, default included")
    p.add_argument("--fit-data", required=True, help="labelled images to choose the states on (held out from any "
                                                    "images you report results on)")
    p.add_argument("--subset", help="START:STOP of the fit data's fixed shuffled order")
    p.add_argument("--limit", type=int, help="use only the first N fit images")
    p.add_argument("--out", required=True, help="file to write (.onnx, .pt2, .ts)")
    p.add_argument("--format", dest="fmt", choices=["torchscript", "onnx", "pt2"],
                   help="default: from the suffix of --out")
    p.add_argument("--metric", default="nll", choices=["nll", "accuracy"])
    p.add_argument("--aggregate", default="mean", choices=["mean", "entropy"])
    p.add_argument("--no-align", action="store_true", help="aggregate the feature maps without aligning them")
    p.add_argument("--search-space", nargs="+", metavar="SITE", help="sites whose phases are candidates")
    p.add_argument("--pool-size", type=int, default=16,
                   help="candidates when the search space has more states: those the search keeps most (16)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", dest="json_out", help="also write the selection and checks as JSON")
    p.add_argument("--device", help="where the states are run while choosing them (cpu, cuda, cuda:N, mps; default: "
                                    "cuda when available); the ensemble is exported from the CPU")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from polyglean.export.pipeline import ExportConfig, export_ensemble

    cfg = ExportConfig(model=args.model, fit_data=args.fit_data, out=args.out, states=args.states,
                       weights=args.weights, fmt=args.fmt, subset=args.subset, limit=args.limit, metric=args.metric,
                       aggregate=args.aggregate, align=not args.no_align, search_space=args.search_space,
                       pool_size=args.pool_size, batch_size=args.batch_size, json_out=args.json_out,
                       device=args.device, pretrained=args.pretrained, random_weights=args.random_weights)
    bars: dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if args.no_progress:
            return
        from tqdm import tqdm

        bar = bars.get(stage) or bars.setdefault(stage, tqdm(total=total, unit="img", desc=stage, file=sys.stderr))
        bar.update(done - bar.n)

    summary = export_ensemble(cfg, progress)
    for bar in bars.values():
        bar.close()
    fit = summary["fit"]
    print(f"{summary['model']}: {len(summary['states'])} states chosen on {fit['images']} images "
          f"({fit['metric']}); wrote {summary['out']} ({summary['format']})")
    for k, (state, nll, top1) in enumerate(zip(summary["states_by_site"], fit["nll"], fit["top1"]), 1):
        label = ", ".join(f"{site} {tuple(p)}" for site, p in state.items()) or "default"
        print(f"  {k:>2}  {label:<40} fit NLL {nll:.4f}  top-1 {top1:.2f}")
    print("  export check, max |exported - eager|: " +
          ", ".join(f"{k} {v:.2e}" for k, v in summary["export_check_max_abs_diff"].items()))
    return 0
