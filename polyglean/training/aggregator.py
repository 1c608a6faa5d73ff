"""Training the learned aggregator on a frozen model: cached candidates, then cheap epochs.

The candidates of every training image are found once by the search with the random criterion (as the paper
trains) and their final feature maps cached; the search adds candidates in order, so the first ``b`` cached
candidates are exactly what a random search with budget ``b`` aggregates. Each training batch draws a budget, so
one module learns to aggregate any number of candidates.

:func:`train_aggregator` is ``polyglean train-aggregator``: a whole run in named steps (:func:`frozen_search`,
:func:`resumable_aggregator`, :func:`candidate_sets` / :func:`cached_candidates`, :func:`new_module`,
:func:`train_epoch`), driven by :class:`AggregatorSettings` and reporting through :class:`AggregatorCallbacks`. The
module's initialisation depends on the seed alone, so a cold and a warm candidate cache give the same module, and a
resumed run gives what a run straight through gives.

Under ``torchrun`` (a :class:`~polyglean.distributed.DistContext` of several processes) the same function runs on
every rank: the candidates are searched in shards (the global search batches dealt to the ranks, the search being
seeded per batch, so the set is the one a single process finds) and shared; the module is trained with
:class:`~torch.nn.parallel.DistributedDataParallel`, each global batch split between the ranks
(:func:`train_epoch`), so the weights are a single process's with the same batch size and seed, to float rounding;
rank 0 alone reads and writes the checkpoint and the cache, validates and reports. A rank that fails stops the
others (:func:`polyglean.distributed.together`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polyglean.aggregate.align import align as align_features
from polyglean.aggregate.align import alignment_factor
from polyglean.aggregate.learned import (
    AttentionAggregator,
    model_fingerprint,
    module_from_checkpoint,
    read_checkpoint,
    save_aggregator,
)
from polyglean.data import dataset_fingerprint, make_loader, open_dataset
from polyglean.distributed import DistContext, broadcast_object, global_batches, run_sharded, together
from polyglean.errors import ArgumentError, CheckpointError
from polyglean.io import check_writable, load_torch, write_torch
from polyglean.models import Preprocess, load_model, num_classes
from polyglean.phase.net import PhaseNet
from polyglean.provenance import machine
from polyglean.runtime import Runtime
from polyglean.search import PhaseSearch
from polyglean.training.runs import claim_output, refuse_changed_settings

__all__ = [
    "AggregatorCallbacks",
    "AggregatorSettings",
    "CandidateSet",
    "accuracy_by_budget",
    "cached_candidates",
    "candidate_sets",
    "collect_candidates",
    "cosine_schedule",
    "frozen_search",
    "new_module",
    "resumable_aggregator",
    "train_aggregator",
    "train_epoch",
]


@dataclass
class CandidateSet:
    """Cached candidates of a set of images.

    Attributes:
        features: ``(N, B, ...)`` final feature maps (float16 to halve memory), in the order the search added them.
        shift: ``(N, B, 2)`` displacements ``(Δy, Δx)``.
        labels: ``(N,)`` class indices.
        meta: What produced them (model, weights fingerprint, data, search set-up) — a cache key.
    """

    features: Tensor
    shift: Tensor
    labels: Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def budget(self) -> int:
        return self.features.shape[1]

    def save(self, path: str | Path) -> None:
        """Writes the set atomically (:func:`polyglean.io.write_torch`)."""
        write_torch(path, {"features": self.features, "shift": self.shift, "labels": self.labels, "meta": self.meta})

    @classmethod
    def load(cls, path: str | Path) -> CandidateSet:
        """Reads a set written by :meth:`save` (:func:`polyglean.io.load_torch`, memory-mapped).

        Raises:
            CheckpointError: unreadable, or not a candidate set.
        """
        d = load_torch(path, "candidate cache", mmap=True)
        keys = ("features", "shift", "labels", "meta")
        if not isinstance(d, dict) or any(k not in d for k in keys):
            raise CheckpointError(f"candidate cache {str(path)!r} is not a set of cached candidates "
                                  f"(expected the keys {', '.join(keys)})")
        return cls(d["features"], d["shift"], d["labels"], d["meta"])

    def split(self, at: int) -> tuple[CandidateSet, CandidateSet]:
        """The first ``at`` images and the rest (e.g. to hold some out for validation)."""
        first = CandidateSet(self.features[:at], self.shift[:at], self.labels[:at], dict(self.meta))
        rest = CandidateSet(self.features[at:], self.shift[at:], self.labels[at:], dict(self.meta))
        return first, rest

    def aligned(self, factor: tuple[int, int], dims: tuple[int, int], chunk: int = 256) -> CandidateSet:
        """The same set with every feature map aligned onto the default grid."""
        out = torch.empty_like(self.features)
        for i in range(0, len(self), chunk):
            f = self.features[i:i + chunk]
            s = self.shift[i:i + chunk]
            a = align_features(f.flatten(0, 1).float(), s.reshape(-1, 2), factor, dims)
            out[i:i + chunk] = a.reshape(f.shape).to(out.dtype)
        return CandidateSet(out, self.shift, self.labels, {**self.meta, "aligned": True})


def collect_candidates(search: PhaseSearch, batches: Iterable[tuple[Tensor, Tensor]],
                       on_batch: Callable[[int], None] | None = None) -> CandidateSet:
    """Runs ``search`` (a :class:`~polyglean.search.PhaseSearch` aggregating features) on every batch and keeps
    each image's candidates: final feature maps (float16, unaligned), displacements and labels.

    Args:
        search: The search; its budget is the number of candidates kept per image.
        batches: ``(x, y)`` pairs.
        on_batch: Called with the number of images after each batch (progress).
    """
    if search.aggregate_on != "features":
        raise ArgumentError("collecting candidates needs a search that aggregates feature maps")
    device = _device_of(search.net.model)
    feats: list[Tensor] = []
    shifts: list[Tensor] = []
    labels: list[Tensor] = []
    for x, y in batches:
        result = search.run(x.to(device))
        feats.append(result.features.to(torch.float16).cpu())  # the cache lives in host memory
        shifts.append(result.shift.cpu())
        labels.append(y.cpu().clone())
        if on_batch is not None:
            on_batch(len(y))
    if not labels:
        raise ArgumentError("no images to collect candidates from")
    return CandidateSet(torch.cat(feats), torch.cat(shifts), torch.cat(labels))


def _device_of(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter or buffer (the CPU for a module without either)."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def _collect_sharded(search: PhaseSearch, dataset: Any, batch_size: int, workers: int, ctx: DistContext,
                     on_batch: Callable[[int], None] | None) -> CandidateSet:
    """:func:`collect_candidates` across the ranks: the global batches of ``batch_size`` consecutive images are
    dealt to the ranks, searched, gathered on rank 0 in order, and the whole set is sent to every rank."""

    def compute(batches: list[list[int]]) -> Any:
        for x, y in make_loader(dataset, batch_size=batch_size, workers=workers, batch_sampler=batches):
            part = collect_candidates(search, [(x, y)])
            yield {"features": part.features, "shift": part.shift, "labels": part.labels}

    shown = [0]

    def progress(done: int, total: int) -> None:
        if on_batch is not None and done > shown[0]:
            on_batch(done - shown[0])
        shown[0] = done

    parts = run_sharded(global_batches(len(dataset), batch_size), compute, ctx=ctx, on_progress=progress)
    merged = None
    if parts is not None:  # rank 0
        merged = CandidateSet(torch.cat([p["features"] for p in parts]), torch.cat([p["shift"] for p in parts]),
                              torch.cat([p["labels"] for p in parts]))
    return broadcast_object(ctx, merged)


def train_epoch(module: AttentionAggregator, head: Callable[[Tensor], Tensor], data: CandidateSet,
                optimizer: torch.optim.Optimizer, scheduler: Any, *, batch_size: int, generator: torch.Generator,
                min_budget: int = 2, on_step: Callable[[float], None] | None = None, dist: Any = None) -> float:
    """One pass over ``data`` in a random order; each batch aggregates the first ``b`` candidates, ``b`` drawn
    uniformly from ``[min_budget, data.budget]``. Returns the mean cross-entropy.

    With ``dist`` (a :class:`polyglean.distributed.DistContext` of several processes) ``module`` is wrapped in
    :class:`torch.nn.parallel.DistributedDataParallel` and every rank holds the same ``data`` and a generator with
    the same seed: each global batch of ``batch_size`` images is split between the ranks (rank ``r`` takes every
    ``world``-th image), and each rank's loss is its images' summed loss over the global batch size times the
    world size, so that the gradient DDP averages is the gradient of the global batch's mean loss: the same
    steps as one process with the same ``batch_size`` and seed, to float rounding.
    """
    import torch.distributed as torch_dist

    world = dist.world_size if dist is not None and dist.distributed else 1
    rank = dist.rank if world > 1 else 0
    module.train()
    n = len(data)
    order = torch.randperm(n, generator=generator)
    top = data.budget
    total, count = 0.0, 0
    device = next(module.parameters()).device
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        b = int(torch.randint(min(min_budget, top), top + 1, (1,), generator=generator))
        local = idx[rank::world]
        f = data.features[local, :b].float().to(device)
        logits = head(module(f, data.shift[local, :b].to(device)))
        summed = F.cross_entropy(logits, data.labels[local].to(device), reduction="sum")
        loss = summed * (world / len(idx))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        batch_loss = summed.detach().reshape(1)
        if world > 1:
            torch_dist.all_reduce(batch_loss)
        total += float(batch_loss)
        count += len(idx)
        if on_step is not None:
            on_step(float(batch_loss) / len(idx))
    module.eval()
    return total / max(count, 1)


@torch.no_grad()
def accuracy_by_budget(module: AttentionAggregator | None, head: Callable[[Tensor], Tensor], data: CandidateSet,
                       budgets: Iterable[int], batch_size: int = 256, device: torch.device | str = "cpu"
                       ) -> dict[int, dict[str, float]]:
    """Top-1 (%) and NLL of the module on the first ``b`` candidates of each image, per budget; with
    ``module=None`` the plain average (the untrained module's output)."""
    out = {}
    for b in budgets:
        if not 1 <= b <= data.budget:
            raise ArgumentError(f"budget {b} out of range for {data.budget} cached candidates")
        correct, nll = 0, 0.0
        for i in range(0, len(data), batch_size):
            f = data.features[i:i + batch_size, :b].float().to(device)
            y = data.labels[i:i + batch_size].to(device)
            agg = f.mean(1) if module is None else module(f, data.shift[i:i + batch_size, :b].to(device))
            logits = head(agg)
            correct += int((logits.argmax(-1) == y).sum())
            nll += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        out[b] = {"top1": 100.0 * correct / len(data), "nll": nll / len(data)}
    return out


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: int = 0) -> Any:
    """Linear warm-up then cosine decay to zero over ``steps`` optimiser steps."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ------------------------------------------------------------------------------------------ a whole training run
@dataclass(frozen=True)
class AggregatorSettings:
    """Everything a learned-aggregator training run depends on (what ``polyglean train-aggregator`` takes).

    ``search_batch_size`` and ``workers`` only change how fast the candidates are found, never the result.
    """

    model: str
    data: str
    subset: str | None = None
    val_data: str | None = None
    val_subset: str | None = None
    holdout: int = 0
    budget: int = 30
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    dim: int = 64
    heads: int = 4
    align: bool = True
    search_space: tuple[str, ...] | None = None
    seed: int = 0
    weights: str | None = None
    pretrained: bool = False
    random_weights: int | None = None
    search_batch_size: int = 32
    workers: int = 1

    def check(self) -> None:
        """Refuses out-of-range settings and contradicting options before any work.

        Raises:
            ArgumentError: naming the option and its value.
        """
        for flag in ("epochs", "batch_size", "budget", "search_batch_size", "dim", "heads"):
            if getattr(self, flag) < 1:
                raise ArgumentError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(self, flag)}")
        if self.dim % self.heads:
            raise ArgumentError(f"--heads ({self.heads}) must divide --dim ({self.dim})")
        if self.workers < 0:
            raise ArgumentError(f"--workers must be >= 0, got {self.workers}")
        if self.lr <= 0:
            raise ArgumentError(f"--lr must be > 0, got {self.lr}")
        if self.holdout < 0:
            raise ArgumentError(f"--holdout must be >= 0, got {self.holdout}")
        if self.holdout and self.val_data:
            raise ArgumentError("give either --val-data or --holdout, not both")
        if self.val_subset and not self.val_data:
            raise ArgumentError("--val-subset needs --val-data")

    def recorded(self, budget: int) -> dict[str, Any]:
        """What must not change between a run and its resumption, flat (``budget``: the one trained with)."""
        return {"data": self.data, "subset": self.subset, "val_data": self.val_data, "val_subset": self.val_subset,
                "holdout": self.holdout, "budget": budget, "epochs": self.epochs, "batch_size": self.batch_size,
                "lr": self.lr, "weight_decay": self.weight_decay, "dim": self.dim, "heads": self.heads,
                "seed": self.seed}


@dataclass
class AggregatorCallbacks:
    """Progress of :func:`train_aggregator` (the library never prints): each is optional."""

    on_note: Callable[[str], None] | None = None
    """A sentence worth telling the user (the budget was capped, the plain average's accuracy)."""
    on_collect: Callable[[str, int], Callable[[int], None] | None] | None = None
    """``(what, images)`` before candidates are searched; returns the per-batch callback (images done)."""
    on_epoch_start: Callable[[int, int, int], None] | None = None
    """``(epoch, epochs, steps)`` (1-based)."""
    on_step: Callable[[float], None] | None = None
    """The loss of every optimiser step."""
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None
    """The epoch's record (``epoch``, ``loss``, ``seconds``, ``val`` per budget) once the checkpoint is written."""


@dataclass
class _Search:
    """The frozen model, its PhaseNet, the random-criterion search and what identifies them."""

    model: nn.Module
    preprocess: Preprocess
    net: PhaseNet
    search: PhaseSearch
    budget: int
    classes: int
    meta: dict[str, Any]


def _flat_record(training: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The settings a checkpoint recorded, flat as :meth:`AggregatorSettings.recorded` (older ones: fewer keys)."""
    train, val = training.get("train", {}), training.get("val", {})
    flat = {"data": train.get("data"), "subset": train.get("subset"), "val_data": val.get("data"),
            "val_subset": val.get("subset"), "holdout": val.get("holdout", 0)}
    flat.update({k: training[k] for k in ("budget", "epochs", "batch_size", "lr", "weight_decay", "seed")
                 if k in training})
    flat.update({k: config[k] for k in ("dim", "heads") if k in config})
    return flat


def resumable_aggregator(path: str | Path, settings: AggregatorSettings, found: _Search) -> dict[str, Any]:
    """The checkpoint at ``path``, checked to continue with these settings and this model.

    Raises:
        CheckpointError: another model, weights, search space, alignment, or any other training setting.
    """
    payload = read_checkpoint(path)
    old = payload["meta"]
    refuse_changed_settings(path, {k: old.get(k) for k in ("model", "model_sha256", "search_space", "align")},
                            {k: found.meta[k] for k in ("model", "model_sha256", "search_space", "align")})
    refuse_changed_settings(path, _flat_record(old.get("training", {}), payload.get("config", {})),
                            settings.recorded(found.budget))
    return payload


def frozen_search(settings: AggregatorSettings, on_note: Callable[[str], None] | None = None,
                  device: torch.device | str = "cpu") -> _Search:
    """The frozen model (on ``device``) and the random-criterion search whose candidates the module learns to
    aggregate; the budget is capped at the number of states of the search space."""
    model, preprocess = load_model(settings.model, settings.weights, pretrained=settings.pretrained,
                                   random_weights=settings.random_weights)
    model = model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    net = PhaseNet(model, input_size=preprocess.input_size)
    space = list(settings.search_space) if settings.search_space else None
    probe = PhaseSearch(net, budget=1, search_space=space)
    budget = min(settings.budget, probe.num_states)
    if budget < settings.budget and on_note is not None:
        on_note(f"the search space {[s.name for s in probe.search_space]} has {probe.num_states} states: "
                f"training with budget {budget}")
    if budget < 2:
        raise ArgumentError("the search space has a single state: there is nothing to aggregate")
    search = PhaseSearch(net, budget=budget, criterion="random", aggregate="mean", align=False,
                         search_space=space, seed=settings.seed)
    meta = {"model": settings.model, "model_sha256": model_fingerprint(model), "sites": [s.name for s in net.sites],
            "search_space": [s.name for s in search.search_space], "align": settings.align}
    return _Search(model, preprocess, net, search, budget, num_classes(model, preprocess.input_size), meta)


def cached_candidates(found: _Search, root: str, subset: str | None, cache: str | Path | None, *,
                      seed: int, batch_size: int, workers: int,
                      on_batch: Callable[[int], None] | None = None,
                      on_collect: Callable[[str, int], Callable[[int], None] | None] | None = None,
                      what: str = "training", dist: DistContext | None = None) -> CandidateSet:
    """The candidates of one image set: read from ``cache`` when its key matches, else searched (and written).

    The key holds the model's fingerprint, the search set-up and the data set's fingerprint (every file's real
    path, size and modification time, and label), so replaced images or weights are never served stale.

    With ``dist`` of several processes the search runs in shards and every rank gets the whole set; rank 0 alone
    reads and writes ``cache`` (and reports through ``on_collect``/``on_batch``), and sends a cached set to the
    others.
    """
    ctx = dist if dist is not None else DistContext()
    dataset = open_dataset(root, found.preprocess, subset=subset, num_classes=found.classes)
    key = {"model": found.meta["model"], "model_sha256": found.meta["model_sha256"],
           "search_space": found.meta["search_space"], "budget": found.budget, "seed": seed, "criterion": "random",
           "data": str(Path(root).resolve()), "subset": subset, "data_sha256": dataset_fingerprint(dataset)}
    path = None
    if cache is not None:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        path = Path(cache) / f"candidates-{digest}.pt"
    hit: CandidateSet | None = None
    with together(ctx):  # an unreadable cache on rank 0 stops every rank
        if path is not None and ctx.is_main and path.is_file():
            cached = CandidateSet.load(path)
            if cached.meta == key:
                hit = cached
    if broadcast_object(ctx, hit is not None):
        return broadcast_object(ctx, hit)
    if not ctx.is_main:
        on_batch, on_collect = None, None
    if on_collect is not None:
        on_batch = on_collect(what, len(dataset)) or on_batch  # type: ignore[arg-type]
    if ctx.distributed:
        data = _collect_sharded(found.search, dataset, batch_size, workers, ctx, on_batch)
    else:
        loader = make_loader(dataset, batch_size=batch_size, workers=workers)
        data = collect_candidates(found.search, loader, on_batch=on_batch)
    data.meta = key
    with together(ctx):
        if path is not None and ctx.is_main:
            data.save(path)
    return data


def candidate_sets(settings: AggregatorSettings, found: _Search, cache: str | Path | None,
                   on_collect: Callable[[str, int], Callable[[int], None] | None] | None = None,
                   dist: DistContext | None = None) -> tuple[CandidateSet, CandidateSet | None]:
    """The training and validation candidates (validation: ``val_data``, or the last ``holdout`` training images),
    aligned onto the default grid when ``settings.align`` (``dist``: searched in shards, see
    :func:`cached_candidates`)."""
    common = {"seed": settings.seed, "batch_size": settings.search_batch_size, "workers": settings.workers,
              "on_collect": on_collect, "dist": dist}
    train = cached_candidates(found, settings.data, settings.subset, cache, what="training", **common)
    val = None
    if settings.val_data:
        val = cached_candidates(found, settings.val_data, settings.val_subset, cache, what="validation", **common)
    if settings.holdout:
        if not 0 < settings.holdout < len(train):
            raise ArgumentError(f"--holdout must be between 1 and {len(train) - 1} (the training images), "
                                f"got {settings.holdout}")
        train, val = train.split(len(train) - settings.holdout)
    if settings.align:
        grid = alignment_factor([s.factor for s in found.net.sites], found.search.search_space[0].index)
        train = train.aligned(grid, found.net.feature_dims)
        val = val.aligned(grid, found.net.feature_dims) if val is not None else None
    return train, val


def new_module(settings: AggregatorSettings, found: _Search, train: CandidateSet) -> AttentionAggregator:
    """The untrained module, initialised from ``settings.seed`` alone (whatever ran before: a cold or a warm
    candidate cache gives the same module)."""
    grid = alignment_factor([s.factor for s in found.net.sites], found.search.search_space[0].index)
    channels = train.features.shape[2 if found.net.feature_dims == (-2, -1) else -1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        return AttentionAggregator(channels, grid, dim=settings.dim, heads=settings.heads,
                                   spatial_dims=found.net.feature_dims)


def train_aggregator(settings: AggregatorSettings, out: str | Path, *, cache: str | Path | None = None,
                     resume: bool = False, overwrite: bool = False, export: str | Path | None = None,
                     callbacks: AggregatorCallbacks | None = None, runtime: Runtime | None = None,
                     dist: DistContext | None = None) -> AttentionAggregator:
    """Trains the learned aggregator of a frozen model; writes a checkpoint atomically to ``out`` after every epoch.

    Steps: check the settings and the outputs (an existing ``out`` needs ``resume`` or ``overwrite``); the frozen
    model and search; the checkpoint to resume (same settings only; its metadata is kept as recorded); the
    candidates (cached); the module, optimiser and schedule; then epochs; finally the slim ``export``.

    Args:
        settings: What the run depends on.
        out: The checkpoint.
        cache: Folder of cached candidates.
        resume: Continue the checkpoint at ``out``.
        overwrite: Replace an existing checkpoint at ``out``.
        export: Also write a slim copy here when done.
        callbacks: Progress (called on rank 0 only).
        runtime: Device and precision (default: the CPU, ``fp32``; training is ``fp32`` only). Under ``torchrun``
            a ``cuda`` device without an index becomes each rank's own GPU.
        dist: This process among several (:func:`polyglean.distributed.init_distributed`); every rank calls this
            function with the same arguments. Default: a single process.

    Returns:
        The trained module (eval mode), on every rank.

    Raises:
        ArgumentError: bad settings, a precision other than ``fp32``, or ``out`` exists without
            ``resume``/``overwrite``.
        CheckpointError: resuming a checkpoint of another model or other settings.
        DataError: unreadable data or labels out of the model's range.
        PeerFailed: another rank failed (it shows the error).
    """
    ctx = dist if dist is not None else DistContext()
    rt = runtime if runtime is not None else Runtime()
    cb = callbacks if callbacks is not None and ctx.is_main else AggregatorCallbacks()
    settings.check()  # the same on every rank: every rank refuses the same way, without a collective
    if rt.precision != "fp32":
        raise ArgumentError(f"precision {rt.precision!r}: the aggregator is trained in fp32 only; use --precision "
                            "fp32")
    device = ctx.device_for(rt.device)
    with together(ctx):  # rank 0 alone writes: it alone checks the outputs; any rank may fail to load the model
        if ctx.is_main:
            claim_output(out, resume=resume, overwrite=overwrite, extra=export)
            if cache is not None:
                check_writable(Path(cache) / "candidates-probe.pt", "--cache")
        found = frozen_search(settings, cb.on_note, device)
    resumed = None
    if resume:
        with together(ctx):
            resumed = resumable_aggregator(out, settings, found) if ctx.is_main else None
        resumed = broadcast_object(ctx, resumed)
    if resumed is not None and int(resumed["epoch"]) + 1 >= settings.epochs:
        if cb.on_note is not None:
            cb.on_note(f"{out} has already trained {int(resumed['epoch']) + 1} of {settings.epochs} epochs; "
                       "nothing to do")
        done = module_from_checkpoint(resumed, str(out))
        with together(ctx):
            if export is not None and ctx.is_main:
                save_aggregator(export, done, meta={**resumed["meta"], "history": resumed["history"]})
        return done.to(device).eval()
    train, val = candidate_sets(settings, found, cache, cb.on_collect, dist=ctx)
    module = new_module(settings, found, train).to(device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = -(-len(train) // settings.batch_size)
    scheduler = cosine_schedule(optimizer, settings.epochs * steps_per_epoch, warmup=min(100, steps_per_epoch))
    head = found.net.head
    budgets = sorted({b for b in (1, 4, 10, 15, found.budget) if b <= found.budget})
    if resumed is not None:
        module.load_state_dict(resumed["state_dict"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        history, start = list(resumed.get("history", [])), int(resumed["epoch"]) + 1
        meta = resumed["meta"]  # as recorded when the run started: never rewritten
    else:
        history, start = [], 0
        baseline = None
        if val is not None and ctx.is_main:
            baseline = accuracy_by_budget(None, head, val, budgets, device=device)
            if cb.on_note is not None:
                cb.on_note("validation, plain average: "
                           + "  ".join(f"B={b} {v['top1']:.2f}" for b, v in baseline.items()))
        setup = {"train": {"data": settings.data, "subset": settings.subset, "images": len(train)},
                 "val": {"data": settings.val_data, "subset": settings.val_subset, "holdout": settings.holdout,
                         "images": len(val) if val else 0},
                 "budget": found.budget, "epochs": settings.epochs, "batch_size": settings.batch_size,
                 "lr": settings.lr, "weight_decay": settings.weight_decay, "seed": settings.seed,
                 "criterion": "random", "machine": machine()}
        meta = {**found.meta, "training": setup, "val_baseline": baseline}
    trained: nn.Module = module
    if ctx.distributed:  # the same initial weights on every rank (the same seed); DDP averages the gradients
        trained = nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)
    for epoch in range(start, settings.epochs):
        if cb.on_epoch_start is not None:
            cb.on_epoch_start(epoch + 1, settings.epochs, steps_per_epoch)
        tick = time.perf_counter()
        loss = train_epoch(trained, head, train, optimizer, scheduler,  # type: ignore[arg-type]
                           batch_size=settings.batch_size,
                           generator=torch.Generator().manual_seed(settings.seed * 1000 + epoch), on_step=cb.on_step,
                           dist=ctx)
        record: dict[str, Any] = {"epoch": epoch + 1, "loss": loss, "seconds": time.perf_counter() - tick}
        history.append(record)
        with together(ctx):  # rank 0 validates and writes; a failure there stops every rank
            if ctx.is_main:
                if val is not None:
                    record["val"] = accuracy_by_budget(module, head, val, budgets, device=device)
                save_aggregator(out, module, meta=meta, extra={"optimizer": optimizer.state_dict(),
                                                               "scheduler": scheduler.state_dict(), "epoch": epoch,
                                                               "history": history})
                if cb.on_epoch_end is not None:
                    cb.on_epoch_end(record)
    with together(ctx):
        if export is not None and ctx.is_main:
            save_aggregator(export, module, meta={**meta, "history": history})
    return module.eval()
