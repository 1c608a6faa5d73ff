"""``polyglean bench``: the cost of the search, as a ratio to one plain forward, measured in one process."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from polyglean.cli._common import add_runtime_arguments, check_outputs, machine, runtime, write_results
from polyglean.errors import ArgumentError


def add_parser(sub: Any, name: str) -> None:
    p = sub.add_parser(
        name,
        help="time the search against a plain forward",
        description="Median wall time of search + aggregation over the median time of one plain forward of the "
        "same batch (random weights unless --weights), beside the FLOP ratio of the states the search evaluated "
        "and the budget B (the FLOP ratio without prefix reuse).",
    )
    p.add_argument("--model", default="torchvision:resnet18")
    p.add_argument("--weights")
    p.add_argument("--budget", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"))
    p.add_argument("--criterion", default="entropy")
    p.add_argument("--aggregate", default="entropy")
    p.add_argument("--phase-stride", type=int, default=1, metavar="N",
                   help="search every N-th phase where a site's factor exceeds N (e.g. 4: 16 of a 16x16 ViT patch "
                        "embedding's 256 phases; default 1, all)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats after one warm-up (median reported)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--json", dest="json_out", help="also write the result here (atomically)")
    add_runtime_arguments(p)


def _median_seconds(fn: Any, repeats: int, device: torch.device) -> float:
    def timed() -> float:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":  # kernels run asynchronously: time them to the end
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    timed()  # warm-up
    return statistics.median(timed() for _ in range(repeats))


def bench(args: argparse.Namespace) -> dict[str, Any]:
    from polyglean.experiments import build_search, check_input_size
    from polyglean.cli._common import load_model, phase_net
    from polyglean.models.loader import has_default_weights

    if args.repeats < 1 or args.batch_size < 1:
        raise ArgumentError(f"--repeats and --batch-size must be >= 1, got {args.repeats} and {args.batch_size}")
    if args.budget < 1:
        raise ArgumentError(f"budget {args.budget} out of range: the budget is >= 1")
    if args.threads is not None and args.threads < 1:
        raise ArgumentError(f"--threads must be >= 1, got {args.threads}")
    if args.input_size:
        check_input_size((3, *args.input_size), args.batch_size)
    check_outputs(json=args.json_out)
    rt = runtime(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    # A timing: a torchvision/timm model without --weights runs seeded random weights (as documented).
    model, preprocess = load_model(args.model, args.weights,
                                   random_weights=None if args.weights or has_default_weights(args.model) else 0)
    model = model.to(rt.device)
    size = preprocess.input_size if not args.input_size else (preprocess.input_size[0], *args.input_size)
    check_input_size(size, args.batch_size)
    net = phase_net(model, size)
    from polyglean.models import get_preset, list_models

    dense = args.model in list_models() and get_preset(args.model).task == "segmentation"
    search = build_search(net, dense=dense, budget=args.budget, criterion=args.criterion, aggregate=args.aggregate,
                          phase_stride=args.phase_stride)
    x = torch.randn(args.batch_size, *size, generator=torch.Generator().manual_seed(0)).to(rt.device)
    result: dict[str, Any] = {}

    def plain() -> None:
        with torch.no_grad(), rt.autocast():
            model(x)

    def searched() -> None:
        with rt.autocast():
            result["last"] = search.run(x)

    t_plain = _median_seconds(plain, args.repeats, rt.device)
    t_search = _median_seconds(searched, args.repeats, rt.device)
    res = result["last"]
    return {
        "model": args.model,
        "budget": args.budget,
        "batch_size": args.batch_size,
        "input_size": list(size),
        "search_space": [s.name for s in search.search_space],
        "plain_seconds": t_plain,
        "search_seconds": t_search,
        "time_ratio": t_search / t_plain,
        "flop_ratio": res.forward_equivalents_at(args.budget),
        "flop_ratio_without_reuse": float(args.budget),
        "time_over_flop_ratio": (t_search / t_plain) / res.forward_equivalents_at(args.budget),
        "repeats": args.repeats,
        **rt.as_dict(),
        "machine": machine(),
    }


def run(args: argparse.Namespace) -> int:
    out = bench(args)
    print(f"{out['model']}  B={out['budget']}  batch {out['batch_size']}x{'x'.join(map(str, out['input_size']))}  "
          f"search space {','.join(out['search_space'])}")
    print(f"plain forward   {out['plain_seconds'] * 1000:9.1f} ms (median of {out['repeats']})")
    print(f"search + aggr.  {out['search_seconds'] * 1000:9.1f} ms")
    print(f"time ratio      {out['time_ratio']:9.2f}x   FLOP ratio {out['flop_ratio']:.2f}x   "
          f"without reuse {out['flop_ratio_without_reuse']:.0f}x   time/FLOP ratio {out['time_over_flop_ratio']:.2f}")
    if args.json_out:
        write_results(args.json_out, out)
    else:
        print(json.dumps({k: v for k, v in out.items() if k != "machine"}))
    return 0
