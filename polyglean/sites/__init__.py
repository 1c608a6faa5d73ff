"""Finding subsampling sites by rule: op kinds (one file each), tracing, and grouping into sites."""

from polyglean.sites import conv, patch_merge, pool, slicing  # noqa: F401  (register the built-in op kinds)
from polyglean.sites.discover import Discovery, Site, UnsupportedOpError, discover
from polyglean.sites.ops import PhaseOp, match_function, match_module, register_function_op, register_module_op
from polyglean.sites.trace import TraceError, trace

__all__ = [
    "Discovery",
    "PhaseOp",
    "Site",
    "TraceError",
    "UnsupportedOpError",
    "discover",
    "match_function",
    "match_module",
    "register_function_op",
    "register_module_op",
    "trace",
]
