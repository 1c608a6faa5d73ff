"""Reading checkpoints, renaming their keys by explicit rules, and loading them strictly.

A checkpoint is read with ``torch.load(..., weights_only=True)``; the state dict may be the file itself or sit under
``"state_dict"`` or ``"model"``. Keys are renamed by a :class:`KeyMap` — an ordered list of regular-expression rules,
the first that matches a whole key wins — never by position or by shape. The renamed dict must then match the
model exactly: :func:`load_state_dict_strict` raises a :class:`CheckpointError` naming missing and unexpected keys
and shape mismatches.

Example:
    >>> import torch.nn as nn
    >>> sd = {"module.weight": torch.zeros(2, 3), "module.bias": torch.zeros(2)}
    >>> load_state_dict_strict(nn.Linear(3, 2), STRIP_MODULE.apply(sd))
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from polyglean.errors import CheckpointError
from polyglean.io import load_torch

__all__ = [
    "STRIP_MODULE",
    "CheckpointError",
    "CheckpointNotFoundError",
    "KeyMap",
    "load_checkpoint",
    "load_state_dict_file",
    "load_state_dict_strict",
]

_NESTED_KEYS = ("state_dict", "model")
_SHOW = 5


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint path that does not exist (a :class:`CheckpointError` that is also a ``FileNotFoundError``)."""


def _first(items: Iterable[str], n: int = _SHOW) -> str:
    items = list(items)
    shown = ", ".join(repr(k) for k in items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


@dataclass(frozen=True)
class KeyMap:
    """An ordered list of key-renaming rules.

    Each rule is ``(pattern, replacement)``; ``pattern`` must match a whole key (``re.fullmatch``) and
    ``replacement`` may use groups (``r"\\1"``). The first matching rule renames a key, so rules are applied
    simultaneously, never chained (``bn1 -> bn2`` and ``bn2 -> bn3`` in one map are safe).

    Args:
        rules: ``(pattern, replacement)`` pairs, tried in order.
        passthrough: keep keys that match no rule unchanged; when False such keys are an error.
    """

    rules: tuple[tuple[str, str], ...]
    passthrough: bool = True

    def __post_init__(self) -> None:
        for pattern, _ in self.rules:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"KeyMap rule pattern {pattern!r} is not a valid regular expression: {exc}") from exc

    def rename(self, key: str) -> str | None:
        """The new name of ``key``, or None when no rule matches it.

        Args:
            key: a state-dict key.
        """
        for pattern, replacement in self.rules:
            match = re.fullmatch(pattern, key)
            if match is not None:
                return match.expand(replacement)
        return None

    def apply(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename every key of ``state_dict``.

        Args:
            state_dict: the checkpoint's tensors.

        Returns:
            A new dict with renamed keys, in the original order.

        Raises:
            CheckpointError: a key matches no rule (when ``passthrough`` is False), or two keys get the same name.
        """
        out: dict[str, torch.Tensor] = {}
        unmatched: list[str] = []
        for key, value in state_dict.items():
            new = self.rename(key)
            if new is None:
                if not self.passthrough:
                    unmatched.append(key)
                    continue
                new = key
            if new in out:
                raise CheckpointError(f"key map renames two checkpoint keys to {new!r} (the second is {key!r})")
            out[new] = value
        if unmatched:
            raise CheckpointError(
                f"{len(unmatched)} checkpoint key(s) match no rule of the key map: {_first(unmatched)}"
            )
        return out


STRIP_MODULE = KeyMap(rules=((r"module\.(.+)", r"\1"),))
"""Strips the ``module.`` prefix that ``nn.DataParallel`` adds; other keys pass unchanged."""


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file and return its state dict.

    The file is read with ``torch.load(path, weights_only=True, map_location="cpu")``. A raw state dict is
    accepted, as is a dict holding one under ``"state_dict"`` or ``"model"``.

    Args:
        path: the checkpoint file.

    Returns:
        The mapping from parameter/buffer names to tensors.

    Raises:
        CheckpointNotFoundError: the file does not exist.
        CheckpointError: the file is not a readable checkpoint (a text file, a truncated file, a pickle of other
            objects) or holds no state dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"weights file not found: {path}")
    obj = load_torch(path, "weights file")
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict (expected a dict of tensors)")
    for nested in _NESTED_KEYS:
        if nested in obj and isinstance(obj[nested], Mapping):
            obj = obj[nested]
            break
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad or not obj:
        raise CheckpointError(
            f"{path} is not a state dict: expected a dict of tensors (or one under 'state_dict' or 'model'), "
            + (f"found non-tensor entries {_first(bad)}" if bad else "found an empty dict")
        )
    return dict(obj)


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str = "") -> None:
    """Load ``state_dict`` into ``model``, requiring the same keys and shapes.

    Args:
        model: the module to fill.
        state_dict: tensors keyed as in ``model.state_dict()``.
        source: where the tensors came from (a file name), for error messages.

    The one tolerated gap is a BatchNorm ``num_batches_tracked`` counter absent from checkpoints saved before
    PyTorch 0.4.1: it only counts training steps, so it is filled with 0 (as PyTorch itself does for such files).

    Raises:
        CheckpointError: keys are missing or unexpected, or shapes differ; the message names the first few.
    """
    expected = model.state_dict()
    state_dict = dict(state_dict)
    for name, module in model.named_modules():
        key = f"{name}.num_batches_tracked" if name else "num_batches_tracked"
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and key in expected and key not in state_dict:
            state_dict[key] = torch.zeros_like(expected[key])
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        parts = [f"checkpoint{f' {source}' if source else ''} does not match {type(model).__name__}:"]
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_first(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_first(unexpected)}")
        if mismatched:
            more = len(mismatched) - _SHOW
            shown = "; ".join(mismatched[:_SHOW]) + (f"; ... ({more} more)" if more > 0 else "")
            parts.append(f"{len(mismatched)} shape mismatch(es): {shown}")
        parts.append("Hint: is this the right architecture (and number of classes) for these weights?")
        raise CheckpointError("\n  ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def load_checkpoint(model: nn.Module, path: str | Path, *, key_map: KeyMap = STRIP_MODULE) -> nn.Module:
    """Read ``path``, rename its keys with ``key_map`` and load them strictly into ``model``.

    Args:
        model: the module to fill.
        path: the checkpoint file.
        key_map: renaming rules from checkpoint keys to ``model``'s keys.

    Returns:
        ``model``, for chaining.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: the file is not a checkpoint, or it does not match ``model``.
    """
    try:
        state_dict = key_map.apply(load_state_dict_file(path))
    except CheckpointError as exc:
        if str(path) in str(exc):
            raise
        raise CheckpointError(f"{path}: {exc}") from exc
    load_state_dict_strict(model, state_dict, source=str(path))
    return model
