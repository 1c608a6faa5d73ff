"""Alignment of candidate feature maps and the aggregators that combine candidates (mean, entropy, learned)."""

from polyglean.aggregate.aggregators import (
    AGGREGATORS,
    Aggregator,
    EntropyAggregator,
    MeanAggregator,
    normalized_entropy,
)
from polyglean.aggregate.align import align, align_static, alignment_factor, displacement
from polyglean.aggregate.learned import (
    AggregatorCheckpointError,
    AttentionAggregator,
    load_aggregator,
    model_fingerprint,
    save_aggregator,
    shipped_aggregator,
)

__all__ = ["AGGREGATORS", "Aggregator", "AggregatorCheckpointError", "AttentionAggregator", "EntropyAggregator",
           "MeanAggregator", "align", "align_static", "alignment_factor", "displacement", "load_aggregator", "model_fingerprint",
           "normalized_entropy", "save_aggregator", "shipped_aggregator"]
