"""One place for a model's number of classes.

Example:
    >>> import torch.nn as nn
    >>> num_classes(nn.Sequential(nn.Flatten(), nn.Linear(12, 7)), (3, 2, 2))
    7
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from polyglean.errors import ModelError

__all__ = ["num_classes"]


def num_classes(model: nn.Module, input_size: Sequence[int]) -> int:
    """The number of logits ``model`` gives for one input of ``input_size`` ``(C, H, W)``.

    The model is run once on zeros, in eval mode and without gradients, on the device and dtype of its first
    parameter; its mode is restored afterwards, so a model in train mode keeps its BatchNorm statistics.

    Raises:
        ModelError: the output is not ``(1, K)`` logits.
    """
    try:
        reference = next(model.parameters())
        device, dtype = reference.device, reference.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.get_default_dtype()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *input_size, device=device, dtype=dtype))
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"{type(model).__name__} gives {shape} for one {tuple(input_size)} input, not (1, classes) "
                         "logits: is it a classification model?")
    return int(out.shape[1])
