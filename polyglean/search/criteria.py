"""Criteria that order the best-first search (lower score = expanded first): a registry."""

from __future__ import annotations

import torch
from torch import Tensor

from polyglean.aggregate.aggregators import normalized_entropy
from polyglean.registry import Registry

__all__ = ["CRITERIA", "Criterion", "DeltaCriterion", "EntropyCriterion", "RandomCriterion"]


class Criterion:
    """Scores candidates; the search expands the lowest score first.

    ``score(logits, shift, generator)`` scores new candidates once, when they are created. A criterion whose
    scores depend on the other candidates (e.g. attention they receive) sets ``rescore = True`` and is called on
    all of an image's candidates after each expansion, so the queue always orders by current scores.

    Shape:
        - logits: ``(M, K)``
        - shift: ``(M, 2)`` displacement ``(Δy, Δx)``
        - output: ``(M,)``
    """

    rescore: bool = False

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
        return torch.rand(logits.shape[0], generator=generator)


@CRITERIA.register("delta")
class DeltaCriterion(Criterion):
    """The displacement ``Δx + Δy``: the states closest to the default first."""

    def score(self, logits: Tensor, shift: Tensor, generator: torch.Generator) -> Tensor:
        return shift.sum(-1).float()
