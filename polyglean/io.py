"""One atomic writer and one checked loader for every file the library writes or reads back.

Writes go to a recognisably named temporary file beside the target (``.NAME.polyglean-tmp-XXXX``), which is renamed
over the target only when complete: a killed write never leaves half a file, and its leftover is easy to find and
is removed by the next write to the same target. The file gets the mode of the file it replaces, or the umask
default for a new one (``mkstemp`` alone would make it private).

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> write_json(d / "r.json", {"top1": 91.76})
    >>> (d / "r.json").read_text().strip().splitlines()[1]
    '  "top1": 91.76'
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from polyglean.errors import ArgumentError, CheckpointError

__all__ = ["TMP_MARK", "check_writable", "load_torch", "write_atomic", "write_json", "write_torch"]

TMP_MARK = ".polyglean-tmp-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(path: str | Path, what: str = "output") -> Path:
    """Checks, before any work, that ``path`` can be written: not a directory, its folder creatable and writable.

    Raises:
        ArgumentError: naming the path and the reason.
    """
    path = Path(path)
    if path.is_dir():
        raise ArgumentError(f"{what} path {str(path)!r} is a directory; give a file name")
    parent = path.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ArgumentError(f"{what} path {str(path)!r}: {str(probe)!r} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ArgumentError(f"{what} path {str(path)!r}: directory {str(probe)!r} is not writable")
    if path.exists() and not os.access(path, os.W_OK) and not os.access(parent, os.W_OK):
        raise ArgumentError(f"{what} path {str(path)!r} is not writable")
    return path


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Calls ``write(f)`` on a temporary binary file beside ``path``, then renames it over ``path``.

    The new file keeps the mode of the file it replaces (or gets the umask default). Stale temporary files of
    earlier killed writes to the same target are removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}{TMP_MARK}"
    for stale in path.parent.glob(f"{prefix}*"):
        try:  # a leftover of a killed writer; a live writer's file is renamed away before it could matter
            if stale.stat().st_mtime < _now() - 3600:
                stale.unlink()
        except OSError:
            pass
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _now() -> float:
    import time

    return time.time()


def write_json(path: str | Path, payload: Any) -> None:
    """Writes ``payload`` as indented JSON, atomically."""
    data = (json.dumps(payload, indent=2) + "\n").encode()
    write_atomic(path, lambda f: f.write(data))


def write_torch(path: str | Path, payload: Any) -> None:
    """``torch.save`` of ``payload``, atomically."""
    write_atomic(path, lambda f: torch.save(payload, f))


def load_torch(path: str | Path, what: str = "checkpoint", *, mmap: bool = False) -> Any:
    """Loads a file written by ``torch.save`` with ``weights_only=True`` onto the CPU.

    Raises:
        CheckpointError: a missing file, a file that is not a PyTorch checkpoint (a text file, a truncated
            file), or one that needs arbitrary code to unpickle; the message never advises ``weights_only=False``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {str(path)!r} does not exist" if not path.exists()
                              else f"{what} {str(path)!r} is not a file")
    with path.open("rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save: a zip file, or a pickle (old)
        begins = "it is empty" if not head else f"it begins {head!r}"
        raise CheckpointError(f"{what} {str(path)!r} is not a readable PyTorch checkpoint: not a file written by "
                              f"torch.save ({begins})")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the refusal below says enough
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, KeyError, EOFError... for bad files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, (KeyError, EOFError, IndexError)) or len(reason) < 12:  # "101" for a text file
            kind = type(err).__name__
            reason = f"not a file written by torch.save ({kind}{'' if reason == kind else ': ' + reason})"
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            reason = "it holds objects other than tensors and plain containers, which are never unpickled here"
        raise CheckpointError(f"{what} {str(path)!r} is not a readable PyTorch checkpoint: {reason}") from None
