"""A folder of every view's searched logits of a data set, keyed on content, reused across runs.

One file per view, named by a SHA-256 of the key: the caller's key (which must name everything that changes the
logits: the weights' hash, the preprocessing, the images' names, sizes, modification times and labels, the search
settings) and the view's name. The full key is stored in the file and compared on reading, so a collision or a
file copied from elsewhere is never served. An entry searched to larger budgets serves smaller ones. Files are
written atomically through :mod:`polyglean.io` (two writers never share a temporary file).

Example:
    >>> import tempfile
    >>> cache = ViewCache(tempfile.mkdtemp(), {"model_sha256": "ab12", "data_sha256": "cd34"})
    >>> cache.get("hflip", [1, 4], 10) is None
    True
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from polyglean.errors import CheckpointError
from polyglean.io import load_torch, write_torch
from polyglean.tta.combine import ViewLogits

__all__ = ["ViewCache"]


class ViewCache:
    """Every view's searched logits, one file per view.

    Args:
        folder: where the files live (created on the first write).
        key: JSON-serialisable description of everything the logits depend on except the view.
    """

    def __init__(self, folder: str | Path, key: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.key = dict(key)
        json.dumps(self.key, sort_keys=True)  # refuse an unserialisable key now, not after the search

    def _key(self, view: str, n: int) -> dict[str, Any]:
        return {**self.key, "view": view, "n": n}

    def path(self, view: str, n: int) -> Path:
        """The file of ``view`` over ``n`` images."""
        digest = hashlib.sha256(json.dumps(self._key(view, n), sort_keys=True).encode()).hexdigest()[:32]
        return self.folder / f"{digest}.pt"

    def _read(self, view: str, n: int) -> dict[str, Any] | None:
        path = self.path(view, n)
        if not path.is_file():
            return None
        try:
            entry = load_torch(path, "TTA cache entry")
        except CheckpointError:  # a damaged entry is searched again and rewritten
            return None
        if not isinstance(entry, dict) or entry.get("key") != json.loads(json.dumps(self._key(view, n))):
            return None
        return entry

    def get(self, view: str, budgets: Sequence[int], n: int) -> ViewLogits | None:
        """The cached logits of ``view`` at ``budgets`` (None unless an entry covers them all)."""
        entry = self._read(view, n)
        if entry is None or not set(budgets) <= set(entry["budgets"]):
            return None
        idx = [list(entry["budgets"]).index(b) for b in budgets]
        return ViewLogits([view], list(budgets), entry["logits"][:, idx], entry["flops"][:, idx],
                          entry["seconds"][:, idx], float(entry["forward_flops"]), entry["labels"])

    def put(self, views: ViewLogits) -> None:
        """Stores every view of ``views`` (with labels), unless an entry already covers more budgets."""
        if views.labels is None:
            raise ValueError("ViewCache.put needs the labels of the images")
        n = int(views.logits.shape[2])
        for name in views.views:
            old = self._read(name, n)
            if old is not None and set(old["budgets"]) >= set(views.budgets):
                continue
            one = views.select([name])
            write_torch(self.path(name, n), {
                "key": self._key(name, n), "budgets": list(one.budgets), "logits": one.logits.detach().cpu().clone(),
                "flops": one.flops.clone(), "seconds": one.seconds.clone(), "forward_flops": one.forward_flops,
                "labels": views.labels.detach().cpu().clone(),
            })
