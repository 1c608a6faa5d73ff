"""``polyglean bench``: the cost of the search, as a ratio to one plain forward, measured in one process."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from polyglean.cli._common import check_outputs, machine, write_results
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
    p.add_argument("--repeats", type=int, default=5, help="timed repeats after one warm-up (median reported)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--json", dest="json_out", help="also write the result here (atomically)")


def _median_seconds(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(args: argparse.Namespace) -> dict[str, Any]:
    from polyglean.experiments import build_search, check_input_size
    from polyglean.cli._common import load_model, phase_net

    if args.repeats < 1 or args.batch_size < 1:
        raise ArgumentError(f"--repeats and --batch-size must be >= 1, got {args.repeats} and {args.batch_size}")
    if args.budget < 1:
        raise ArgumentError(f"budget {args.budget} out of range: the budget is >= 1")
    if args.threads is not None and args.threads < 1:
        raise ArgumentError(f"--threads must be >= 1, got {args.threads}")
    if args.input_size:
        check_input_size((3, *args.input_size), args.batch_size)
    check_outputs(json=args.json_out)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, preprocess = load_model(args.model, args.weights)
    size = preprocess.input_size if not args.input_size else (preprocess.input_size[0], *args.input_size)
    check_input_size(size, args.batch_size)
    net = phase_net(model, size)
    search = build_search(net, budget=args.budget, criterion=args.criterion, aggregate=args.aggregate)
    x = torch.randn(args.batch_size, *size, generator=torch.Generator().manual_seed(0))
    result: dict[str, Any] = {}

    def plain() -> None:
        with torch.no_grad():
            model(x)

    def searched() -> None:
        result["last"] = search.run(x)

    t_plain = _median_seconds(plain, args.repeats)
    t_search = _median_seconds(searched, args.repeats)
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
