"""adaPool (Stergiou & Poppe, IEEE TIP 2022): a learnable blend of EDSCW pooling and SoftPool, 2-D.

``adaPool(x) = beta * EDSCW(x) + (1 - beta) * SoftPool(x)`` with ``beta`` in ``[0, 1]``.

EDSCW (exponential Dice-Sorensen coefficient weighting) weights each activation of a window by its Dice similarity
to the window's mean. By default (``similarity="channel"``) the similarity is computed per channel, as in the
authors' CUDA kernel: for a window ``R`` and the activations ``a_i[c]`` of channel ``c``::

    a_bar[c] = (1 / |R|) * sum_{i in R} a_i[c]                           (mean of the window, per channel)
    DSC_i[c] = 2 * a_i[c] * a_bar[c] / (a_i[c]^2 + a_bar[c]^2 + eps)      (in [-1, 1]; 1 iff a_i[c] == a_bar[c])
    w_i[c]   = e^{DSC_i[c]} / sum_{j in R} e^{DSC_j[c]}                    (= softmax over the window)
    y[c]     = sum_{i in R} w_i[c] * a_i[c]

so every channel has its own weights, as SoftPool (:mod:`polyglean.layers.softpool`) has. ``similarity="vector"``
is the earlier behaviour of this library: one weight per pixel, shared by its channels, from the channel vectors
``a_i in R^C``: ``DSC_i = 2 * |<a_i, a_bar>| / (||a_i||^2 + ||a_bar||^2 + eps)``.

``eps = 1e-12`` keeps all-zero windows finite (their DSC is 0 everywhere, i.e. plain averaging of zeros); the
authors' kernel has no ``eps`` (0/0 there). Unlike that kernel, the output is not clamped to ``>= 0``. Padded
positions are absent from both the mean and the softmax.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from polyglean.layers._registry import register_layer
from polyglean.layers._utils import check_input, ntuple, pool_out_size, pool_windows
from polyglean.layers.phase_ops import pool_out, subsample_at
from polyglean.layers.rules import pooling_rule
from polyglean.layers.softpool import soft_pool2d, soft_windows
from polyglean.phase.functional import Phase
from polyglean.sites.ops import ModulePhaseOp

__all__ = ["SIMILARITIES", "AdaPool2d", "AdaPool2dPhase", "ada_pool2d", "edscw_pool2d"]

_IntOrSeq = int | Sequence[int]
_EPS = 1e-12
#: How EDSCW measures similarity: per channel (the authors' kernel, default) or over channel vectors.
SIMILARITIES: tuple[str, ...] = ("channel", "vector")


def _check_similarity(similarity: str) -> str:
    if similarity not in SIMILARITIES:
        raise ValueError(f"unknown EDSCW similarity {similarity!r}; expected one of "
                         f"{', '.join(map(repr, SIMILARITIES))}")
    return similarity


def _pool_args(
    kernel_size: _IntOrSeq, stride: _IntOrSeq | None, padding: _IntOrSeq
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    kernel = ntuple(kernel_size, 2, "kernel_size")
    strides = kernel if stride is None else ntuple(stride, 2, "stride")
    return kernel, strides, ntuple(padding, 2, "padding", minimum=0)


def _edscw_windows(windows: Tensor, mask: Tensor | None, similarity: str = "channel") -> Tensor:
    """EDSCW of unfolded windows ``(N, C, H_out, W_out, K)`` -> ``(N, C, H_out, W_out)``."""
    if mask is None:
        mean = windows.mean(dim=-1, keepdim=True)
    else:
        count = mask.sum(dim=-1, keepdim=True).to(windows.dtype)
        mean = (windows * mask).sum(dim=-1, keepdim=True) / count  # padded entries are zeros already
    if similarity == "channel":  # the authors' kernel: one weight per activation
        dsc = 2.0 * windows * mean / (windows.square() + mean.square() + _EPS)
        if mask is not None:
            dsc = dsc.masked_fill(~mask, float("-inf"))
        return (torch.softmax(dsc, dim=-1) * windows).sum(dim=-1)
    dot = (windows * mean).sum(dim=1)  # (N, H_out, W_out, K): over channels
    norm_a = windows.square().sum(dim=1)
    norm_mean = mean.square().sum(dim=1)
    dsc = 2.0 * dot.abs() / (norm_a + norm_mean + _EPS)
    if mask is not None:
        dsc = dsc.masked_fill(~mask[:, 0], float("-inf"))
    weights = torch.softmax(dsc, dim=-1).unsqueeze(1)
    return (weights * windows).sum(dim=-1)


def edscw_pool2d(
    x: Tensor,
    kernel_size: _IntOrSeq,
    stride: _IntOrSeq | None = None,
    padding: _IntOrSeq = 0,
    ceil_mode: bool = False,
    *,
    similarity: str = "channel",
) -> Tensor:
    """2-D exponential Dice-Sorensen coefficient weighted pooling (the EDSCW half of adaPool).

    See the module docstring for the exact formula. Arguments as :func:`polyglean.layers.soft_pool2d`, and
    ``similarity``: ``"channel"`` (per channel, the authors' kernel) or ``"vector"`` (over channel vectors).

    Shape:
        - x: ``(N, C, H, W)``
        - output: ``(N, C, H_out, W_out)``, as ``F.avg_pool2d`` with the same arguments.

    Example:
        >>> x = torch.tensor([[[[1.0, 1.0], [1.0, 5.0]]]])  # mean 2: the 1s are more similar to it than the 5
        >>> edscw_pool2d(x, 2)
        tensor([[[[1.9195]]]])
    """
    check_input(x, 2, "edscw_pool2d")
    kernel, strides, pads = _pool_args(kernel_size, stride, padding)
    _check_similarity(similarity)
    windows, mask = pool_windows(x, kernel, strides, pads, bool(ceil_mode), "edscw_pool2d")
    return _edscw_windows(windows, mask, similarity)


def ada_pool2d(
    x: Tensor,
    beta: Tensor | float,
    kernel_size: _IntOrSeq,
    stride: _IntOrSeq | None = None,
    padding: _IntOrSeq = 0,
    ceil_mode: bool = False,
    *,
    similarity: str = "channel",
) -> Tensor:
    """2-D adaPool: ``beta * EDSCW(x) + (1 - beta) * SoftPool(x)``.

    Both halves use the same windows; see the module docstring for EDSCW and
    :func:`polyglean.layers.soft_pool2d` for SoftPool.

    Args:
        x: Input.
        beta: Blend weight in ``[0, 1]``: a float, a 0-d tensor, or a tensor broadcastable to the output
            (typically ``(H_out, W_out)``: one weight per output position). ``beta = 1`` gives EDSCW exactly,
            ``beta = 0`` SoftPool exactly.
        kernel_size: Window size, an int or ``(k_h, k_w)``.
        stride: Window step; defaults to ``kernel_size``.
        padding: Implicit padding on both sides, at most half the kernel size; padded positions are absent.
        ceil_mode: Use ``ceil`` instead of ``floor`` for the output size.
        similarity: EDSCW's similarity, ``"channel"`` (per channel, the authors' kernel; default) or
            ``"vector"`` (one weight per pixel from its channel vector, this library's earlier behaviour).

    Returns:
        The pooled tensor.

    Raises:
        ValueError: If ``beta`` lies outside ``[0, 1]`` or does not broadcast to the output, or a pooling
            argument is out of range.

    Shape:
        - x: ``(N, C, H, W)``
        - beta: ``()``, ``(H_out, W_out)`` or anything broadcastable to the output
        - output: ``(N, C, H_out, W_out)``

    Example:
        >>> x = torch.randn(2, 3, 8, 8)
        >>> ada_pool2d(x, 0.5, 2).shape
        torch.Size([2, 3, 4, 4])
    """
    check_input(x, 2, "ada_pool2d")
    kernel, strides, pads = _pool_args(kernel_size, stride, padding)
    _check_similarity(similarity)
    if not isinstance(beta, Tensor):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)):
            raise TypeError(f"beta must be a float or a tensor, got {type(beta).__name__}")
        beta = torch.tensor(float(beta), dtype=x.dtype, device=x.device)
    beta = beta.to(dtype=x.dtype, device=x.device)  # the output keeps the dtype of x
    with torch.no_grad():
        out_of_range = bool(((beta < 0) | (beta > 1) | beta.isnan()).any())
    if out_of_range:
        raise ValueError(
            f"beta must lie in [0, 1], got values in [{beta.min().item():.4g}, {beta.max().item():.4g}]; "
            f"pass torch.sigmoid(logit) for an unconstrained parameter"
        )
    windows, mask = pool_windows(x, kernel, strides, pads, bool(ceil_mode), "ada_pool2d")
    out_shape = windows.shape[:-1]
    try:
        torch.broadcast_shapes(beta.shape, out_shape)
    except RuntimeError:
        raise ValueError(
            f"beta of shape {tuple(beta.shape)} does not broadcast to the output shape {tuple(out_shape)}; "
            f"use a scalar or a (H_out, W_out) = {tuple(out_shape[-2:])} tensor"
        ) from None
    edscw = _edscw_windows(windows, mask, similarity)
    soft = soft_windows(windows, mask)
    return beta * edscw + (1 - beta) * soft


class AdaPool2d(nn.Module):
    """2-D adaPool with a learnable blend weight, a Module over :func:`ada_pool2d`.

    ``beta = sigmoid(beta_logit)`` keeps the blend in ``[0, 1]`` with an unconstrained parameter, initialised to
    ``beta_init`` (0.5 by default).

    Choice of ``beta``: with ``beta_size=None`` (default) ``beta`` is a single scalar shared by all positions, so
    the layer accepts any input size. With ``beta_size=(H_out, W_out)`` there is one ``beta`` per output position,
    as in the paper, and the input size is then fixed (a mismatching input raises ``ValueError``).

    Args:
        kernel_size: Window size.
        stride: Window step; defaults to ``kernel_size``.
        padding: Implicit padding on both sides (padded positions are absent).
        ceil_mode: Use ``ceil`` for the output size.
        beta_size: ``None`` for a scalar ``beta``, or the output grid ``(H_out, W_out)`` for a per-position one.
        beta_init: Initial value of ``beta``, strictly between 0 and 1.
        similarity: EDSCW's similarity, ``"channel"`` (default, the authors') or ``"vector"`` (see
            :func:`ada_pool2d`).

    Shape:
        - input: ``(N, C, H, W)``
        - output: ``(N, C, H_out, W_out)``

    Example:
        >>> pool = AdaPool2d(2, beta_size=(4, 4))
        >>> pool(torch.randn(1, 3, 8, 8)).shape
        torch.Size([1, 3, 4, 4])
    """

    def __init__(
        self,
        kernel_size: _IntOrSeq,
        stride: _IntOrSeq | None = None,
        padding: _IntOrSeq = 0,
        ceil_mode: bool = False,
        *,
        beta_size: _IntOrSeq | None = None,
        beta_init: float = 0.5,
        similarity: str = "channel",
    ) -> None:
        super().__init__()
        self.similarity = _check_similarity(similarity)
        self.kernel_size, self.stride, self.padding = _pool_args(kernel_size, stride, padding)
        self.ceil_mode = bool(ceil_mode)
        if not 0.0 < float(beta_init) < 1.0:
            raise ValueError(f"beta_init must lie strictly between 0 and 1 (beta = sigmoid(logit)), got {beta_init}")
        self.beta_size = None if beta_size is None else ntuple(beta_size, 2, "beta_size")
        logit = torch.logit(torch.tensor(float(beta_init), dtype=torch.float64)).item()
        shape = () if self.beta_size is None else self.beta_size
        self.beta_logit = nn.Parameter(torch.full(shape, logit))

    @property
    def beta(self) -> Tensor:
        """The blend weight ``sigmoid(beta_logit)`` in ``[0, 1]``."""
        return torch.sigmoid(self.beta_logit)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, 2, "AdaPool2d")
        if self.beta_size is not None:
            kernel, stride, pad = self.kernel_size, self.stride, self.padding
            out = tuple(pool_out_size(x.shape[2 + d], kernel[d], stride[d], pad[d], self.ceil_mode) for d in (0, 1))
            if out != self.beta_size:
                raise ValueError(
                    f"AdaPool2d with beta_size={self.beta_size} got input {tuple(x.shape)}, whose output grid is "
                    f"{out}; use beta_size=None for a scalar beta that accepts any size"
                )
        return ada_pool2d(x, self.beta, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                          similarity=self.similarity)

    def extra_repr(self) -> str:
        beta = "scalar" if self.beta_size is None else f"{self.beta_size}"
        return (
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"ceil_mode={self.ceil_mode}, beta={beta}, similarity={self.similarity!r}"
        )


class AdaPool2dPhase(ModulePhaseOp):
    """An :class:`AdaPool2d` at any phase of its stride (scalar or per-position ``beta``): both stride-1 halves,
    sliced, then blended."""

    kind = "ada_pool"

    def at_phase(self, phase: Phase, x: Tensor) -> Tensor:
        m = self.module
        out = pool_out(m, x)
        edscw1 = edscw_pool2d(x, m.kernel_size, 1, m.padding, False, similarity=m.similarity)
        edscw = subsample_at(edscw1, self.factor, phase, out)
        soft = subsample_at(soft_pool2d(x, m.kernel_size, 1, m.padding, False), self.factor, phase, out)
        beta = m.beta.to(dtype=x.dtype)
        return beta * edscw + (1 - beta) * soft


register_layer("adapool", swap_rule=pooling_rule(AdaPool2d, "adapool"), phase_op=AdaPool2dPhase)(AdaPool2d)
