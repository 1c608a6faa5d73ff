"""The layer-zoo table: accuracy, NLL and shift consistency from ``polyglean eval`` JSON files, beside parameters,
FLOPs and CPU throughput measured here, in one process, one model after the other.

Each row is ``LABEL=DOWNSAMPLE:EVAL_JSON`` (``DOWNSAMPLE`` is ``default`` for the model's own layers). Throughput:
batches of ``--batch-size`` random images, ``--threads`` threads, one warm-up, the median of ``--repeats`` timed
runs; compare the rows with each other, not with other machines.

    python scripts/zoo_table.py --model cifar10-resnet20 --threads 1 --json runs/zoo/table.json \
        pretrained=default:runs/zoo/eval_pretrained.json blurpool=blurpool:runs/zoo/eval_blurpool.json ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from polyglean.cli.eval import machine, write_json_atomic
from polyglean.finetune import build_model


def throughput(model: torch.nn.Module, input_size: tuple[int, ...], batch: int, repeats: int) -> float:
    """Images per second of ``model`` in eval mode (median of ``repeats`` after one warm-up)."""
    x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(0))
    model.eval()
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def flops(model: torch.nn.Module, input_size: tuple[int, ...]) -> int:
    """FLOPs of one forward pass on one image (``torch.utils.flop_counter``)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, *input_size))
    return int(counter.get_total_flops())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rows", nargs="+", metavar="LABEL=DOWNSAMPLE:EVAL_JSON")
    p.add_argument("--model", default="cifar10-resnet20")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", dest="json_out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    for spec in args.rows:
        label, _, rest = spec.partition("=")
        downsample, _, path = rest.partition(":")
        if not label or not downsample or not path:
            p.error(f"row {spec!r} is not LABEL=DOWNSAMPLE:EVAL_JSON")
        payload = json.loads(Path(path).read_text())
        plain = next(r for r in payload["results"] if r["budget"] == 1)
        model, preprocess = build_model(args.model, None if downsample == "default" else downsample)
        rows.append({
            "label": label, "downsample": downsample, "eval": path, "weights": payload.get("weights"),
            "top1": plain["top1"], "nll": plain["nll"], "n_images": plain["n_images"],
            "shift_consistency": payload.get("shift_consistency", {}).get("percent"),
            "params": sum(t.numel() for t in model.parameters()),
            "mflops": flops(model, preprocess.input_size) / 1e6,
            "images_per_s": throughput(model, preprocess.input_size, args.batch_size, args.repeats),
        })
    print("| layer | top-1 | NLL | shift consistency | parameters | MFLOPs | CPU images/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        sc = "-" if r["shift_consistency"] is None else f"{r['shift_consistency']:.2f}"
        print(f"| {r['label']} | {r['top1']:.2f} | {r['nll']:.4f} | {sc} | {r['params']:,} | {r['mflops']:.1f} | "
              f"{r['images_per_s']:.0f} |")
    if args.json_out:
        write_json_atomic(args.json_out, {"model": args.model, "threads": args.threads,
                                          "batch_size": args.batch_size, "repeats": args.repeats,
                                          "machine": machine(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
