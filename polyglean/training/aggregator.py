"""Training the learned aggregator on a frozen model: cached candidates, then cheap epochs.

The candidates of every training image are found once by the search with the random criterion (as the paper
trains) and their final feature maps cached; the search adds candidates in order, so the first ``b`` cached
candidates are exactly what a random search with budget ``b`` aggregates. Each training batch draws a budget, so
one module learns to aggregate any number of candidates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from polyglean.aggregate.align import align as align_features
from polyglean.aggregate.learned import AttentionAggregator, save_atomic
from polyglean.search import PhaseSearch

__all__ = ["CandidateSet", "accuracy_by_budget", "collect_candidates", "cosine_schedule", "train_epoch"]


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
        """Writes the set atomically (temporary file, then rename)."""
        save_atomic({"features": self.features, "shift": self.shift, "labels": self.labels, "meta": self.meta}, path)

    @classmethod
    def load(cls, path: str | Path) -> CandidateSet:
        """Reads a set written by :meth:`save` (``weights_only=True``, memory-mapped)."""
        d = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
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
        raise ValueError("collecting candidates needs a search that aggregates feature maps")
    feats: list[Tensor] = []
    shifts: list[Tensor] = []
    labels: list[Tensor] = []
    for x, y in batches:
        result = search.run(x)
        feats.append(result.features.to(torch.float16))
        shifts.append(result.shift.clone())
        labels.append(y.clone())
        if on_batch is not None:
            on_batch(len(y))
    if not labels:
        raise ValueError("no images to collect candidates from")
    return CandidateSet(torch.cat(feats), torch.cat(shifts), torch.cat(labels))


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
            raise ValueError(f"budget {b} out of range for {data.budget} cached candidates")
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
