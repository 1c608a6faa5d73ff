"""The layer-zoo table: accuracy, NLL and shift consistency from ``polyglean eval`` JSON files, beside parameters,
FLOPs and CPU throughput measured here, in one process, one model after the other.

Each row is ``LABEL=DOWNSAMPLE:EVAL_JSON`` (``DOWNSAMPLE`` is ``default`` for the model's own layers). Throughput:
batches of ``--batch-size`` random images, ``--threads`` threads, one warm-up per model, then ``--repeats``
rounds timing every model once in turn, median per model; compare the rows with each other (the ratio to the
first row), not with other machines. FLOPs are those ``torch.utils.flop_counter`` counts: convolutions and matrix
products, not element-wise work (SoftPool's exponentials, APS's norms).

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
from polyglean.training.finetune import build_model


def throughput(models: list[torch.nn.Module], input_size: tuple[int, ...], batch: int, repeats: int
               ) -> list[float]:
    """Images per second of each model in eval mode: one warm-up each, then ``repeats`` rounds that time every
    model once in turn (so a change in machine load hits all models alike), median per model."""
    x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(0))
    times: list[list[float]] = [[] for _ in models]
    with torch.no_grad():
        for model in models:
            model.eval()(x)
        for _ in range(repeats):
            for k, model in enumerate(models):
                start = time.perf_counter()
                model(x)
                times[k].append(time.perf_counter() - start)
    return [batch / statistics.median(t) for t in times]


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
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--json", dest="json_out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    models = []
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
        })
        models.append(model)
    speeds = throughput(models, preprocess.input_size, args.batch_size, args.repeats)
    for row, speed in zip(rows, speeds):
        row.update(images_per_s=speed, speed_vs_first=speed / speeds[0])
    print("| layer | top-1 | NLL | shift consistency | parameters | MFLOPs | CPU images/s (vs first row) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        sc = "-" if r["shift_consistency"] is None else f"{r['shift_consistency']:.2f}"
        print(f"| {r['label']} | {r['top1']:.2f} | {r['nll']:.4f} | {sc} | {r['params']:,} | {r['mflops']:.1f} | "
              f"{r['images_per_s']:.0f} ({r['speed_vs_first']:.2f}x) |")
    if args.json_out:
        write_json_atomic(args.json_out, {"model": args.model, "threads": args.threads,
                                          "batch_size": args.batch_size, "repeats": args.repeats,
                                          "machine": machine(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
