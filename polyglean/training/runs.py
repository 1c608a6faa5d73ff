"""What both training commands do the same way with their checkpoint: claim it before any work, refuse to resume
with other settings, never overwrite a finished one by accident.

Example:
    >>> changed_settings({"lr": 0.01, "seed": 0}, {"lr": 0.1, "seed": 0})
    {'lr': (0.01, 0.1)}
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from polyglean.errors import ArgumentError, CheckpointError
from polyglean.io import check_writable
from polyglean.models.checkpoint import CheckpointNotFoundError

__all__ = ["changed_settings", "claim_output", "refuse_changed_settings"]


def claim_output(path: str | Path, *, resume: bool, overwrite: bool = False, extra: Path | str | None = None) -> Path:
    """Checks, before any work, that a training run may write its checkpoint at ``path``.

    Args:
        path: the checkpoint (``--out``).
        resume: continue the checkpoint at ``path`` (it must exist).
        overwrite: replace an existing checkpoint at ``path`` (without it an existing file is refused).
        extra: another output written at the end (e.g. ``--export``), checked for writability too.

    Raises:
        ArgumentError: ``resume`` with ``overwrite``; ``path`` exists without either; an output not writable.
        CheckpointNotFoundError: ``resume`` and no checkpoint at ``path``.
    """
    path = Path(path)
    if resume and overwrite:
        raise ArgumentError("give --resume (continue the checkpoint) or --overwrite (replace it), not both")
    if resume and not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint not found: {path} (nothing to --resume)")
    if not resume and path.exists() and not overwrite:
        raise ArgumentError(f"{str(path)!r} exists; pass --resume to continue it, --overwrite to replace it, or "
                            "choose another --out")
    check_writable(path, "checkpoint")
    if extra is not None:
        check_writable(extra, "export")
    return path


def changed_settings(recorded: Mapping[str, Any], now: Mapping[str, Any],
                     defaults: Mapping[str, Any] | None = None) -> dict[str, tuple[Any, Any]]:
    """``{key: (recorded, now)}`` for every setting of ``now`` that differs from the recorded one; a key the record
    lacks (an older checkpoint) counts as its value in ``defaults``."""
    defaults = defaults or {}
    return {k: (recorded.get(k, defaults.get(k)), v) for k, v in now.items()
            if recorded.get(k, defaults.get(k)) != v}


def refuse_changed_settings(path: str | Path, recorded: Mapping[str, Any], now: Mapping[str, Any],
                            defaults: Mapping[str, Any] | None = None) -> None:
    """Raises a :class:`CheckpointError` listing every setting that differs from the checkpoint's.

    Raises:
        CheckpointError: ``cannot resume PATH: it was trained with different settings k=old (now new), ...``.
    """
    changed = changed_settings(recorded, now, defaults)
    if changed:
        raise CheckpointError(
            f"cannot resume {path}: it was trained with different settings "
            + ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in changed.items())
        )
