"""Where and how a computation runs: the device and the numeric precision, as one typed value.

:class:`Runtime` is what every library entry point that runs a model takes (the command line builds it from
``--device`` and ``--precision``). ``fp32`` runs the model as it is; ``bf16`` and ``fp16`` run it under
:func:`torch.autocast` with that dtype, which keeps the weights in float32 and casts per op, so the search at
``B = 1`` equals the plain model run the same way (the same ops on the same inputs under the same autocast).

``fp16`` on the CPU is refused: CPU autocast in float16 covers few ops and is slower than float32 there; use
``bf16`` on the CPU.

Example:
    >>> rt = Runtime.resolve("cpu", "fp32")
    >>> rt.device, rt.precision
    (device(type='cpu'), 'fp32')
    >>> import torch
    >>> with rt.autocast():
    ...     torch.ones(2, 2).sum().item()
    4.0
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from polyglean.errors import ArgumentError

__all__ = ["DEVICES", "PRECISIONS", "Runtime", "default_device", "resolve_device", "resolve_precision"]

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Precision names and the autocast dtype each stands for (``None``: no autocast)."""

DEVICES = ("cpu", "cuda", "cuda:N", "mps")
"""The device names accepted (``cuda:N`` for the N-th GPU)."""


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def default_device() -> torch.device:
    """CUDA (the current GPU) when one is available, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """Checks a device name and returns the device; ``None`` or ``"auto"`` gives :func:`default_device`.

    Raises:
        ArgumentError: an unknown name, or a device this machine does not have (the message says what it has).
    """
    if name is None or (isinstance(name, str) and name.strip().lower() == "auto"):
        return default_device()
    try:
        device = torch.device(name.strip().lower() if isinstance(name, str) else name)
    except (RuntimeError, TypeError, ValueError):
        raise ArgumentError(f"unknown device {name!r}; use one of {', '.join(DEVICES)}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ArgumentError(f"device {name!r}: CUDA is not available on this machine (torch "
                                f"{torch.__version__}, {torch.cuda.device_count()} GPUs visible); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ArgumentError(f"device {name!r}: this machine has {count} GPU(s), cuda:0 .. cuda:{count - 1}")
        return device
    if device.type == "mps":
        if not _mps_available():
            raise ArgumentError(f"device {name!r}: Apple's MPS backend is not available on this machine; "
                                "use --device cpu")
        return device
    raise ArgumentError(f"unsupported device {name!r}; use one of {', '.join(DEVICES)}")


def resolve_precision(precision: str, device: torch.device) -> str:
    """Checks a precision name against the device it will run on.

    Raises:
        ArgumentError: an unknown name, or ``fp16`` on the CPU.
    """
    if precision not in PRECISIONS:
        raise ArgumentError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        raise ArgumentError("precision 'fp16' is not supported on the CPU (CPU autocast covers few float16 ops); "
                            "use --precision bf16 or fp32 there, or --device cuda")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ArgumentError(f"precision 'bf16' is not supported by {torch.cuda.get_device_name(device)}; "
                            "use --precision fp16 or fp32")
    return precision


@dataclass(frozen=True)
class Runtime:
    """A device and a precision.

    Attributes:
        device: Where models and inputs go.
        precision: ``fp32``, ``bf16`` or ``fp16`` (:data:`PRECISIONS`).
    """

    device: torch.device = torch.device("cpu")
    precision: str = "fp32"

    @classmethod
    def resolve(cls, device: str | torch.device | None = None, precision: str = "fp32") -> Runtime:
        """Checks both names (see :func:`resolve_device`, :func:`resolve_precision`)."""
        dev = resolve_device(device)
        return cls(dev, resolve_precision(precision, dev))

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, ``None`` for ``fp32``."""
        return PRECISIONS[self.precision]

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """A context that runs ops in :attr:`precision` (a no-op for ``fp32``)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Selects the CUDA device (so that ``torch.cuda`` calls without an index use it) and enables autocast."""
        if self.device.type == "cuda" and self.device.index is not None:
            with torch.cuda.device(self.device), self.autocast():
                yield
        else:
            with self.autocast():
                yield

    def as_dict(self) -> dict[str, str]:
        """For result files: ``{"device": ..., "precision": ...}``."""
        return {"device": str(self.device), "precision": self.precision}
