"""Aggregators of candidate predictions: a registry (``mean``, ``entropy``; the learned one plugs in later)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from polyglean.registry import Registry

__all__ = ["AGGREGATORS", "Aggregator", "EntropyAggregator", "MeanAggregator", "normalized_entropy"]


def normalized_entropy(logits: Tensor) -> Tensor:
    """``H(softmax(z)) / log K`` along the last dimension, in ``[0, 1]``."""
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1) / math.log(logits.shape[-1])


class Aggregator:
    """Combines the candidates of each image into one.

    ``combine(values, logits, shift)`` takes the values to combine (aligned feature maps or logits), each
    candidate's own logits and its displacement, and returns one value per image.

    Shape:
        - values: ``(N, B, ...)``
        - logits: ``(N, B, K)``
        - shift: ``(N, B, 2)``
        - output: ``(N, ...)``
    """

    def combine(self, values: Tensor, logits: Tensor, shift: Tensor) -> Tensor:
        raise NotImplementedError


AGGREGATORS: Registry[type[Aggregator]] = Registry("aggregator")


@AGGREGATORS.register("mean")
class MeanAggregator(Aggregator):
    """The plain average of the candidates."""

    def combine(self, values: Tensor, logits: Tensor, shift: Tensor) -> Tensor:
        return values.mean(1)


@AGGREGATORS.register("entropy")
class EntropyAggregator(Aggregator):
    """Average weighted by confidence: ``w_s = 1 - H(softmax(z_s)) / log K``, normalised over candidates."""

    def combine(self, values: Tensor, logits: Tensor, shift: Tensor) -> Tensor:
        w = (1.0 - normalized_entropy(logits)).clamp_min(1e-12).to(values.dtype)
        w = w / w.sum(1, keepdim=True)
        return (values * w.reshape(*w.shape, *([1] * (values.dim() - 2)))).sum(1)
