"""Choosing the states of a :class:`~polyglean.export.PhaseEnsemble` on held-out data: greedy forward selection.

The default state is always in. Each step adds the state of the pool whose aggregation with the states chosen so
far scores best on the fit data (lowest NLL, or highest top-1 with NLL breaking ties), exactly as the ensemble will
compute it (aligned final feature maps, mean or entropy weights, the model's head). The pool is every state of the
search space when it has at most ``pool_size`` states; otherwise the ``pool_size`` states that the phase search
(criterion entropy, the largest budget it allows up to 15) keeps most often on the fit data.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from polyglean.aggregate import align_static, normalized_entropy
from polyglean.errors import ArgumentError, DataError
from polyglean.export.ensemble import PhaseEnsemble, State
from polyglean.phase.net import PhaseNet

__all__ = ["Selection", "collect_features", "search_pool", "select_states", "space_states"]

METRICS = ("nll", "accuracy")


@dataclass
class Selection:
    """The states chosen, in the order they were added, with the fit-data score after each addition.

    Attributes:
        states: One flat phase index per site, the default state first.
        nll: Mean NLL of the aggregate after each addition (``nll[0]`` is the plain model's).
        top1: Top-1 (percent) after each addition.
        pool: The states that were candidates.
        metric: What the greedy step optimised.
        images: Number of fit images.
    """

    states: list[State]
    nll: list[float]
    top1: list[float]
    pool: list[State]
    metric: str
    images: int
    site_names: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"states": [list(s) for s in self.states], "nll": self.nll, "top1": self.top1,
                "pool": [list(s) for s in self.pool], "metric": self.metric, "images": self.images,
                "sites": self.site_names}


def space_states(net: PhaseNet, search_space: Sequence[str | int]) -> list[State]:
    """Every state of a search space, the default first (other sites at phase 0)."""
    sites = [net.site(k) for k in search_space]
    states = []
    for combo in itertools.product(*[range(s.num_phases) for s in sites]):
        st = [0] * len(net.sites)
        for s, p in zip(sites, combo):
            st[s.index] = p
        states.append(tuple(st))
    return states


def search_pool(net: PhaseNet, batches: Iterable[Tensor], search_space: Sequence[str | int], size: int) -> list[State]:
    """The ``size`` states the phase search keeps most often (criterion entropy), the default first."""
    from polyglean.search import PhaseSearch  # the search sits above phase/, like this module

    search = PhaseSearch(net, budget=1, criterion="entropy", aggregate="mean", search_space=search_space)
    budget = min(15, search.num_states)
    search = PhaseSearch(net, budget=budget, criterion="entropy", aggregate="mean", search_space=search_space)
    counts: Counter[State] = Counter()
    for x in batches:
        result = search.run(x, budgets=[budget])
        counts.update(tuple(s) for s in result.states.flatten(0, 1).tolist())
    zero = tuple([0] * len(net.sites))
    ranked = [zero] + [s for s, _ in counts.most_common() if s != zero]
    return ranked[:size]


@torch.no_grad()
def collect_features(net: PhaseNet, batches: Iterable[tuple[Tensor, Tensor]], pool: Sequence[State], *,
                     align: bool = True, dtype: torch.dtype = torch.float16,
                     progress: Callable[[int], None] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Aligned final feature maps and logits of every pool state on every image.

    Returns:
        features ``(N, P, ...)`` stored as ``dtype``, logits ``(N, P, K)`` (float32) and labels ``(N,)``.
    """
    runner = PhaseEnsemble(net, pool, align=align)
    feats, logits, labels = [], [], []
    for x, y in batches:
        if x.shape[1:] != torch.Size(net.input_size):
            raise DataError(f"fit images have shape {tuple(x.shape[1:])} but the model takes {net.input_size}")
        per_state = []
        per_logits = []
        for f, d in zip(runner.state_features(x), runner.shifts):
            per_logits.append(net.head(f).float())
            if align and d != (0, 0):
                f = align_static(f, d, runner.factor, net.feature_dims)
            per_state.append(f.to(dtype))
        feats.append(torch.stack(per_state, 1))
        logits.append(torch.stack(per_logits, 1))
        labels.append(y)
        if progress is not None:
            progress(x.shape[0])
    if not feats:
        raise DataError("no fit images: the fit data set is empty")
    return torch.cat(feats), torch.cat(logits), torch.cat(labels)


def _score(net: PhaseNet, combined: Tensor, labels: Tensor, chunk: int) -> tuple[float, float]:
    nll = 0.0
    right = 0
    for i in range(0, combined.shape[0], chunk):
        z = net.head(combined[i:i + chunk].float()).float()
        nll += float(F.cross_entropy(z, labels[i:i + chunk].to(z.device), reduction="sum"))
        right += int((z.argmax(-1) == labels[i:i + chunk].to(z.device)).sum())
    n = combined.shape[0]
    return nll / n, 100.0 * right / n


@torch.no_grad()
def select_states(net: PhaseNet, features: Tensor, logits: Tensor, labels: Tensor, pool: Sequence[State], k: int,
                  *, metric: str = "nll", aggregate: str = "mean", chunk: int = 256) -> Selection:
    """Greedy forward selection of ``k`` states from ``pool`` (``pool[0]`` must be the default state).

    Args:
        net: The model's :class:`PhaseNet`.
        features: Aligned final feature maps of every pool state, ``(N, P, ...)`` (:func:`collect_features`).
        logits: Each pool state's own logits ``(N, P, K)`` (for entropy weights).
        labels: ``(N,)``.
        pool: The candidate states; the first is the default.
        k: Number of states to choose, default included.
        metric: ``"nll"`` (lower is better) or ``"accuracy"`` (higher; NLL breaks ties).
        aggregate: ``"mean"`` or ``"entropy"``.
    """
    if metric not in METRICS:
        raise ArgumentError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if aggregate not in ("mean", "entropy"):
        raise ArgumentError(f"aggregate must be 'mean' or 'entropy', got {aggregate!r}")
    if any(pool[0]):
        raise ArgumentError("the first state of the pool must be the default state (all phases 0)")
    if not 1 <= k <= len(pool):
        raise ArgumentError(f"--states {k} out of range: the pool has {len(pool)} states, so 1 <= K <= {len(pool)}")
    if features.shape[1] != len(pool):
        raise ArgumentError(f"features hold {features.shape[1]} states but the pool has {len(pool)}")
    weights = (1.0 - normalized_entropy(logits)).clamp_min(1e-12) if aggregate == "entropy" \
        else torch.ones(logits.shape[:2], device=logits.device)
    shape = (-1, *([1] * (features.dim() - 2)))
    chosen = [0]
    total = features[:, 0].float() * weights[:, 0].reshape(shape)
    wsum = weights[:, 0].clone()
    nll0, top0 = _score(net, total / wsum.reshape(shape), labels, chunk)
    nlls, tops = [nll0], [top0]
    while len(chosen) < k:
        best: tuple[float, float, int] | None = None
        for j in range(len(pool)):
            if j in chosen:
                continue
            w = weights[:, j]
            cand = (total + features[:, j].float() * w.reshape(shape)) / (wsum + w).reshape(shape)
            nll, top = _score(net, cand, labels, chunk)
            key = (nll, -top) if metric == "nll" else (-top, nll)
            if best is None or key < best[:2]:
                best = (*key, j)
        assert best is not None
        j = best[2]
        chosen.append(j)
        total = total + features[:, j].float() * weights[:, j].reshape(shape)
        wsum = wsum + weights[:, j]
        nll, top = _score(net, total / wsum.reshape(shape), labels, chunk)
        nlls.append(nll)
        tops.append(top)
    return Selection(states=[tuple(pool[j]) for j in chosen], nll=nlls, top1=tops, pool=[tuple(p) for p in pool],
                     metric=metric, images=int(labels.shape[0]), site_names=[s.name for s in net.sites])
