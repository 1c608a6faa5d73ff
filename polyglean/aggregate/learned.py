"""The learned aggregator: attention over the candidates at every location of the final feature maps.

``A(F) = 1/B Σ_s (f_s + MLP(Σ_s' W_ss' v_s'))`` with ``W_ss' = softmax_s'(q_s · k_s')``, computed per spatial
location with the candidates as tokens and a learned code of each candidate's displacement ``(Δy, Δx)`` added to
its features (REFERENCE.md §1, "learned"). The MLP's output layer starts at zero, so an untrained module is plain
averaging; attention is permutation-equivariant over the candidates, so one trained module serves every budget.

A trained module is saved with the model it was trained for (preset or spec, a fingerprint of its weights, the
sites and the displacement grid) and :func:`load_aggregator` refuses it for another model.
"""

from __future__ import annotations

import hashlib
import math
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from polyglean.aggregate.aggregators import AGGREGATORS, Aggregator
from polyglean.errors import ArgumentError, CheckpointError
from polyglean.io import load_torch, write_torch

__all__ = [
    "AggregatorCheckpointError",
    "AttentionAggregator",
    "load_aggregator",
    "model_fingerprint",
    "save_aggregator",
    "shipped_aggregator",
]

FORMAT = "polyglean.aggregator"
VERSION = 1


class AggregatorCheckpointError(CheckpointError):
    """A learned-aggregator checkpoint is unreadable, malformed, or made for another model."""


@AGGREGATORS.register("learned")
class AttentionAggregator(nn.Module, Aggregator):
    """Attention over candidates per location of the final feature map, then the model's own head.

    Args:
        channels: Channels ``C`` of the final feature map.
        grid: ``(T_h, T_w)``: displacements range over ``[0, T_h) x [0, T_w)`` (the alignment factor).
        dim: Width of queries, keys and values (all heads together).
        heads: Attention heads; must divide ``dim``.
        hidden: Hidden width of the MLP (default ``2 * dim``).
        spatial_dims: Where the spatial axes of one feature map are: ``(-2, -1)`` for ``(C, H, W)`` or ``(1, 2)``
            for channels-last ``(H, W, C)`` (as :attr:`PhaseNet.feature_dims`).

    Shape:
        - features: ``(N, B, C, H, W)`` (or ``(N, B, H, W, C)``)
        - shift: ``(N, B, 2)``, integer ``(Δy, Δx)``
        - output: ``(N, C, H, W)`` (or ``(N, H, W, C)``)

    Example:
        >>> agg = AttentionAggregator(64, grid=(4, 4))
        >>> f = torch.randn(2, 5, 64, 8, 8)
        >>> torch.allclose(agg(f, torch.zeros(2, 5, 2, dtype=torch.long)), f.mean(1), atol=1e-6)
        True
    """

    requires_training = True

    def __init__(self, channels: int, grid: tuple[int, int], dim: int = 64, heads: int = 4,
                 hidden: int | None = None, spatial_dims: tuple[int, int] = (-2, -1)) -> None:
        super().__init__()
        if channels < 1 or dim < 1 or heads < 1:
            raise ArgumentError(f"channels, dim and heads must be >= 1, got {channels}, {dim}, {heads}")
        if dim % heads:
            raise ArgumentError(f"heads ({heads}) must divide dim ({dim})")
        if len(grid) != 2 or min(grid) < 1:
            raise ArgumentError(f"grid must be two positive sizes (T_h, T_w), got {grid}")
        if tuple(spatial_dims) not in ((-2, -1), (1, 2)):
            raise ArgumentError(f"spatial_dims must be (-2, -1) or (1, 2), got {spatial_dims}")
        hidden = hidden or 2 * dim
        self.config = {"channels": channels, "grid": [int(grid[0]), int(grid[1])], "dim": dim, "heads": heads,
                       "hidden": hidden, "spatial_dims": [int(spatial_dims[0]), int(spatial_dims[1])]}
        self.channels, self.grid, self.heads = channels, (int(grid[0]), int(grid[1])), heads
        self.spatial_dims = (int(spatial_dims[0]), int(spatial_dims[1]))
        self.code_y = nn.Embedding(self.grid[0], channels)
        self.code_x = nn.Embedding(self.grid[1], channels)
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Small displacement codes and a zero output layer: the untrained module is the plain average."""
        nn.init.normal_(self.code_y.weight, std=0.02)
        nn.init.normal_(self.code_x.weight, std=0.02)
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def _tokens(self, features: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """``(N, B, ...)`` feature maps as ``(N, B, H*W, C)`` tokens, and the shape of one map."""
        if features.dim() != 5:
            raise ArgumentError(f"features must be (N, B, C, H, W) or (N, B, H, W, C), got shape {tuple(features.shape)}")
        per = tuple(features.shape[2:])
        if self.spatial_dims == (-2, -1):
            c = per[0]
            tokens = features.flatten(3).transpose(2, 3)
        else:
            c = per[-1]
            tokens = features.flatten(2, 3)
        if c != self.channels:
            raise ArgumentError(f"this aggregator was built for {self.channels} channels, got feature maps {per}")
        return tokens, per

    def _check_shift(self, shift: Tensor, n: int, b: int) -> Tensor:
        if shift.shape != (n, b, 2):
            raise ArgumentError(f"shift must be (N, B, 2) = ({n}, {b}, 2), got {tuple(shift.shape)}")
        shift = shift.long()
        if (shift < 0).any() or (shift[..., 0] >= self.grid[0]).any() or (shift[..., 1] >= self.grid[1]).any():
            raise ArgumentError(
                f"displacements {shift.flatten(0, 1).unique(dim=0).tolist()} fall outside the grid {self.grid} this "
                "aggregator was trained on (was it trained with another search space?)"
            )
        return shift

    def attend(self, features: Tensor, shift: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The aggregate and the attention each candidate receives.

        Args:
            features: Candidate feature maps (see the class).
            shift: Their displacements.
            mask: ``(N, B, H*W)`` bool, where a candidate has a value (dense maps aligned under the border rule):
                a candidate is neither attended to nor averaged where it is false. Every location needs one true
                candidate. Default: all true.

        Returns:
            ``(aggregate, received)``: the aggregated feature map ``(N, C, H, W)`` (or channels-last) and, per
            candidate, the attention it receives averaged over queries, heads and locations ``(N, B)``.
        """
        n, b = features.shape[:2]
        tokens, per = self._tokens(features)
        shift = self._check_shift(shift.to(features.device), n, b)
        code = self.code_y(shift[..., 0]) + self.code_x(shift[..., 1])  # (N, B, C)
        x = tokens.to(self.qkv.weight.dtype)
        t = self.norm(x + code[:, :, None, :])  # (N, B, P, C)
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        p = x.shape[2]
        dh = q.shape[-1] // self.heads

        def split(z: Tensor) -> Tensor:  # (N, B, P, D) -> (N, P, heads, B, dh)
            return z.reshape(n, b, p, self.heads, dh).permute(0, 2, 3, 1, 4)

        q, k, v = split(q), split(k), split(v)
        scores = q @ k.transpose(-1, -2) / math.sqrt(dh)  # (N, P, heads, B, B)
        if mask is not None:
            if mask.shape != (n, b, p):
                raise ArgumentError(f"mask must be (N, B, H*W) = ({n}, {b}, {p}), got {tuple(mask.shape)}")
            keep = mask.to(features.device, torch.bool)
            scores = scores.masked_fill(~keep.permute(0, 2, 1)[:, :, None, None, :], float("-inf"))
        w = torch.softmax(scores, dim=-1)
        ctx = (w @ v).permute(0, 3, 1, 2, 4).reshape(n, b, p, self.heads * dh)
        if mask is None:
            out = (x + self.mlp(ctx)).mean(1)  # (N, P, C)
        else:
            wk = keep.to(x.dtype)[..., None]  # (N, B, P, 1)
            out = ((x + self.mlp(ctx)) * wk).sum(1) / wk.sum(1)
        if self.spatial_dims == (-2, -1):
            out = out.transpose(1, 2).reshape(n, *per)
        else:
            out = out.reshape(n, *per)
        received = w.mean(dim=(1, 2, 3))  # average over locations, heads and queries: (N, B)
        return out.to(features.dtype), received

    def forward(self, features: Tensor, shift: Tensor) -> Tensor:
        return self.attend(features, shift)[0]

    def combine(self, values: Tensor, logits: Tensor, shift: Tensor) -> Tensor:
        return self(values, shift)


# ------------------------------------------------------------------------------------------------- checkpoints
def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's state (names, shapes, dtypes and values, in name order): the same weights, the same
    fingerprint on every machine."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_aggregator(path: str | Path, module: AttentionAggregator, *, meta: dict[str, Any],
                    extra: dict[str, Any] | None = None) -> None:
    """Writes ``module`` and what it was trained for to ``path`` atomically (:func:`polyglean.io.write_torch`).

    Args:
        path: Destination file.
        module: The trained aggregator.
        meta: What it is for: ``model`` (spec), ``model_sha256`` (:func:`model_fingerprint`), ``sites`` (names),
            ``search_space`` (names), ``align`` (bool), and anything else worth recording (training set-up).
        extra: More entries to store beside it (e.g. optimiser state, to resume training).
    """
    for key in ("model", "model_sha256", "sites", "search_space", "align"):
        if key not in meta:
            raise ArgumentError(f"aggregator metadata lacks {key!r}")
    payload = {"format": FORMAT, "version": VERSION, "config": dict(module.config), "meta": meta,
               "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()}, **(extra or {})}
    write_torch(path, payload)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads an aggregator checkpoint (:func:`polyglean.io.load_torch`) and checks its format.

    Raises:
        AggregatorCheckpointError: missing, unreadable or not an aggregator checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise AggregatorCheckpointError(f"aggregator checkpoint {str(path)!r} does not exist")
    try:
        payload = load_torch(path, "aggregator checkpoint")
    except CheckpointError as e:
        raise AggregatorCheckpointError(f"cannot read aggregator checkpoint: {e}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise AggregatorCheckpointError(f"{str(path)!r} is not a polyglean aggregator checkpoint")
    if payload.get("version") != VERSION:
        raise AggregatorCheckpointError(f"{str(path)!r} has format version {payload.get('version')}; this "
                                        f"polyglean reads version {VERSION}")
    return payload


def module_from_checkpoint(payload: dict[str, Any], name: str = "checkpoint") -> AttentionAggregator:
    """The module of a payload returned by :func:`read_checkpoint` (eval mode), loaded strictly.

    Raises:
        AggregatorCheckpointError: its configuration or weights are malformed.
    """
    try:
        cfg = payload["config"]
        module = AttentionAggregator(cfg["channels"], tuple(cfg["grid"]), dim=cfg["dim"], heads=cfg["heads"],
                                     hidden=cfg["hidden"], spatial_dims=tuple(cfg["spatial_dims"]))
        module.load_state_dict(payload["state_dict"], strict=True)
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise AggregatorCheckpointError(f"aggregator {name!r} is malformed: {e}") from None
    return module.eval()


def load_aggregator(path: str | Path, *, model: str | None = None, fingerprint: str | None = None,
                    search_space: list[str] | None = None, align: bool | None = None) -> AttentionAggregator:
    """Loads a trained :class:`AttentionAggregator` and checks it was trained for this model and set-up.

    Args:
        path: The checkpoint.
        model: The model spec in use (e.g. ``cifar10-resnet20``); refused if it differs from the recorded one.
        fingerprint: :func:`model_fingerprint` of the model in use; refused if the weights differ.
        search_space: Names of the searched sites; the displacement code only means something for the same first
            site and grid.
        align: Whether the candidates will be aligned; must match how the module was trained.

    Raises:
        AggregatorCheckpointError: unreadable, or made for another model / search space / alignment.
    """
    payload = read_checkpoint(path)
    meta = payload.get("meta", {})
    name = str(path)
    if model is not None and meta.get("model") != model:
        raise AggregatorCheckpointError(
            f"aggregator {name!r} was trained for model {meta.get('model')!r}, not {model!r}")
    if fingerprint is not None and meta.get("model_sha256") != fingerprint:
        raise AggregatorCheckpointError(
            f"aggregator {name!r} was trained for {meta.get('model')!r} with other weights (sha256 "
            f"{str(meta.get('model_sha256'))[:12]}…, these are {fingerprint[:12]}…); train one for these weights "
            "with `polyglean train-aggregator`")
    if search_space is not None and list(meta.get("search_space", []))[:1] != list(search_space)[:1]:
        raise AggregatorCheckpointError(
            f"aggregator {name!r} was trained with search space {meta.get('search_space')}, whose first site sets "
            f"the displacement grid; the search now starts at {search_space[0]!r}")
    if align is not None and bool(meta.get("align")) != bool(align):
        raise AggregatorCheckpointError(
            f"aggregator {name!r} was trained on {'aligned' if meta.get('align') else 'unaligned'} features; use it "
            f"{'with' if meta.get('align') else 'without'} alignment (or train another)")
    module = module_from_checkpoint(payload, name)
    module.meta = meta  # type: ignore[assignment]
    return module


def shipped_aggregator(model: str) -> Path | None:
    """The aggregator trained by the polyglean authors for a preset and shipped in the package, if any."""
    ref = resources.files("polyglean.aggregate").joinpath("weights", f"{model}.pt")
    path = Path(str(ref))
    return path if path.is_file() else None
