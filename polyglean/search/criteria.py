"""Criteria that order the best-first search (lower score = expanded first): a registry."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from polyglean.aggregate.aggregators import normalized_entropy
from polyglean.registry import Registry

__all__ = ["CRITERIA", "Criterion", "DeltaCriterion", "EntropyCriterion", "LearnedCriterion", "RandomCriterion"]


class Criterion:
    """Scores candidates; the search expands the lowest score first.

    ``score(logits, shift, generator)`` scores new candidates once, when they are created. A criterion whose
    scores depend on the other candidates (e.g. attention they receive) sets ``rescore = True`` and is called on
    all of an image's candidates after each expansion, so the queue always orders by current scores. A criterion
    with ``needs_features = True`` then also gets the candidates' final feature maps (aligned if the search aligns)
    as ``features=(M, ...)``.

    Shape:
        - logits: ``(M, K)``
        - shift: ``(M, 2)`` displacement ``(Δy, Δx)``
        - output: ``(M,)``
    """

    rescore: bool = False
    needs_features: bool = False

    def score(self, logits: Tensor, shift: Tensor, generator: torch.Generator) -> Tensor:
        raise NotImplementedError


CRITERIA: Registry[type[Criterion]] = Registry("criterion")


@CRITERIA.register("entropy")
class EntropyCriterion(Criterion):
    """Normalised prediction entropy ``H(softmax(z)) / log K``: the most confident candidate is expanded first."""

    def score(self, logits: Tensor, shift: Tensor, generator: torch.Generator) -> Tensor:
        return normalized_entropy(logits)


@CRITERIA.register("random")
class RandomCriterion(Criterion):
    """A random order (seeded)."""

    def score(self, logits: Tensor, shift: Tensor, generator: torch.Generator) -> Tensor:
        return torch.rand(logits.shape[0], generator=generator, device=generator.device).to(logits.device)


@CRITERIA.register("delta")
class DeltaCriterion(Criterion):
    """The displacement ``Δx + Δy``: the states closest to the default first."""

    def score(self, logits: Tensor, shift: Tensor, generator: torch.Generator) -> Tensor:
        return shift.sum(-1).float()


@CRITERIA.register("learned")
class LearnedCriterion(Criterion):
    """``1 / mean attention received`` in the learned aggregator: the candidates the others attend to most are
    expanded first. It rescores every candidate of an image after each expansion.

    Args:
        module: The trained :class:`~polyglean.aggregate.learned.AttentionAggregator`; when ``None``, the search binds
            the one it aggregates with.
    """

    rescore = True
    needs_features = True

    def __init__(self, module: Any = None) -> None:
        self.module = module

    def score(self, logits: Tensor, shift: Tensor, generator: torch.Generator,
              features: Tensor | None = None) -> Tensor:
        if features is None:  # scored again with the features right after the expansion
            return logits.new_zeros(logits.shape[0], dtype=torch.float32)
        if self.module is None:
            raise ValueError("the learned criterion has no aggregator module; use aggregate='learned' or pass "
                             "LearnedCriterion(module)")
        _, received = self.module.attend(features[None], shift[None])
        return 1.0 / received[0].clamp_min(1e-12)
