"""``polyglean train-aggregator``: train the learned attention aggregator of a frozen model."""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from polyglean.cli._args import add_model_arguments
from polyglean.cli._common import add_runtime_arguments, runtime
from polyglean.provenance import machine


def add_parser(sub: Any, name: str) -> None:
    p = sub.add_parser(
        name,
        help="train the learned aggregator of a frozen model",
        description="Find each training image's candidates once with the random-criterion search (as the paper "
        "trains), cache their final feature maps, then train the attention aggregator on the frozen model with "
        "AdamW and a cosine schedule. Each batch aggregates a random number of candidates, so the module serves "
        "every budget. A checkpoint is written atomically after every epoch; --resume continues one.",
    )
    add_model_arguments(p)
    p.add_argument("--data", required=True, help="training images: class folders, or images/ + labels.csv")
    p.add_argument("--subset", help="START:STOP of a fixed shuffled order of --data (e.g. 0:20000)")
    p.add_argument("--val-data", help="validation images (accuracy reported after every epoch)")
    p.add_argument("--val-subset", help="START:STOP of a fixed shuffled order of --val-data (e.g. 20000:22000)")
    p.add_argument("--holdout", type=int, default=0,
                   help="without --val-data: validate on the last N training images instead of training on them")
    p.add_argument("--budget", type=int, default=30,
                   help="candidates per image while training (default 30, as the paper; capped at the number of "
                        "states of the search space)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--dim", type=int, default=64, help="attention width (default 64)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--no-align", action="store_true", help="train on unaligned feature maps")
    p.add_argument("--search-space", nargs="+", metavar="SITE",
                   help="sites to search, by name or index (default: all but the first and last)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", help="folder for cached candidates (reused when model, data and set-up match)")
    p.add_argument("--search-batch-size", type=int, default=32, help="images per search batch while caching")
    p.add_argument("--workers", type=int, default=1, help="data-loading worker processes")
    p.add_argument("--out", required=True, help="checkpoint to write (atomically, after every epoch)")
    p.add_argument("--resume", action="store_true", help="continue the training recorded in --out")
    p.add_argument("--export", help="also write a slim copy (weights and metadata only) here when done")
    p.add_argument("--no-progress", action="store_true")
    add_runtime_arguments(p)
    p.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="under torchrun (DistributedDataParallel, candidates searched in shards): how long a process "
                        "waits for the others (default 1800)")


def _dataset(root: str, subset: str | None, preprocess: Any, num_classes: int) -> Any:
    from polyglean.data import ImageDataset, parse_subset, subset_dataset

    ds = ImageDataset(root, preprocess, num_classes=num_classes)
    if subset:
        ds = subset_dataset(ds, *parse_subset(subset))
    return ds


def _candidates(args: argparse.Namespace, search: Any, root: str, subset: str | None, preprocess: Any,
                num_classes: int, meta: dict[str, Any], what: str) -> Any:
    """Cached candidates of one image set: read from --cache when the key matches, else searched and written."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from polyglean.training.aggregator import CandidateSet, collect_candidates

    key = {**meta, "data": str(Path(root).resolve()), "subset": subset}
    path = None
    if args.cache:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        path = Path(args.cache) / f"candidates-{digest}.pt"
        if path.is_file():
            cached = CandidateSet.load(path)
            if cached.meta == key:
                return cached
    ds = _dataset(root, subset, preprocess, num_classes)
    ctx = args.dist
    if ctx.distributed:  # each rank searches its share of the batches; all get the whole set
        from polyglean.distributed import broadcast_object, global_batches, run_sharded
        from polyglean.training.aggregator import CandidateSet

        device = next(search.net.model.parameters()).device

        def compute(batches: list[list[int]]) -> Any:
            for x, y in DataLoader(ds, batch_sampler=batches, num_workers=args.workers):
                result = search.run(x.to(device))
                yield {"features": result.features.to(torch.float16).cpu(), "shift": result.shift.cpu(),
                       "labels": y.clone()}

        with tqdm(total=len(ds), unit="img", desc=f"searching {what} candidates",
                  disable=args.no_progress or not ctx.is_main) as bar:
            parts = run_sharded(global_batches(len(ds), args.search_batch_size), compute, ctx=ctx,
                                on_progress=lambda done, n: bar.update(done - bar.n))
        if ctx.is_main:
            assert parts is not None
            parts = CandidateSet(torch.cat([p["features"] for p in parts]), torch.cat([p["shift"] for p in parts]),
                                 torch.cat([p["labels"] for p in parts]))
        data = broadcast_object(ctx, parts)
    else:
        loader = DataLoader(ds, batch_size=args.search_batch_size, num_workers=args.workers)
        with tqdm(total=len(ds), unit="img", desc=f"searching {what} candidates", disable=args.no_progress) as bar:
            data = collect_candidates(search, loader, on_batch=bar.update)
    if int(data.labels.max()) >= num_classes:
        from polyglean.data import DataError

        raise DataError(f"label {int(data.labels.max())} out of range for a model with {num_classes} classes")
    data.meta = key
    if path is not None and ctx.is_main:
        data.save(path)
    return data


def run(args: argparse.Namespace) -> int:
    from polyglean.aggregate.learned import read_checkpoint

    for flag in ("epochs", "batch_size", "budget", "search_batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.holdout and args.val_data:
        raise ValueError("give either --val-data or --holdout, not both")
    out = Path(args.out)
    resume = read_checkpoint(out) if args.resume else None
    if args.resume is False and out.exists():
        raise ValueError(f"{str(out)!r} exists; pass --resume to continue it or choose another --out")

    from polyglean.distributed import init_distributed

    rt = runtime(args)
    if rt.precision != "fp32":
        raise ValueError(f"--precision {rt.precision}: train-aggregator trains in fp32 only")
    ctx = init_distributed(rt.device, timeout_s=args.dist_timeout)
    args.dist = ctx
    device = ctx.device_for(rt.device)
    try:
        return _train(args, ctx, device, out, resume)
    finally:
        from polyglean.distributed import shutdown_distributed

        shutdown_distributed(ctx)


def _train(args: argparse.Namespace, ctx: Any, device: torch.device, out: Path, resume: Any) -> int:
    from tqdm import tqdm

    from polyglean.aggregate import AttentionAggregator, alignment_factor, model_fingerprint, save_aggregator
    from polyglean.models import load_model
    from polyglean.phase.net import PhaseNet
    from polyglean.search import PhaseSearch
    from polyglean.training.aggregator import accuracy_by_budget, cosine_schedule, train_epoch

    say = print if ctx.is_main else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    model, preprocess = load_model(args.model, args.weights, pretrained=args.pretrained)
    model = model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    net = PhaseNet(model, input_size=preprocess.input_size)
    probe = PhaseSearch(net, budget=1, search_space=args.search_space)
    budget = min(args.budget, probe.num_states)
    if budget < args.budget:
        say(f"the search space {[s.name for s in probe.search_space]} has {probe.num_states} states: "
              f"training with budget {budget}")
    if budget < 2:
        raise ValueError("the search space has a single state: there is nothing to aggregate")
    search = PhaseSearch(net, budget=budget, criterion="random", aggregate="mean", align=False,
                         search_space=args.search_space, seed=args.seed)
    align = not args.no_align
    space = [s.name for s in search.search_space]
    factors = [s.factor for s in net.sites]
    grid = alignment_factor(factors, search.search_space[0].index)
    with torch.no_grad():
        num_classes = model(torch.zeros(1, *preprocess.input_size, device=device)).shape[-1]
    fingerprint = model_fingerprint(model)
    meta = {"model": args.model, "model_sha256": fingerprint, "sites": [s.name for s in net.sites],
            "search_space": space, "align": align}
    if resume is not None:
        old = resume["meta"]
        for k in ("model", "model_sha256", "search_space", "align"):
            if old.get(k) != meta[k]:
                raise ValueError(f"--resume: {str(out)!r} was trained with {k}={old.get(k)!r}, now {meta[k]!r}")

    cache_meta = {"model": args.model, "model_sha256": fingerprint, "search_space": space, "budget": budget,
                  "seed": args.seed, "criterion": "random"}
    train = _candidates(args, search, args.data, args.subset, preprocess, num_classes, cache_meta, "training")
    val = None
    if args.val_data:
        val = _candidates(args, search, args.val_data, args.val_subset, preprocess, num_classes, cache_meta,
                          "validation")
    if args.holdout:
        if not 0 < args.holdout < len(train):
            raise ValueError(f"--holdout must be between 1 and {len(train) - 1} (the training images), "
                             f"got {args.holdout}")
        cut = len(train) - args.holdout
        train, val = train.split(cut)
    if align:
        train = train.aligned(grid, net.feature_dims)
        val = val.aligned(grid, net.feature_dims) if val is not None else None

    channels = train.features.shape[2 if net.feature_dims == (-2, -1) else -1]
    module = AttentionAggregator(channels, grid, dim=args.dim, heads=args.heads, spatial_dims=net.feature_dims)
    module = module.to(device)
    trained: Any = module
    if ctx.distributed:  # same initial weights on every rank (same seed), gradients averaged by DDP
        trained = torch.nn.parallel.DistributedDataParallel(module)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = -(-len(train) // args.batch_size)
    scheduler = cosine_schedule(optimizer, args.epochs * steps_per_epoch, warmup=min(100, steps_per_epoch))
    history: list[dict[str, Any]] = []
    start = 0
    if resume is not None:
        module.load_state_dict(resume["state_dict"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        history = list(resume.get("history", []))
        start = int(resume["epoch"]) + 1
    head = net.head
    val_budgets = sorted({b for b in (1, 4, 10, 15, budget) if b <= budget})
    baseline = accuracy_by_budget(None, head, val, val_budgets, device=device) if val is not None else None
    if baseline is not None and start == 0:
        say("validation, plain average: " + "  ".join(f"B={b} {v['top1']:.2f}" for b, v in baseline.items()))
    setup = {"train": {"data": args.data, "subset": args.subset, "images": len(train)},
             "val": {"data": args.val_data, "subset": args.val_subset, "holdout": args.holdout,
                     "images": len(val) if val else 0},
             "budget": budget, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
             "weight_decay": args.weight_decay, "seed": args.seed, "criterion": "random",
             "machine": machine()}
    for epoch in range(start, args.epochs):
        generator = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        tick = time.perf_counter()
        with tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}",
                  disable=args.no_progress or not ctx.is_main) as bar:
            def step(loss: float) -> None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")

            loss = train_epoch(trained, head, train, optimizer, scheduler, batch_size=args.batch_size,
                               generator=generator, on_step=step, dist=ctx)
            record: dict[str, Any] = {"epoch": epoch + 1, "loss": loss, "seconds": time.perf_counter() - tick}
            if val is not None:
                record["val"] = accuracy_by_budget(module, head, val, val_budgets, device=device)
                bar.set_postfix(loss=f"{loss:.4f}", val=f"{record['val'][budget]['top1']:.2f}")
        history.append(record)
        line = f"epoch {epoch + 1}: loss {loss:.4f}"
        if val is not None:
            line += "  val top-1 " + "  ".join(f"B={b} {v['top1']:.2f}" for b, v in record["val"].items())
        say(line, flush=True)
        if not ctx.is_main:
            continue
        save_aggregator(out, module, meta={**meta, "training": setup, "val_baseline": baseline},
                        extra={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                               "epoch": epoch, "history": history})
    if args.export and ctx.is_main:
        save_aggregator(args.export, module, meta={**meta, "training": setup, "val_baseline": baseline,
                                                   "history": history})
    return 0
