"""polyglean: better test-time predictions by gleaning the activations subsampling layers discard."""

from polyglean.phase.net import PhaseNet, Phases
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
    "PhaseNet",
    "PhaseOp",
    "Phases",
    "Site",
    "TraceError",
    "UnsupportedOpError",
    "__version__",
    "discover",
    "register_function_op",
    "register_module_op",
]
