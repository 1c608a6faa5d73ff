"""``polyglean train``: fine-tune a preset on CPU, optionally with its subsampling layers swapped.

Starts from the preset's pretrained weights (every weight the swap keeps), trains with random-crop + flip
augmentation, SGD or AdamW and a cosine schedule over all steps, shows a progress bar with the running loss and
accuracy, and writes a checkpoint atomically after every epoch; ``--resume`` continues from it (with the same
settings only), and an existing checkpoint is never replaced without ``--overwrite``. The checkpoint records the
model spec and the downsample, so ``polyglean eval --model SPEC --downsample NAME --weights CKPT`` loads it
(strictly, ``weights_only=True``); ``--phase-augment P`` trains on random phase states (recorded in the checkpoint,
which ``eval --weights`` then reads like any other). This module only parses;
:func:`polyglean.training.finetune.finetune` trains.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from polyglean.cli._common import add_model_arguments, add_runtime_arguments, runtime


def add_parser(sub: Any, name: str) -> None:
    from polyglean.training.finetune import DOWNSAMPLES, OPTIMIZERS

    p = sub.add_parser(
        name,
        help="fine-tune a model (optionally with swapped downsampling layers) on CPU",
        description="Fine-tune a preset from its pretrained weights, optionally with its subsampling layers swapped "
        "to an alternative downsampling layer. Writes a checkpoint atomically after every epoch.",
    )
    add_model_arguments(p)
    p.add_argument("--downsample", choices=DOWNSAMPLES.names(),
                   help="swap the subsampling layers to this layer first (default: keep the model's own)")
    p.add_argument("--data", required=True, help="training images: class folders, or images/ + labels.csv")
    p.add_argument("--val-data", help="labelled images to report top-1 and NLL on after every epoch")
    p.add_argument("--epochs", type=int, required=True, help="total epochs (with --resume: up to this many)")
    p.add_argument("--lr", type=float, default=0.01, help="peak learning rate (default 0.01)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS.names())
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--limit", type=int, help="train on N images only (evenly spread over the data set)")
    p.add_argument("--seed", type=int, default=0, help="seed of new layers' initialisation and the data order")
    p.add_argument("--phase-augment", type=float, default=0.0, metavar="P",
                   help="phase states as an augmentation: each training image runs, with probability P, at a random "
                        "phase of every site of --phase-sites (BatchNorm over the whole batch, as in ordinary "
                        "training; default 0: ordinary training)")
    p.add_argument("--phase-sites", metavar="SITES",
                   help="with --phase-augment: the sites that draw a phase: search (default: the sites the phase "
                        "search explores), main (every main-path site), all, or comma-separated site names")
    p.add_argument("--from-scratch", action="store_true",
                   help="start from the architecture's own random initialisation (seeded by --seed) instead of "
                        "trained weights")
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", required=True, help="checkpoint path, rewritten atomically after every epoch")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint at --out (same settings)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_runtime_arguments(p)
    p.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="under torchrun (DistributedDataParallel, each global batch split between the processes): "
                        "how long a process waits for the others (default 1800)")


def settings(args: argparse.Namespace) -> Any:
    """The :class:`~polyglean.training.finetune.FinetuneSettings` of the parsed arguments."""
    from polyglean.training.finetune import FinetuneSettings

    return FinetuneSettings(
        model=args.model, data=args.data, epochs=args.epochs, downsample=args.downsample, val_data=args.val_data,
        lr=args.lr, weight_decay=args.weight_decay, optimizer=args.optimizer, batch_size=args.batch_size,
        limit=args.limit, seed=args.seed, workers=args.workers, weights=args.weights, pretrained=args.pretrained,
        random_weights=args.random_weights, phase_augment=args.phase_augment, phase_sites=args.phase_sites,
        from_scratch=args.from_scratch,
    )


def _progress(args: argparse.Namespace) -> tuple[Any, Any]:
    """Callbacks drawing a progress bar per epoch and printing one line once an epoch's checkpoint is written; and a
    function closing any open bar."""
    from tqdm import tqdm

    from polyglean.training.finetune import FinetuneCallbacks

    bars: list[Any] = []

    def close() -> None:
        while bars:
            bars.pop().close()

    def start(epoch: int, epochs: int, images: int) -> None:
        close()
        bars.append(tqdm(total=images, unit="img", disable=args.no_progress, desc=f"epoch {epoch}/{epochs}"))

    def batch(stats: Any, lr: float) -> None:
        bars[-1].update(stats.images)
        bars[-1].set_postfix(loss=f"{stats.mean_loss:.3f}", acc=f"{stats.accuracy:.1f}", lr=f"{lr:.2g}")

    def end(record: dict[str, Any]) -> None:
        close()
        val = (f"  val top-1 {record['val_top1']:.2f}  val NLL {record['val_nll']:.4f}" if "val_top1" in record
               else "")
        print(f"epoch {record['epoch']}/{args.epochs}: loss {record['loss']:.4f}  train top-1 {record['top1']:.2f}"
              f"{val}  ({record['seconds']:.0f} s) -> {args.out}")

    return FinetuneCallbacks(on_epoch_start=start, on_batch=batch, on_epoch_end=end, on_note=print), close


def run(args: argparse.Namespace) -> int:
    from polyglean.errors import ArgumentError
    from polyglean.training.finetune import finetune

    if args.threads is not None:
        if args.threads < 1:
            raise ArgumentError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    from polyglean.distributed import init_distributed, shutdown_distributed

    rt = runtime(args)
    ctx = init_distributed(rt.device, timeout_s=args.dist_timeout)
    callbacks, close = _progress(args)
    try:
        finetune(settings(args), args.out, resume=args.resume, overwrite=args.overwrite, callbacks=callbacks,
                 runtime=rt, dist=ctx)
    finally:
        close()
        shutdown_distributed(ctx)
    return 0
