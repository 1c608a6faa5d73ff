"""Alignment of candidate feature maps and the aggregators that combine candidates."""

from polyglean.aggregate.aggregators import (
    AGGREGATORS,
    Aggregator,
    EntropyAggregator,
    MeanAggregator,
    normalized_entropy,
)
from polyglean.aggregate.align import align, alignment_factor, displacement

__all__ = ["AGGREGATORS", "Aggregator", "EntropyAggregator", "MeanAggregator", "align", "alignment_factor",
           "displacement", "normalized_entropy"]
