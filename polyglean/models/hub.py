"""Finding preset weights on disk, and downloading them when they are not there.

Search order for a preset's weights file (first hit wins):

1. ``$POLYGLEAN_DATA/weights/<subdir>/`` when ``POLYGLEAN_DATA`` is set;
2. ``../shared/data/weights/<subdir>/`` relative to the current directory;
3. ``../shared/data/weights/<subdir>/`` relative to the repository holding this package;
4. the torch hub cache (``$TORCH_HOME/hub/checkpoints``), where downloads go.

Only then is the file downloaded from its public URL. Without network that fails with a
:class:`WeightsUnavailableError` saying how to pass a local file instead.
"""

from __future__ import annotations

import logging
import os
import urllib.error
from collections.abc import Sequence
from pathlib import Path

import torch.hub
from polyglean.errors import WeightsUnavailableError

__all__ = ["WeightsUnavailableError", "default_search_dirs", "download_weights", "find_weights"]

log = logging.getLogger(__name__)

_REPO = Path(__file__).resolve().parents[2]
_NETWORK_ERRORS = (urllib.error.URLError, OSError, ConnectionError, TimeoutError)



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
    dirs.append(Path.cwd().parent / "shared" / "data" / "weights" / subdir)
    dirs.append(_REPO.parent / "shared" / "data" / "weights" / subdir)
    dirs.append(hub_cache_dir())
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def find_weights(filename: str, search_dirs: Sequence[Path]) -> Path | None:
    """The first ``search_dirs / filename`` that is a file, or None.

    Args:
        filename: the weights file name.
        search_dirs: folders to look in, in order.
    """
    for d in search_dirs:
        candidate = Path(d) / filename
        if candidate.is_file():
            return candidate
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
    """
    dest_dir = hub_cache_dir() if dest_dir is None else Path(dest_dir)
    dest = dest_dir / url.rsplit("/", 1)[-1]
    if dest.is_file():
        return dest
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
