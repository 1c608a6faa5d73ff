"""Finding preset weights on disk, checking them, and downloading them when they are not there.

A preset's weights file is looked for in documented places only, in this order (first hit wins):

1. ``$POLYGLEAN_DATA/weights/<subdir>/`` when ``POLYGLEAN_DATA`` is set;
2. the torch hub cache (``$TORCH_HOME/hub/checkpoints``), where downloads go.

Never relative to the working directory, so a stale or planted file there is not picked up. A file whose name
carries a hash (``resnet20-12fca82f.th``: the first hex digits of the file's SHA-256, torch hub's convention) is
checked against it every time it is found, wherever it is; a mismatch is a :class:`CheckpointError`. Only when no
location has the file is it downloaded from its public URL (and checked); without network that fails with a
:class:`WeightsUnavailableError` saying how to pass a local file instead. An explicit path (``weights=PATH``) is
used as given.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import urllib.error
from collections.abc import Sequence
from pathlib import Path

import torch.hub

from polyglean.errors import CheckpointError, WeightsUnavailableError

__all__ = ["WeightsUnavailableError", "check_hash_prefix", "default_search_dirs", "download_weights", "find_weights",
           "hash_prefix"]

log = logging.getLogger(__name__)

_NETWORK_ERRORS = (urllib.error.URLError, OSError, ConnectionError, TimeoutError)
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")
_DIGESTS: dict[tuple[str, int, int], str] = {}  # (real path, size, mtime) -> SHA-256, so a file is hashed once



def hub_cache_dir() -> Path:
    """The folder where torch hub keeps downloaded checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def default_search_dirs(subdir: str) -> list[Path]:
    """Folders searched for a preset's weights, in order (see the module docstring).

    Args:
        subdir: the folder under ``weights/`` (e.g. ``"cifar10-resnet"``).
    """
    dirs: list[Path] = []
    env = os.environ.get("POLYGLEAN_DATA")
    if env:
        dirs.append(Path(env) / "weights" / subdir)
    dirs.append(hub_cache_dir())
    return dirs


def hash_prefix(filename: str) -> str | None:
    """The hash a weights file name promises (``resnet20-12fca82f.th`` -> ``"12fca82f"``), or None.

    Example:
        >>> hash_prefix("resnet20-12fca82f.th"), hash_prefix("model.pt")
        ('12fca82f', None)
    """
    match = _HASH_IN_NAME.search(filename)
    return match.group(1) if match else None


def _sha256(path: Path) -> str:
    st = path.stat()
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def check_hash_prefix(path: str | Path, prefix: str | None = None) -> Path:
    """Checks that the SHA-256 of ``path`` begins with ``prefix`` (default: the hash in its name, if any).

    Returns:
        ``path``.

    Raises:
        CheckpointError: the digest differs; the message names the file and both hashes.
    """
    path = Path(path)
    prefix = hash_prefix(path.name) if prefix is None else prefix
    if prefix is None:
        return path
    digest = _sha256(path)
    if not digest.startswith(prefix.lower()):
        raise CheckpointError(
            f"weights file {str(path)!r} is not the published one: its name promises a SHA-256 beginning {prefix}, "
            f"the file's begins {digest[:len(prefix)]} (stale, damaged or replaced); delete it to have the "
            "published file found or fetched again, or pass the weights you mean with weights=PATH (CLI: --weights)"
        )
    return path


def find_weights(filename: str, search_dirs: Sequence[Path]) -> Path | None:
    """The first ``search_dirs / filename`` that is a file, checked against the hash in its name; or None.

    Args:
        filename: the weights file name.
        search_dirs: folders to look in, in order.

    Raises:
        CheckpointError: the first file found does not match the hash in its name (a later location is not tried:
            a wrong file where the user keeps the weights is worth knowing about).
    """
    for d in search_dirs:
        candidate = Path(d) / filename
        if candidate.is_file():
            return check_hash_prefix(candidate)
    return None


def download_weights(url: str, dest_dir: Path | None = None, *, hash_prefix: str | None = None) -> Path:
    """Download ``url`` into ``dest_dir`` (default: the torch hub cache) unless already there.

    Args:
        url: where the file is published; its last path component names the file.
        dest_dir: where to put it.
        hash_prefix: leading hex digits of the file's SHA-256, checked after download.

    Returns:
        The local path.

    Raises:
        WeightsUnavailableError: the download failed (no network, bad URL, hash mismatch).
        CheckpointError: the file is already there but does not match ``hash_prefix``.
    """
    dest_dir = hub_cache_dir() if dest_dir is None else Path(dest_dir)
    dest = dest_dir / url.rsplit("/", 1)[-1]
    if dest.is_file():
        return check_hash_prefix(dest, hash_prefix)
    log.info("downloading %s to %s", url, dest)
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(dest), hash_prefix=hash_prefix, progress=False)
    except (*_NETWORK_ERRORS, RuntimeError) as exc:
        raise WeightsUnavailableError(
            f"could not download {url} ({type(exc).__name__}: {exc}); are you offline? "
            f"Put {dest.name} in one of the searched folders or pass weights=PATH (CLI: --weights PATH)"
        ) from exc
    return dest
