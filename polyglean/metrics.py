"""Classification metrics: top-k accuracy, NLL, expected calibration error, fixed/broken counts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["classification_metrics", "expected_calibration_error", "fixed_broken", "topk_accuracy"]


def topk_accuracy(logits: Tensor, labels: Tensor, k: int = 1) -> float:
    """Share of rows whose label is among the ``k`` highest logits.

    Shape:
        - logits: ``(N, K)``
        - labels: ``(N,)``
    """
    k = min(k, logits.shape[-1])
    return (logits.topk(k, -1).indices == labels[:, None]).any(-1).float().mean().item()


def expected_calibration_error(logits: Tensor, labels: Tensor, bins: int = 15) -> float:
    """ECE with ``bins`` equal-width confidence bins: ``Σ_b |B_b|/N · |acc(B_b) - conf(B_b)|``."""
    probs = logits.float().softmax(-1)
    conf, pred = probs.max(-1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.float().mean() * (correct[inside].mean() - conf[inside].mean()).abs()
    return ece.item()


def fixed_broken(logits: Tensor, reference: Tensor, labels: Tensor) -> tuple[int, int]:
    """Images wrong under ``reference`` and right under ``logits`` (fixed), and the reverse (broken)."""
    right = logits.argmax(-1) == labels
    was_right = reference.argmax(-1) == labels
    return int((right & ~was_right).sum()), int((~right & was_right).sum())


def classification_metrics(logits: Tensor, labels: Tensor, reference: Tensor | None = None) -> dict[str, float]:
    """top1, top5 (percent), nll, ece (percent) and, against ``reference``, fixed and broken."""
    out = {
        "top1": 100.0 * topk_accuracy(logits, labels, 1),
        "top5": 100.0 * topk_accuracy(logits, labels, 5),
        "nll": F.cross_entropy(logits.float(), labels).item(),
        "ece": 100.0 * expected_calibration_error(logits, labels),
    }
    if reference is not None:
        out["fixed"], out["broken"] = fixed_broken(logits, reference, labels)
    return out
