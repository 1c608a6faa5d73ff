"""Uncertainty of a difference measured on the same images: paired bootstrap intervals and McNemar's exact test.

A gain is a gain only when its interval excludes zero. Both functions take per-image values of two methods on the
same images (in the same order).

Example:
    >>> import torch
    >>> a = torch.tensor([1, 1, 0, 1, 0, 1, 1, 0] * 50, dtype=torch.bool)
    >>> b = torch.tensor([1, 1, 1, 1, 0, 1, 1, 1] * 50, dtype=torch.bool)
    >>> d = paired_bootstrap(a.float(), b.float(), seed=0)
    >>> round(d.delta, 4), d.low > 0
    (0.25, True)
    >>> mcnemar(a, b).p_value < 1e-6
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from polyglean.errors import ArgumentError

__all__ = ["Difference", "McNemar", "mcnemar", "paired_bootstrap"]


@dataclass(frozen=True)
class Difference:
    """``delta`` = statistic(b) − statistic(a) with a ``level`` percentile-bootstrap interval [low, high]."""

    delta: float
    low: float
    high: float
    level: float
    resamples: int

    @property
    def significant(self) -> bool:
        """True when the interval excludes zero."""
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "significant": self.significant}


@dataclass(frozen=True)
class McNemar:
    """McNemar's exact (binomial) two-sided test on the discordant pairs: fixed (a wrong, b right), broken."""

    fixed: int
    broken: int
    p_value: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape or a.ndim != 1:
        raise ArgumentError(f"paired values must be two 1-D tensors of one length, got {tuple(a.shape)} and "
                            f"{tuple(b.shape)}")
    if a.numel() == 0:
        raise ArgumentError("paired values are empty: no images to compare")


def paired_bootstrap(a: Tensor, b: Tensor, statistic: Callable[[Tensor], Tensor] | None = None, *,
                     resamples: int = 2000, level: float = 0.95, seed: int = 0) -> Difference:
    """Percentile bootstrap over images of ``statistic(b) - statistic(a)``.

    Args:
        a: per-image values of the reference (e.g. 1.0 where top-1 is right, or the per-image NLL).
        b: per-image values of the method, same images, same order.
        statistic: maps a ``(R, N)`` batch of resampled values to ``(R,)``; default the mean over images.
        resamples: number of bootstrap resamples.
        level: coverage of the interval.
        seed: seed of the resampling (results are reproducible).

    Shape:
        a, b: ``(N,)``.
    """
    _check_pair(a, b)
    if not 0 < level < 1:
        raise ArgumentError(f"level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ArgumentError(f"resamples must be positive, got {resamples}")
    stat = statistic or (lambda v: v.mean(dim=-1))
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    delta = float(stat(b64[None]) - stat(a64[None]))
    gen = torch.Generator().manual_seed(seed)
    diffs = []
    for start in range(0, resamples, 500):  # chunks keep memory at 500 x N
        idx = torch.randint(0, a64.numel(), (min(500, resamples - start), a64.numel()), generator=gen)
        diffs.append(stat(b64[idx]) - stat(a64[idx]))
    d = torch.cat(diffs)
    tail = (1 - level) / 2
    low, high = torch.quantile(d, torch.tensor([tail, 1 - tail], dtype=d.dtype)).tolist()
    return Difference(delta=delta, low=low, high=high, level=level, resamples=resamples)


def mcnemar(a_correct: Tensor, b_correct: Tensor) -> McNemar:
    """McNemar's exact test that methods a and b have the same accuracy on the same images.

    Shape:
        a_correct, b_correct: ``(N,)`` booleans, True where the method is right.
    """
    _check_pair(a_correct, b_correct)
    a, b = a_correct.bool().cpu(), b_correct.bool().cpu()
    fixed = int((~a & b).sum())
    broken = int((a & ~b).sum())
    n, k = fixed + broken, min(fixed, broken)
    if n == 0:
        return McNemar(fixed=0, broken=0, p_value=1.0)
    # two-sided exact binomial test with p = 1/2, in log space for large n
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(logs)
    p = 2 * math.exp(top) * sum(math.exp(v - top) for v in logs)
    return McNemar(fixed=fixed, broken=broken, p_value=min(1.0, p))
