"""Best-first phase search: criteria (a registry) and the batched, prefix-sharing search."""

from polyglean.search.criteria import CRITERIA, Criterion, DeltaCriterion, EntropyCriterion, RandomCriterion
from polyglean.search.engine import PhaseSearch, SearchResult, default_search_space
from polyglean.search.stop import STOP_RULES, StopRule, calibrate_stop, parse_stop

__all__ = ["CRITERIA", "Criterion", "DeltaCriterion", "EntropyCriterion", "PhaseSearch", "RandomCriterion",
           "STOP_RULES", "SearchResult", "StopRule", "calibrate_stop", "default_search_space", "parse_stop"]
