"""polyglean: better test-time predictions by gleaning the activations subsampling layers discard."""

from polyglean.aggregate import AttentionAggregator, load_aggregator
from polyglean.layers import swap, swap_key_map
from polyglean.models import list_models, load_model
from polyglean.phase.net import PhaseNet, Phases
from polyglean.search import PhaseSearch, SearchResult
from polyglean.sites import (
    PhaseOp,
    Site,
    TraceError,
    UnsupportedOpError,
    discover,
    register_function_op,
    register_module_op,
)

__version__ = "0.1.0"

__all__ = [
    "AttentionAggregator",
    "PhaseNet",
    "PhaseOp",
    "PhaseSearch",
    "SearchResult",
    "Phases",
    "Site",
    "TraceError",
    "UnsupportedOpError",
    "__version__",
    "discover",
    "list_models",
    "load_aggregator",
    "load_model",
    "register_function_op",
    "register_module_op",
    "swap",
    "swap_key_map",
]
