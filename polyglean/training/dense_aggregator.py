"""Training the learned map aggregator of a frozen segmentation model (``polyglean train-aggregator --labels``).

As for classifiers (:mod:`polyglean.training.aggregator`): every training image's candidates are found once by the
dense search with the random criterion, then the attention module is trained with AdamW and a cosine schedule, each
step aggregating the first ``b`` candidates, ``b`` drawn from ``[2, budget]``, so one module serves every budget.

What differs is the unit: the module attends over the candidates of one pixel, so a pixel is a training sample.
Full-resolution candidate maps of a whole training set do not fit in memory (CamVid: 367 images x 16 candidates x
12 channels x 360 x 480 in float16 is 24 GB), so **a fixed random sample of labelled pixels is kept per image**
(``pixels_per_image``; their aligned candidate logits, coverage and label): training on them is training on the
full maps with a pixel-subsampled loss, since no token sees another pixel.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from polyglean.aggregate.dense import TASK, displacement_grid
from polyglean.aggregate.learned import AttentionAggregator, model_fingerprint, save_aggregator
from polyglean.data import make_loader
from polyglean.data.datasets import parse_subset, subset_dataset
from polyglean.data.segmentation import SegmentationDataset
from polyglean.errors import ArgumentError
from polyglean.io import check_writable, load_torch, write_torch
from polyglean.models import get_preset, load_model
from polyglean.phase.net import PhaseNet
from polyglean.provenance import machine
from polyglean.search.dense import DenseSearch, align_maps
from polyglean.training.aggregator import AggregatorCallbacks, cosine_schedule

__all__ = ["DenseAggregatorSettings", "PixelSet", "collect_pixels", "pixel_accuracy_by_budget",
           "train_dense_aggregator"]


@dataclass(frozen=True)
class DenseAggregatorSettings:
    """Everything a learned map-aggregator run depends on.

    ``batch_size`` counts pixels per optimiser step; ``pixels_per_image`` labelled pixels are sampled per image.
    """

    model: str
    data: str
    labels: str
    subset: str | None = None
    holdout: int = 0
    budget: int = 30
    epochs: int = 10
    batch_size: int = 4096
    lr: float = 1e-3
    weight_decay: float = 0.05
    dim: int = 32
    heads: int = 4
    align: bool = True
    search_space: tuple[str, ...] | None = None
    seed: int = 0
    pixels_per_image: int = 4096
    weights: str | None = None
    pretrained: bool = False
    random_weights: int | None = None

    def check(self) -> None:
        """Refuses out-of-range settings before any work.

        Raises:
            ArgumentError: naming the option and its value.
        """
        for flag in ("epochs", "batch_size", "budget", "dim", "heads", "pixels_per_image"):
            if getattr(self, flag) < 1:
                raise ArgumentError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(self, flag)}")
        if self.dim % self.heads:
            raise ArgumentError(f"--heads ({self.heads}) must divide --dim ({self.dim})")
        if self.lr <= 0:
            raise ArgumentError(f"--lr must be > 0, got {self.lr}")
        if self.holdout < 0:
            raise ArgumentError(f"--holdout must be >= 0, got {self.holdout}")
        for flag, folder in (("--data", self.data), ("--labels", self.labels)):
            if not Path(folder).is_dir():
                raise ArgumentError(f"{flag} folder not found: {folder}")


@dataclass
class PixelSet:
    """Sampled pixels of a set of images with their candidates.

    Attributes:
        features: ``(M, B, K)`` float16, each candidate's (aligned) logits at the pixel, in search order.
        valid: ``(M, B)`` bool, whether the candidate covers the pixel (border rule).
        image: ``(M,)`` the image each pixel comes from (index into ``shift``).
        shift: ``(N, B, 2)`` the candidates' displacements per image, in input pixels.
        labels: ``(M,)`` the true class.
        meta: What produced them (a cache key).
    """

    features: Tensor
    valid: Tensor
    image: Tensor
    shift: Tensor
    labels: Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def budget(self) -> int:
        return self.features.shape[1]

    def save(self, path: str | Path) -> None:
        write_torch(path, {"features": self.features, "valid": self.valid, "image": self.image, "shift": self.shift,
                           "labels": self.labels, "meta": self.meta})

    @classmethod
    def load(cls, path: str | Path) -> PixelSet:
        d = load_torch(path, "pixel cache")
        return cls(d["features"], d["valid"], d["image"], d["shift"], d["labels"], d["meta"])

    def split_images(self, first: int) -> tuple[PixelSet, PixelSet]:
        """The pixels of images ``[0, first)`` and those of the rest."""
        a = self.image < first
        return (PixelSet(self.features[a], self.valid[a], self.image[a], self.shift, self.labels[a], self.meta),
                PixelSet(self.features[~a], self.valid[~a], self.image[~a], self.shift, self.labels[~a], self.meta))


@torch.no_grad()
def collect_pixels(search: DenseSearch, dataset: Any, *, pixels_per_image: int, ignore_index: int | None,
                   align: bool, seed: int, on_batch: Any = None) -> PixelSet:
    """Runs ``search`` (random criterion) on every image and keeps ``pixels_per_image`` random labelled pixels.

    Each image's pixels are drawn with a generator seeded by ``seed`` and the image's position, so the sample does
    not depend on the batching.
    """
    param = next(search.net.model.parameters())
    feats, valids, images, shifts, labels = [], [], [], [], []
    done = 0
    for x, y in make_loader(dataset, batch_size=1, workers=0):
        result = search.run(x.to(param.device))
        maps, shift = result.candidate_logits[:, :search.budget], result.shift[:, :search.budget]
        n, b = maps.shape[:2]
        if align:
            flat, cover = align_maps(maps.flatten(0, 1), shift.reshape(-1, 2))
            maps, cover = flat.reshape(maps.shape), cover.reshape(n, b, *maps.shape[-2:])
        else:
            cover = torch.ones(n, b, *maps.shape[-2:], dtype=torch.bool, device=maps.device)
        for i in range(n):
            target = y[i].flatten()
            keep = torch.arange(target.numel()) if ignore_index is None else (target != ignore_index).nonzero()[:, 0]
            g = torch.Generator().manual_seed(seed * 1_000_003 + done + i)
            pick = keep[torch.randperm(keep.numel(), generator=g)[:pixels_per_image]]
            feats.append(maps[i].flatten(2)[..., pick.to(maps.device)].permute(2, 0, 1).to(torch.float16).cpu())
            valids.append(cover[i].flatten(1)[:, pick.to(maps.device)].t().cpu())
            images.append(torch.full((pick.numel(),), done + i, dtype=torch.long))
            labels.append(target[pick].long())
            shifts.append(shift[i].cpu())
        done += n
        if on_batch is not None:
            on_batch(n)
    if not labels:
        raise ArgumentError("no images to collect candidates from")
    return PixelSet(torch.cat(feats), torch.cat(valids), torch.cat(images), torch.stack(shifts), torch.cat(labels))


def _logits(module: AttentionAggregator | None, data: PixelSet, idx: Tensor, b: int, device: torch.device) -> Tensor:
    """The aggregate of the first ``b`` candidates at pixels ``idx``: ``(len(idx), K)`` (module None: the mean of
    the covering candidates)."""
    f = data.features[idx, :b].float().to(device)  # (P, b, K)
    m = data.valid[idx, :b].to(device)
    if module is None:
        w = m.float()[..., None]
        return (f * w).sum(1) / w.sum(1)
    shift = data.shift[data.image[idx], :b].to(device)
    out = module.attend(f[..., None, None], shift, mask=m[..., None])[0]  # (P, K, 1, 1)
    return out[:, :, 0, 0]


@torch.no_grad()
def pixel_accuracy_by_budget(module: AttentionAggregator | None, data: PixelSet, budgets: list[int],
                             device: torch.device | str = "cpu", chunk: int = 65536) -> dict[int, dict[str, float]]:
    """Pixel accuracy (%) and NLL on the sampled pixels per budget (``module=None``: the plain mean)."""
    out = {}
    dev = torch.device(device)
    for b in budgets:
        correct, nll = 0, 0.0
        for i in range(0, len(data), chunk):
            idx = torch.arange(i, min(i + chunk, len(data)))
            z = _logits(module, data, idx, b, dev)
            y = data.labels[idx].to(dev)
            correct += int((z.argmax(1) == y).sum())
            nll += float(F.cross_entropy(z, y, reduction="sum"))
        out[b] = {"pixel_acc": 100.0 * correct / max(len(data), 1), "nll": nll / max(len(data), 1)}
    return out


def _files_key(dataset: Any) -> str:
    """SHA-256 of the image and label files (real path, size, modification time), in order."""
    indices = list(range(len(dataset)))
    base = dataset
    while hasattr(base, "indices"):
        indices = [int(base.indices[i]) for i in indices]
        base = base.dataset
    h = hashlib.sha256()
    for i in indices:
        for p in base.samples[i]:
            st = p.stat()
            h.update(f"{os.path.realpath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def train_dense_aggregator(settings: DenseAggregatorSettings, out: str | Path, *, cache: str | Path | None = None,
                           overwrite: bool = False, export: str | Path | None = None,
                           callbacks: AggregatorCallbacks | None = None) -> AttentionAggregator:
    """Trains the learned map aggregator of a frozen segmentation model on the CPU; writes a checkpoint (the
    classification aggregator's format, ``meta["task"] = "segmentation"``) atomically after every epoch.

    Raises:
        ArgumentError: bad settings, or ``out`` exists without ``overwrite``.
        DataError: unreadable images or label maps.
    """
    cb = callbacks or AggregatorCallbacks()
    settings.check()
    if Path(out).exists() and not overwrite:
        raise ArgumentError(f"{out} exists: pass --overwrite to replace it")
    check_writable(out, "--out")
    if export is not None:
        check_writable(export, "--export")
    if cache is not None:
        check_writable(Path(cache) / "pixels-probe.pt", "--cache")
    preset = get_preset(settings.model)
    if preset.task != TASK:
        raise ArgumentError(f"{settings.model} is not a segmentation model: train its aggregator without --labels")
    model, preprocess = load_model(settings.model, settings.weights, pretrained=settings.pretrained,
                                   random_weights=settings.random_weights)
    for p in model.parameters():
        p.requires_grad_(False)
    net = PhaseNet(model, input_size=preprocess.input_size)
    space = list(settings.search_space) if settings.search_space else None
    probe = DenseSearch(net, budget=1, search_space=space)
    budget = min(settings.budget, probe.num_states)
    if budget < 2:
        raise ArgumentError("the search space has a single state: there is nothing to aggregate")
    if budget < settings.budget and cb.on_note is not None:
        cb.on_note(f"the search space {[s.name for s in probe.search_space]} has {probe.num_states} states: "
                   f"training with budget {budget}")
    search = DenseSearch(net, budget=budget, criterion="random", aggregate="mean", align=False, search_space=space,
                         seed=settings.seed)
    dataset: Any = SegmentationDataset(settings.data, settings.labels, preprocess, num_classes=preset.num_classes,
                                       ignore_index=preset.ignore_index)
    if settings.subset:
        dataset = subset_dataset(dataset, *parse_subset(settings.subset))
    fingerprint = model_fingerprint(model)
    meta = {"model": settings.model, "model_sha256": fingerprint, "sites": [s.name for s in net.sites],
            "search_space": [s.name for s in search.search_space], "align": settings.align, "task": TASK}
    key = {**meta, "budget": budget, "seed": settings.seed, "criterion": "random",
           "data": str(Path(settings.data).resolve()), "labels": str(Path(settings.labels).resolve()),
           "subset": settings.subset, "pixels_per_image": settings.pixels_per_image, "files": _files_key(dataset)}
    path = None
    pixels = None
    if cache is not None:
        path = Path(cache) / f"pixels-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.pt"
        if path.is_file():
            hit = PixelSet.load(path)
            pixels = hit if hit.meta == key else None
    if pixels is None:
        on_batch = cb.on_collect("training", len(dataset)) if cb.on_collect is not None else None
        pixels = collect_pixels(search, dataset, pixels_per_image=settings.pixels_per_image,
                                ignore_index=preset.ignore_index, align=settings.align, seed=settings.seed,
                                on_batch=on_batch)
        pixels.meta = key
        if path is not None:
            pixels.save(path)
    train, val = pixels, None
    if settings.holdout:
        if not 0 < settings.holdout < len(dataset):
            raise ArgumentError(f"--holdout must be between 1 and {len(dataset) - 1} (the training images), got "
                                f"{settings.holdout}")
        train, val = pixels.split_images(len(dataset) - settings.holdout)
    grid = displacement_grid(search.search_space, net.sites)
    channels = pixels.features.shape[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        module = AttentionAggregator(channels, grid, dim=settings.dim, heads=settings.heads)
    budgets = sorted({b for b in (1, 2, 4, 10, budget) if b <= budget})
    baseline = pixel_accuracy_by_budget(None, val, budgets) if val is not None else None
    if baseline is not None and cb.on_note is not None:
        cb.on_note("held-out pixels, plain mean: " + "  ".join(f"B={b} {v['pixel_acc']:.2f}"
                                                              for b, v in baseline.items()))
    optimizer = torch.optim.AdamW(module.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps = -(-len(train) // settings.batch_size)
    scheduler = cosine_schedule(optimizer, settings.epochs * steps, warmup=min(100, steps))
    setup = {"train": {"data": settings.data, "labels": settings.labels, "subset": settings.subset,
                       "images": len(dataset) - settings.holdout, "pixels": len(train),
                       "pixels_per_image": settings.pixels_per_image},
             "holdout": settings.holdout, "budget": budget, "epochs": settings.epochs,
             "batch_size_pixels": settings.batch_size, "lr": settings.lr, "weight_decay": settings.weight_decay,
             "seed": settings.seed, "criterion": "random", "machine": machine()}
    meta = {**meta, "training": setup, "val_baseline": baseline}
    history: list[dict[str, Any]] = []
    for epoch in range(settings.epochs):
        if cb.on_epoch_start is not None:
            cb.on_epoch_start(epoch + 1, settings.epochs, steps)
        tick = time.perf_counter()
        g = torch.Generator().manual_seed(settings.seed * 1000 + epoch)
        order = torch.randperm(len(train), generator=g)
        module.train()
        total = 0.0
        for i in range(0, len(train), settings.batch_size):
            idx = order[i:i + settings.batch_size]
            b = int(torch.randint(2, budget + 1, (1,), generator=g))
            loss = F.cross_entropy(_logits(module, train, idx, b, torch.device("cpu")), train.labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(idx)
            if cb.on_step is not None:
                cb.on_step(loss.item())
        module.eval()
        record: dict[str, Any] = {"epoch": epoch + 1, "loss": total / len(train),
                                  "seconds": time.perf_counter() - tick}
        if val is not None:
            record["val"] = pixel_accuracy_by_budget(module, val, budgets)
        history.append(record)
        save_aggregator(out, module, meta={**meta, "history": history})
        if cb.on_epoch_end is not None:
            cb.on_epoch_end(record)
    if export is not None:
        save_aggregator(export, module, meta={**meta, "history": history})
    return module.eval()
