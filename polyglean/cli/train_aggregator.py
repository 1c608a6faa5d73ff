"""``polyglean train-aggregator``: train the learned attention aggregator of a frozen model.

This module only parses and shows progress; :func:`polyglean.training.aggregator.train_aggregator` trains.
"""

from __future__ import annotations

import argparse
from typing import Any

from polyglean.cli._common import add_model_arguments, add_runtime_arguments, runtime


def add_parser(sub: Any, name: str) -> None:
    p = sub.add_parser(
        name,
        help="train the learned aggregator of a frozen model",
        description="Find each training image's candidates once with the random-criterion search (as the paper "
        "trains), cache their final feature maps, then train the attention aggregator on the frozen model with "
        "AdamW and a cosine schedule. Each batch aggregates a random number of candidates, so the module serves "
        "every budget. A checkpoint is written atomically after every epoch; --resume continues one (with the same "
        "settings only), and an existing checkpoint is never replaced without --overwrite. Under torchrun the "
        "candidates are searched in shards by all processes and the module is trained with DistributedDataParallel "
        "(each global batch split between the processes); rank 0 reports and writes.",
    )
    add_model_arguments(p)
    p.add_argument("--data", required=True, help="training images: class folders, or images/ + labels.csv")
    p.add_argument("--labels", help="segmentation models: the label maps of --data (file stems shared with the "
                                    "images); a pixel is a sample, see --pixels-per-image")
    p.add_argument("--pixels-per-image", type=int, default=4096,
                   help="segmentation: labelled pixels sampled per training image whose candidates are kept "
                        "(default 4096; full-resolution maps of a training set do not fit in memory)")
    p.add_argument("--subset", help="START:STOP of a fixed shuffled order of --data (e.g. 0:20000)")
    p.add_argument("--val-data", help="validation images (accuracy reported after every epoch)")
    p.add_argument("--val-subset", help="START:STOP of a fixed shuffled order of --val-data (e.g. 20000:22000)")
    p.add_argument("--holdout", type=int, default=0,
                   help="without --val-data: validate on the last N training images instead of training on them")
    p.add_argument("--budget", type=int, default=30,
                   help="candidates per image while training (default 30, as the paper; capped at the number of "
                        "states of the search space)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, help="images per step (default 64); segmentation: pixels per step "
                                                   "(default 4096)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--dim", type=int, help="attention width (default 64; segmentation: 32)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--no-align", action="store_true", help="train on unaligned feature maps")
    p.add_argument("--search-space", nargs="+", metavar="SITE",
                   help="sites to search, by name or index (default: all but the first and last)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", help="folder for cached candidates (reused when model, data and set-up match)")
    p.add_argument("--search-batch-size", type=int, default=32, help="images per search batch while caching")
    p.add_argument("--workers", type=int, default=1, help="data-loading worker processes")
    p.add_argument("--out", required=True, help="checkpoint to write (atomically, after every epoch)")
    p.add_argument("--resume", action="store_true", help="continue the training recorded in --out (same settings)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
    p.add_argument("--export", help="also write a slim copy (weights and metadata only) here when done")
    p.add_argument("--no-progress", action="store_true")
    add_runtime_arguments(p)
    p.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="under torchrun: how long a process waits for the others before taking them as dead "
                        "(default 1800)")


def settings(args: argparse.Namespace) -> Any:
    """The :class:`~polyglean.training.aggregator.AggregatorSettings` of the parsed arguments."""
    from polyglean.training.aggregator import AggregatorSettings

    return AggregatorSettings(
        model=args.model, data=args.data, subset=args.subset, val_data=args.val_data, val_subset=args.val_subset,
        holdout=args.holdout, budget=args.budget, epochs=args.epochs, batch_size=args.batch_size or 64, lr=args.lr,
        weight_decay=args.weight_decay, dim=args.dim or 64, heads=args.heads, align=not args.no_align,
        search_space=tuple(args.search_space) if args.search_space else None, seed=args.seed,
        weights=args.weights, pretrained=args.pretrained, random_weights=args.random_weights,
        search_batch_size=args.search_batch_size, workers=args.workers,
    )


def _is_dense(args: argparse.Namespace) -> bool:
    from polyglean.models import get_preset, list_models

    return args.model in list_models() and get_preset(args.model).task == "segmentation"


def dense_settings(args: argparse.Namespace) -> Any:
    """The :class:`~polyglean.training.dense_aggregator.DenseAggregatorSettings` of the parsed arguments, after
    refusing the options a segmentation model does not take."""
    import os

    from polyglean.errors import ArgumentError
    from polyglean.training.dense_aggregator import DenseAggregatorSettings

    if not args.labels:
        raise ArgumentError(f"{args.model} is a segmentation model: give its label maps with --labels DIR")
    refused = [flag for flag, given in (
        ("--val-data", args.val_data), ("--val-subset", args.val_subset), ("--resume", args.resume),
        ("--device", args.device not in (None, "cpu")), ("--precision", args.precision != "fp32"),
        ("torchrun", int(os.environ.get("WORLD_SIZE", "1")) > 1)) if given]
    if refused:
        raise ArgumentError(f"{', '.join(refused)}: not supported when training a segmentation model's aggregator "
                            "(validate with --holdout N)")
    return DenseAggregatorSettings(
        model=args.model, data=args.data, labels=args.labels, subset=args.subset, holdout=args.holdout,
        budget=args.budget, epochs=args.epochs, batch_size=args.batch_size or 4096, lr=args.lr,
        weight_decay=args.weight_decay, dim=args.dim or 32, heads=args.heads, align=not args.no_align,
        search_space=tuple(args.search_space) if args.search_space else None, seed=args.seed,
        pixels_per_image=args.pixels_per_image, weights=args.weights, pretrained=args.pretrained,
        random_weights=args.random_weights)


def _progress(args: argparse.Namespace) -> tuple[Any, Any]:
    """Callbacks drawing progress bars and printing one line per epoch; and a function closing any open bar."""
    from tqdm import tqdm

    from polyglean.training.aggregator import AggregatorCallbacks

    bars: list[Any] = []

    def close() -> None:
        while bars:
            bars.pop().close()

    def collect(what: str, images: int) -> Any:
        close()
        bars.append(tqdm(total=images, unit="img", desc=f"searching {what} candidates", disable=args.no_progress))
        return bars[-1].update

    def start(epoch: int, epochs: int, steps: int) -> None:
        close()
        bars.append(tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", disable=args.no_progress))

    def step(loss: float) -> None:
        bars[-1].update(1)
        bars[-1].set_postfix(loss=f"{loss:.4f}")

    def end(record: dict[str, Any]) -> None:
        close()
        line = f"epoch {record['epoch']}: loss {record['loss']:.4f}"
        if "val" in record and "pixel_acc" in next(iter(record["val"].values())):
            line += "  held-out pixel acc " + "  ".join(f"B={b} {v['pixel_acc']:.2f}" for b, v in record["val"].items())
        elif "val" in record:
            line += "  val top-1 " + "  ".join(f"B={b} {v['top1']:.2f}" for b, v in record["val"].items())
        print(line, flush=True)

    callbacks = AggregatorCallbacks(on_note=print, on_collect=collect, on_epoch_start=start, on_step=step,
                                    on_epoch_end=end)
    return callbacks, close


def run(args: argparse.Namespace) -> int:
    from polyglean.distributed import init_distributed, shutdown_distributed
    from polyglean.training.aggregator import train_aggregator

    if _is_dense(args):
        from polyglean.training.dense_aggregator import train_dense_aggregator

        dense = dense_settings(args)
        callbacks, close = _progress(args)
        try:
            train_dense_aggregator(dense, args.out, cache=args.cache, overwrite=args.overwrite, export=args.export,
                                   callbacks=callbacks)
        finally:
            close()
        return 0
    if args.labels:
        from polyglean.errors import ArgumentError

        raise ArgumentError(f"--labels: {args.model} is not a segmentation model (its labels come with --data)")
    rt = runtime(args)
    ctx = init_distributed(rt.device, timeout_s=args.dist_timeout)
    callbacks, close = _progress(args)
    try:
        train_aggregator(settings(args), args.out, cache=args.cache, resume=args.resume, overwrite=args.overwrite,
                         export=args.export, callbacks=callbacks, runtime=rt, dist=ctx)
    finally:
        close()
        shutdown_distributed(ctx)
    return 0
