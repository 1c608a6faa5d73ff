"""``polyglean train``: fine-tune a preset on CPU, optionally with its subsampling layers swapped.

Starts from the preset's pretrained weights (every weight the swap keeps), trains with random-crop + flip
augmentation, SGD or AdamW and a cosine schedule over all steps, shows a progress bar with the running loss and
accuracy, and writes a checkpoint atomically after every epoch; ``--resume`` continues from it. The checkpoint
records the model spec and the downsample, so ``polyglean eval --model SPEC --downsample NAME --weights CKPT``
loads it (strictly, ``weights_only=True``).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch


def add_parser(sub: Any, name: str) -> None:
    from polyglean.training.finetune import DOWNSAMPLES, OPTIMIZERS

    p = sub.add_parser(
        name,
        help="fine-tune a model (optionally with swapped downsampling layers) on CPU",
        description="Fine-tune a preset from its pretrained weights, optionally with its subsampling layers swapped "
        "to an alternative downsampling layer. Writes a checkpoint atomically after every epoch.",
    )
    p.add_argument("--model", required=True, help="a preset, e.g. cifar10-resnet20")
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
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", required=True, help="checkpoint path, rewritten atomically after every epoch")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check(args: argparse.Namespace) -> None:
    for flag, value, low in (("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1),
                             ("--workers", args.workers, 0)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")


def _config(args: argparse.Namespace) -> dict[str, Any]:
    """What must not change between a run and its --resume."""
    return {"model": args.model, "downsample": args.downsample, "data": str(args.data), "lr": args.lr,
            "weight_decay": args.weight_decay, "optimizer": args.optimizer, "batch_size": args.batch_size,
            "limit": args.limit, "seed": args.seed}


def run(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from polyglean.data import ImageDataset, limit_dataset
    from polyglean.training.finetune import (
        build_model,
        evaluate_loss,
        load_finetuned,
        make_optimizer,
        read_checkpoint,
        save_checkpoint,
        train_epoch,
        train_transform,
    )
    from polyglean.models import CheckpointError

    _check(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = _config(args)
    resumed: dict[str, Any] | None = None
    if args.resume:
        resumed = read_checkpoint(args.out)
        changed = {k: (resumed["config"].get(k), v) for k, v in config.items() if resumed["config"].get(k) != v}
        if changed:
            raise CheckpointError(
                f"cannot resume {args.out}: it was trained with different settings "
                + ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in changed.items())
            )
        model, preprocess = load_finetuned(args.model, args.downsample, args.out)
    else:
        torch.manual_seed(args.seed)  # new layers' initialisation
        model, preprocess = build_model(args.model, args.downsample)

    num_classes = int(model(torch.zeros(1, *preprocess.input_size)).shape[-1])
    train_set = limit_dataset(ImageDataset(args.data, train_transform(preprocess), num_classes=num_classes),
                              args.limit, spread=True)
    val_loader = None
    if args.val_data:
        val_set = ImageDataset(args.val_data, preprocess, num_classes=num_classes)
        val_loader = DataLoader(val_set, batch_size=args.batch_size, num_workers=args.workers)
    steps_per_epoch = -(-len(train_set) // args.batch_size)  # type: ignore[arg-type]
    optimizer = make_optimizer(args.optimizer, model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * steps_per_epoch)
    start, history = 0, []
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        start, history = int(resumed["epoch"]), list(resumed["history"])
        if resumed["total_epochs"] != args.epochs:
            raise CheckpointError(
                f"cannot resume {args.out} with --epochs {args.epochs}: its cosine schedule spans "
                f"{resumed['total_epochs']} epochs"
            )
        if start >= args.epochs:
            print(f"{args.out} has already trained {start} of {args.epochs} epochs; nothing to do")
            return 0

    for epoch in range(start, args.epochs):
        order = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        torch.manual_seed(args.seed * 1000 + epoch)  # augmentation draws
        loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=order,
                            num_workers=args.workers)
        bar = tqdm(total=len(train_set), unit="img", disable=args.no_progress,  # type: ignore[arg-type]
                   desc=f"epoch {epoch + 1}/{args.epochs}")

        def show(stats: Any, bar: Any = bar) -> None:
            bar.update(stats.images)
            bar.set_postfix(loss=f"{stats.mean_loss:.3f}", acc=f"{stats.accuracy:.1f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.2g}")

        began = time.perf_counter()
        try:
            stats: dict[str, Any] = train_epoch(model, loader, optimizer, scheduler, on_batch=show)
        finally:
            bar.close()
        stats.update(epoch=epoch + 1, seconds=time.perf_counter() - began)
        if val_loader is not None:
            stats.update({f"val_{k}": v for k, v in evaluate_loss(model, val_loader).items()})
        history.append(stats)
        save_checkpoint(args.out, {
            "model": args.model, "downsample": args.downsample, "config": config, "epoch": epoch + 1,
            "total_epochs": args.epochs, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "history": history,
        })
        val = (f"  val top-1 {stats['val_top1']:.2f}  val NLL {stats['val_nll']:.4f}"
               if val_loader is not None else "")
        print(f"epoch {epoch + 1}/{args.epochs}: loss {stats['loss']:.4f}  train top-1 {stats['top1']:.2f}"
              f"{val}  ({stats['seconds']:.0f} s) -> {args.out}")
    return 0
