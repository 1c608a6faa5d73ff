"""The learned aggregator for dense outputs: attention over the candidates at every pixel of the output maps.

The same :class:`~polyglean.aggregate.learned.AttentionAggregator` as for classifiers, applied per pixel with the
candidates as tokens: a candidate's token at pixel ``p`` is its aligned output logits there (``K`` channels, the
model's own output, so the "head" is the identity), plus a learned code of its displacement ``(Δy, Δx)`` in input
pixels. Under the border rule of :func:`~polyglean.search.dense.align_maps` a candidate that does not cover a pixel
is masked there (neither attended to nor averaged). The untrained module is the plain mean of the covering
candidates, and attention is permutation-equivariant, so one module serves every budget.

Checkpoints are the classification aggregator's format (:func:`~polyglean.aggregate.learned.save_aggregator`) with
``meta["task"] = "segmentation"``; :func:`load_map_aggregator` refuses one made for another task or model.

Example:
    >>> agg = MapAttentionAggregator(AttentionAggregator(12, grid=(7, 7), dim=32))
    >>> maps, valid = torch.randn(1, 3, 12, 4, 5), torch.ones(1, 3, 4, 5, dtype=torch.bool)
    >>> shift = torch.zeros(1, 3, 2, dtype=torch.long)
    >>> torch.allclose(agg.combine(maps, valid, shift=shift), maps.mean(1), atol=1e-5)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from polyglean.aggregate.learned import AggregatorCheckpointError, AttentionAggregator, load_aggregator
from polyglean.errors import ArgumentError
from polyglean.search.dense import MapAggregator
from polyglean.sites import Site

__all__ = ["MapAttentionAggregator", "displacement_grid", "load_map_aggregator", "pixel_tokens"]

TASK = "segmentation"


def displacement_grid(search_space: Sequence[Site], sites: Sequence[Site]) -> tuple[int, int]:
    """``(T_h, T_w)``: one more than the largest displacement in input pixels the search space can produce
    (:func:`~polyglean.search.dense.pixel_displacement`), the size of the displacement code's tables."""
    from polyglean.search.dense import _scale_of

    gy, gx = 1, 1
    for s in search_space:
        sh, sw = _scale_of(s, sites)
        gy += (s.factor[0] - 1) * sh
        gx += (s.factor[1] - 1) * sw
    return gy, gx


def pixel_tokens(maps: Tensor, valid: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """The candidates' values and coverage at some pixels, as the module's input.

    Args:
        maps: Aligned candidate maps.
        valid: Coverage.
        index: Flat pixel indices ``y * W + x``.

    Shape:
        - maps: ``(N, B, K, H, W)``; valid: ``(N, B, H, W)``; index: ``(P,)``
        - output: ``(N, B, K, P, 1)`` and ``(N, B, P)``
    """
    f = maps.flatten(3)[..., index]
    return f[..., None], valid.flatten(2)[..., index]


class MapAttentionAggregator(MapAggregator):
    """A trained :class:`AttentionAggregator` applied at every pixel, in chunks of pixels (exact: attention runs
    over the candidates of one pixel only).

    Args:
        module: The attention module (``channels`` = the model's output channels).
        chunk: Pixels per chunk (bounds memory: the queries, keys and values of ``N * B * chunk`` tokens).
    """

    needs_shift = True

    def __init__(self, module: AttentionAggregator, chunk: int = 16384) -> None:
        if chunk < 1:
            raise ArgumentError(f"chunk must be >= 1, got {chunk}")
        self.module = module.eval()
        self.chunk = chunk

    def flops(self, images: int, budget: int, pixels: int) -> float:
        """Multiply-adds x 2 of aggregating ``budget`` candidates at ``pixels`` pixels of ``images`` images: per
        token the query/key/value projection and the MLP, per pixel the ``B x B`` attention (norms, codes and the
        softmax left out). Per pixel this is far more than a classifier's head, so it is counted in the cost."""
        cfg = self.module.config
        c, d, hidden = cfg["channels"], cfg["dim"], cfg["hidden"]
        per_token = 2 * (c * 3 * d + d * hidden + hidden * c)
        per_pixel = budget * per_token + 4 * budget * budget * d
        return float(images) * pixels * per_pixel

    @torch.no_grad()
    def combine(self, maps: Tensor, valid: Tensor, shift: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """Aggregated logits per pixel.

        Shape:
            - maps: ``(N, B, K, H, W)``; valid: ``(N, B, H, W)``; shift: ``(N, B, 2)`` in input pixels
            - output: ``(N, K, H, W)``
        """
        if shift is None:
            raise ArgumentError("the learned map aggregator needs the candidates' displacements (shift)")
        n, b, k, h, w = maps.shape
        param = next(self.module.parameters())
        flat = maps.flatten(3).to(param.device)
        cover = valid.flatten(2).to(param.device)
        out = torch.empty(n, k, h * w, dtype=maps.dtype, device=param.device)
        for i in range(0, h * w, self.chunk):
            f = flat[..., i:i + self.chunk]
            agg = self.module.attend(f[..., None].float(), shift, mask=cover[..., i:i + self.chunk])[0]
            out[..., i:i + self.chunk] = agg[..., 0].to(out.dtype)
        return out.reshape(n, k, h, w).to(maps.device)


def load_map_aggregator(path: str | Path, *, model: str | None = None, fingerprint: str | None = None,
                        search_space: list[str] | None = None, align: bool | None = None,
                        chunk: int = 16384) -> MapAttentionAggregator:
    """Loads a learned map aggregator (:func:`~polyglean.aggregate.learned.load_aggregator`, the same checks) and
    refuses a checkpoint trained for a classifier.

    Raises:
        AggregatorCheckpointError: unreadable, made for another task, model, weights, search space or alignment.
    """
    module = load_aggregator(path, model=model, fingerprint=fingerprint, search_space=search_space, align=align)
    meta = getattr(module, "meta", {})
    if meta.get("task") != TASK:
        raise AggregatorCheckpointError(
            f"aggregator {str(path)!r} was trained for task {meta.get('task', 'classification')!r}, not "
            f"{TASK!r}: train one with `polyglean train-aggregator --model {model or meta.get('model')} --labels DIR`")
    agg = MapAttentionAggregator(module, chunk=chunk)
    agg.meta = meta  # type: ignore[attr-defined]
    return agg
