"""One error family for the library: what a user can fix, as opposed to a bug.

Every error the library raises on purpose for bad input (data, checkpoints, models, options) derives from
:class:`PolygleanError`; the command line prints those as one line and lets every other exception show its
traceback. Each class also derives from the built-in it refines (``ValueError``, ``RuntimeError``), so code that
catches the built-in keeps working.

Example:
    >>> from polyglean.errors import DataError, PolygleanError
    >>> issubclass(DataError, PolygleanError) and issubclass(DataError, ValueError)
    True
"""

from __future__ import annotations

__all__ = [
    "ArgumentError",
    "CheckpointError",
    "DataError",
    "ModelError",
    "NotFoundError",
    "PolygleanError",
    "TraceError",
    "UnsupportedOpError",
    "WeightsUnavailableError",
]


class PolygleanError(Exception):
    """Base of every error that is the user's to fix (bad input, data, checkpoint, model or option)."""


class ArgumentError(PolygleanError, ValueError):
    """An option or argument that is out of range, ambiguous, or not honoured by the path that would take it."""


class DataError(PolygleanError, ValueError):
    """A data set that cannot be read as described: missing files, bad labels, corrupt images."""


class NotFoundError(PolygleanError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class CheckpointError(PolygleanError, ValueError):
    """A checkpoint that cannot be read, or whose keys, shapes or recorded settings do not match."""


class ModelError(PolygleanError, ValueError):
    """A model that cannot be built, loaded, traced or run as asked (unknown name, unsupported structure)."""


class TraceError(ModelError, RuntimeError):
    """The model (or a part of it) cannot be traced by torch.fx."""


class UnsupportedOpError(ModelError):
    """A part of the model subsamples in a way no registered op kind can run at other phases."""


class WeightsUnavailableError(ModelError, RuntimeError):
    """Weights that are neither on disk nor downloadable (usually: offline)."""
