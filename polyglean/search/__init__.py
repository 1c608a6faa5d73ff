"""Best-first phase search: criteria (a registry) and the batched, prefix-sharing search."""

from polyglean.search.criteria import CRITERIA, Criterion, DeltaCriterion, EntropyCriterion, RandomCriterion
from polyglean.search.engine import PhaseSearch, SearchResult

__all__ = ["CRITERIA", "Criterion", "DeltaCriterion", "EntropyCriterion", "PhaseSearch", "RandomCriterion",
           "SearchResult"]
