"""Fine-tuning a model with its subsampling layers swapped (BlurPool, SoftPool, adaPool, PASA, APS) on CPU.

The pieces ``polyglean train`` is made of, usable from Python: :func:`build_model` (a preset's pretrained weights,
then :func:`polyglean.swap` with the downsample's settings from :data:`DOWNSAMPLES`, so every weight the rewrite
keeps starts pretrained), :func:`train_transform` (standard augmentation), :func:`train_epoch` /
:func:`evaluate_loss` (no printing: progress goes to a callback), checkpoints written atomically
(:func:`save_checkpoint`) that record the model spec and the downsample, and :func:`load_finetuned`, which rebuilds
the same architecture and loads such a checkpoint strictly with ``weights_only=True``.

Example:
    >>> model, preprocess = build_model("cifar10-resnet20", "blurpool")  # doctest: +SKIP
    >>> optimizer = make_optimizer("sgd", model.parameters(), lr=0.01)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision import transforms as T

from polyglean.layers import swap
from polyglean.models import CheckpointError, Preprocess, load_model, load_state_dict_strict
from polyglean.registry import Registry

__all__ = [
    "CHECKPOINT_FORMAT",
    "DOWNSAMPLES",
    "OPTIMIZERS",
    "BatchStats",
    "build_model",
    "evaluate_loss",
    "load_finetuned",
    "make_optimizer",
    "read_checkpoint",
    "save_checkpoint",
    "train_epoch",
    "train_transform",
]

CHECKPOINT_FORMAT = "polyglean-finetune/1"

DOWNSAMPLES: Registry[dict[str, Any]] = Registry("downsample layer")
"""Downsample name -> keyword arguments of :func:`polyglean.swap` used by ``train`` and ``eval --downsample``."""
DOWNSAMPLES.register("blurpool", {"filter_size": 3})
DOWNSAMPLES.register("softpool", {"convs": True})  # ResNet-20 has no pooling layer: its strided convs are swapped
DOWNSAMPLES.register("adapool", {"convs": True})
DOWNSAMPLES.register("pasa", {})
DOWNSAMPLES.register("aps", {})

OptimizerFactory = Callable[[Iterable[nn.Parameter], float, float], torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")
OPTIMIZERS.register("sgd", lambda params, lr, wd: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd,
                                                                  nesterov=True))
OPTIMIZERS.register("adamw", lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd))


def build_model(spec: str, downsample: str | None = None, *, weights: str | Path | None = None
                ) -> tuple[nn.Module, Preprocess]:
    """The model ``spec`` (pretrained or from ``weights``) with its subsampling layers swapped to ``downsample``.

    Args:
        spec: A model spec of :func:`polyglean.models.load_model` (e.g. ``"cifar10-resnet20"``).
        downsample: A name of :data:`DOWNSAMPLES`, or ``None`` for the model's own layers.
        weights: A checkpoint of the *unswapped* model (default: the preset's pretrained weights).

    Returns:
        ``(model, preprocess)``; the model is in eval mode. Every weight the rewrite keeps is the loaded one; new
        layers (PASA's filter conv, adaPool's beta) start from their own initialisation.

    Raises:
        ValueError: unknown ``downsample`` (the message lists the known ones) or ``spec``.
    """
    settings = DOWNSAMPLES.get(downsample) if downsample is not None else None
    model, preprocess = load_model(spec, weights)
    if settings is not None:
        model = swap(model, downsample, input_size=preprocess.input_size, **settings)
    return model.eval(), preprocess


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint`, read with ``torch.load(..., weights_only=True)``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: not a readable checkpoint of this format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint: {type(exc).__name__}: {exc}") from exc
    if not isinstance(payload, Mapping) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a polyglean fine-tuning checkpoint (format {CHECKPOINT_FORMAT!r})")
    return dict(payload)


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> None:
    """Writes ``payload`` (with ``format`` added) to a temporary file beside ``path`` and renames it over ``path``.

    A crash while writing leaves the previous checkpoint intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save({**payload, "format": CHECKPOINT_FORMAT}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_finetuned(spec: str, downsample: str | None, path: str | Path) -> tuple[nn.Module, Preprocess]:
    """Rebuilds the architecture a checkpoint was trained with and loads it strictly (``weights_only=True``).

    Args:
        spec: The model spec; must equal the one the checkpoint records.
        downsample: The downsample name; must equal the one the checkpoint records (``None``: the default layers).
        path: A checkpoint written by ``polyglean train``.

    Returns:
        ``(model, preprocess)`` in eval mode.

    Raises:
        CheckpointError: the checkpoint records another model or downsample, or its keys do not match.
    """
    payload = read_checkpoint(path)
    if payload.get("model") != spec or payload.get("downsample") != downsample:
        raise CheckpointError(
            f"{path} holds model {payload.get('model')!r} with downsample {payload.get('downsample')!r}, not "
            f"{spec!r} with {downsample!r}; pass --model {payload.get('model')} "
            + (f"--downsample {payload['downsample']}" if payload.get("downsample") else "without --downsample")
        )
    model, preprocess = build_model(spec, downsample)
    load_state_dict_strict(model, payload["state_dict"], source=str(path))
    return model.eval(), preprocess


def train_transform(preprocess: Preprocess) -> Callable[[Any], Tensor]:
    """Standard augmentation before ``preprocess``: random crop with zero padding of 1/8 the side (4 pixels at
    32x32, as for CIFAR) and a horizontal flip."""
    _, h, w = preprocess.input_size
    return T.Compose([T.Resize((h, w)), T.RandomCrop((h, w), padding=max(h, w) // 8), T.RandomHorizontalFlip(),
                      preprocess])


def make_optimizer(name: str, params: Iterable[nn.Parameter], *, lr: float, weight_decay: float = 5e-4
                   ) -> torch.optim.Optimizer:
    """The optimizer ``name`` of :data:`OPTIMIZERS` (``sgd``: momentum 0.9, Nesterov; ``adamw``)."""
    if lr <= 0:
        raise ValueError(f"learning rate must be > 0, got {lr}")
    return OPTIMIZERS.get(name)(params, lr, weight_decay)


@dataclass(frozen=True)
class BatchStats:
    """What one training step saw: its loss, correct predictions and images, and the running epoch means."""

    loss: float
    correct: int
    images: int
    mean_loss: float
    accuracy: float


def train_epoch(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, *,
                on_batch: Callable[[BatchStats], None] | None = None) -> dict[str, float]:
    """One pass over ``loader`` with cross-entropy, stepping ``scheduler`` after every batch.

    Returns:
        ``{"loss": mean loss, "top1": accuracy in percent, "images": n}`` over the epoch.
    """
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in loader:
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        n, right = len(y), int((logits.detach().argmax(-1) == y).sum())
        total_loss, correct, seen = total_loss + float(loss.detach()) * n, correct + right, seen + n
        if on_batch is not None:
            on_batch(BatchStats(float(loss.detach()), right, n, total_loss / seen, 100.0 * correct / seen))
    if seen == 0:
        raise ValueError("the training data loader yielded no batch")
    return {"loss": total_loss / seen, "top1": 100.0 * correct / seen, "images": float(seen)}


@torch.no_grad()
def evaluate_loss(model: nn.Module, loader: DataLoader[Any]) -> dict[str, float]:
    """Mean cross-entropy and top-1 (percent) of ``model`` in eval mode over ``loader``."""
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in loader:
        logits = model(x)
        total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        seen += len(y)
    return {"nll": total_loss / max(seen, 1), "top1": 100.0 * correct / max(seen, 1)}
