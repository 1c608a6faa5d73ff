"""A segmentation model at a finer output stride on labelled images: native, stitched at some sites, and stitched
only where a mask says (class edges of the plain prediction, or low confidence).

Two ways to make the output stride finer (:class:`StitchEvalConfig` ``mode``):

- ``phase``: shift-and-stitch (:func:`polyglean.phase.stitch.stitch`): the trained model run at every phase of the
  sites, interleaved; exact, and refused (by name) where an op after the sites sees the whole map. The masked rows
  run :func:`~polyglean.phase.stitch.stitch_masked`: the extra phases only on tiles that cover the mask plus their
  receptive-field halo, so their cost falls with the mask's area.
- ``atrous``: the à trous network (:func:`polyglean.phase.atrous.atrous`): strides removed, later ops dilated,
  global ops taken over the finer map. Equal to ``phase`` where both work; it also runs models with global ops after
  the sites (e.g. CGNet), where it is a different network from any phase of the trained one. A global op needs the
  whole finer map, so its masked rows take the à trous output inside the mask and the plain one outside, from one
  full à trous pass: they cost the plain pass plus the full à trous pass (measured), never less.

Every row is scored with one confusion matrix over the set (mIoU, boundary mIoU within ``k`` pixels of label edges);
its differences to the native model come with paired bootstrap intervals over images. Cost is measured: FLOPs with
``torch.utils.flop_counter`` and wall time per configuration. Logits at another size than the labels are resized
bilinearly to the labels' size before the argmax, and the finer map is moved to where the native map's cells sit
(:meth:`StitchRunner.registration`): a bilinear resize places a stride-``S/R`` cell half a fine cell from its corner,
while the phase cells belong where the stride-``S`` cells they extend were placed in training; left unmoved, CGNet's
finer map is 2 pixels off and loses most of what it gains.

Example:
    >>> cfg = StitchEvalConfig(sites=("level3_0.conv1x1.conv",), mode="atrous", widths=(4,))  # doctest: +SKIP
    >>> report = evaluate_stitch(model, dataset, cfg, num_classes=11, ignore_index=11)  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from torch.utils.flop_counter import FlopCounterMode

from polyglean.data.loader import make_loader
from polyglean.errors import ArgumentError, ModelError
from polyglean.metrics_dense import DenseMeter, boundary_band, confusion_matrix, miou_difference
from polyglean.phase.net import PhaseNet
from polyglean.phase.stitch import edge_mask, plan, stitch_masked, uncertain_mask

__all__ = ["STITCH_MODES", "StitchEvalConfig", "StitchRunner", "evaluate_stitch", "translate"]

STITCH_MODES = ("phase", "atrous")
"""``phase``: shift-and-stitch (exact); ``atrous``: the dilated network (global ops over the finer map)."""


@dataclass(frozen=True)
class StitchEvalConfig:
    """What to evaluate.

    Args:
        sites: The sites to make finer (names or indices); every strided site after the first must be among them.
        mode: ``phase`` or ``atrous`` (see the module docstring).
        widths: Trimap widths of the ``edges`` masks, in cells of the output grid (one row each).
        thresholds: Confidence thresholds of the ``uncertain`` masks (one row each).
        batch_size: Images per batch.
        workers: Data-loading worker processes.
        bands: Boundary widths ``k`` (label pixels) for boundary / interior mIoU; the first gets an interval.
        chunk: Most phase states run at once (``phase`` mode; default all).
        register: Move the finer map to where the native map's cells sit (:meth:`StitchRunner.registration`);
            ``False`` scores it as the resize leaves it.
        seed: Seed of the bootstrap.
    """

    sites: tuple[str | int, ...]
    mode: str = "phase"
    widths: tuple[int, ...] = ()
    thresholds: tuple[float, ...] = ()
    batch_size: int = 1
    workers: int = 0
    bands: tuple[int, ...] = (3,)
    chunk: int | None = None
    register: bool = True
    seed: int = 0

    def check(self) -> None:
        """Raises :class:`ArgumentError` for a bad value, before any work."""
        if not self.sites:
            raise ArgumentError("stitching needs at least one site")
        if self.mode not in STITCH_MODES:
            raise ArgumentError(f"unknown stitch mode {self.mode!r}; choose from {', '.join(STITCH_MODES)}")
        for w in self.widths:
            if isinstance(w, bool) or not isinstance(w, int) or w < 0:
                raise ArgumentError(f"edge mask widths must be integers >= 0, got {w!r}")
        for t in self.thresholds:
            if not 0.0 < t <= 1.0:
                raise ArgumentError(f"uncertainty thresholds must be in (0, 1], got {t!r}")
        if len(set(self.widths)) != len(self.widths) or len(set(self.thresholds)) != len(self.thresholds):
            raise ArgumentError(f"repeated mask setting in widths {list(self.widths)} / thresholds "
                                f"{list(self.thresholds)}")
        if self.batch_size < 1 or self.workers < 0:
            raise ArgumentError(f"batch_size must be >= 1 and workers >= 0, got {self.batch_size}, {self.workers}")
        if self.chunk is not None and self.chunk < 1:
            raise ArgumentError(f"chunk must be >= 1, got {self.chunk}")
        if not self.bands or any(k < 0 for k in self.bands):
            raise ArgumentError(f"bands must be widths >= 0, got {list(self.bands)}")


def _logits(out: Any) -> Tensor:
    if isinstance(out, dict):
        if "out" not in out:
            raise ModelError(f"a segmentation model's dict output needs an 'out' entry, got {sorted(out)}")
        return out["out"]
    if not isinstance(out, Tensor) or out.dim() != 4:
        raise ModelError(f"a segmentation model must return (N, K, H, W) logits, got "
                         f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}")
    return out


class StitchRunner:
    """A model made finer at some sites, checked when made (before any image is read).

    Args:
        model: A segmentation model in eval mode.
        config: The sites and mode.
        input_size: ``(C, H, W)`` to discover the sites at.

    Raises:
        ArgumentError: unknown sites (listing the model's), a set that leaves a later site strided.
        ModelError: a layer after the sites that cannot take the finer map, named (``phase``: any global op or
            resize; ``atrous``: a transposed conv other than kernel = stride, a fixed-factor upsampling, a skip connection on the coarse grid).
    """

    def __init__(self, model: nn.Module, config: StitchEvalConfig, input_size: Sequence[int]) -> None:
        config.check()
        self.model, self.config = model, config
        self.net = PhaseNet(model, input_size)
        sites = [self._site(s) for s in config.sites]
        try:
            stitch_plan = plan(self.net, sites, for_atrous=config.mode == "atrous")
        except ModelError as err:
            if config.mode == "atrous":
                raise
            from polyglean.phase.atrous import atrous

            try:  # would the à trous network do? say so, or why not
                atrous(model, sites, input_size=input_size)
            except (ArgumentError, ModelError) as other:
                raise ModelError(f"{err} (The à trous network is refused too: {other})") from None
            raise ModelError(f"{err} Or run the à trous network instead (mode 'atrous', CLI --stitch-mode atrous), "
                             "which can take this layer (a global op is taken over the finer map there: a different "
                             "network than the trained model's phases)") from None
        self.sites = [s.name for s in stitch_plan.sites]
        self.factor = stitch_plan.factor
        if config.mode == "phase":
            if any(leaf and leaf != tuple(s.index for s in stitch_plan.sites) for leaf in stitch_plan.leaves):
                raise ArgumentError(f"the model's output depends on only some of the sites {self.sites}")
            self.fine: nn.Module | None = None
        else:
            from polyglean.phase.atrous import atrous

            self.fine = atrous(model, self.sites, input_size=input_size)
        main = [s for s in self.net.sites if s.main_path] or self.net.sites
        last = max(main, key=lambda s: s.reduction[0] * s.reduction[1])
        self.native_stride = tuple(last.reduction)
        self.stride = (self.native_stride[0] / self.factor[0], self.native_stride[1] / self.factor[1])
        # how much finer the output map is: less than the sites' factor where a transposed conv of the decoder
        # took some of it (ESPNet's: its output stays on the trained grid, so nothing there needs registering)
        self.output_factor = tuple(getattr(self.fine, "output_factor", self.factor))

    def _site(self, key: str | int) -> str | int:
        """A site name as given, or an index given as text ("3") where no site has that name."""
        if isinstance(key, str) and key.lstrip("-").isdigit():
            try:
                self.net.site(key)
            except ArgumentError:
                return int(key)
        return key

    def native(self, x: Tensor) -> Tensor:
        """The model's logits."""
        return _logits(self.model(x))

    def full(self, x: Tensor) -> Tensor:
        """The logits at the finer output stride."""
        if self.fine is not None:
            return _logits(self.fine(x))
        return _logits(self.net.stitch(x, self.sites, chunk=self.config.chunk))

    def mask_fn(self, kind: str, value: float, factor: tuple[int, int]) -> Callable[[Tensor], Tensor]:
        """The mask of ``kind`` (``edges`` of width ``value``, ``uncertain`` below ``value``) from plain logits, on
        the grid ``factor`` times finer."""
        if kind == "edges":
            return lambda plain: edge_mask(plain, factor, int(value))
        return lambda plain: uncertain_mask(plain, factor, float(value))

    def masked(self, x: Tensor, kind: str, value: float) -> tuple[Tensor, Tensor]:
        """``phase`` mode: masked stitching (the extra phases on tiles over the mask); logits and mask."""
        fn = self.mask_fn(kind, value, self.factor)
        res = stitch_masked(self.net, x, self.sites, lambda out: fn(_logits(out)), chunk=self.config.chunk)
        return _logits(res.output), res.mask

    def plain_mask(self, plain: Tensor, kind: str, value: float) -> Tensor:
        """``atrous`` mode: the mask on the plain output's grid (width in its cells)."""
        return self.mask_fn(kind, value, (1, 1))(plain)

    def registration(self, x: Tensor, label_size: tuple[int, ...]) -> tuple[float, float]:
        """How far (label pixels, down and right) the finer map must move to sit where the native one does.

        A coarse cell ``i`` at stride ``S`` that a bilinear resize (``align_corners=False``) brings to the labels
        lands at ``S i + (S - 1) / 2``, and the trained weights learned their outputs there. A finer cell
        ``j = R i + d`` holds the phase-``d`` output, the native cell's content moved by ``d S / R``: it belongs at
        ``(S / R) j + (S - 1) / 2``, but the same resize puts it at ``(S / R) j + (S / R - 1) / 2``. The difference,
        ``S (R - 1) / (2 R)`` (2 pixels for stride 8 made 4, 3 for 8 made 2), is the registration shift. Where
        a transposed conv of the decoder took the factor back (:class:`~polyglean.phase.atrous.SubKernelUpsample`),
        ``R`` is what is left of it at the output: each cell there already holds its own position's content.
        """
        scale = (label_size[0] / x.shape[-2], label_size[1] / x.shape[-1])
        out_stride = (self.native_stride[0] / self.output_factor[0], self.native_stride[1] / self.output_factor[1])
        return tuple((n - f) / 2 * k for n, f, k in zip(self.native_stride, out_stride, scale))  # type: ignore


def translate(maps: Tensor, shift: Sequence[float]) -> Tensor:
    """``maps`` moved by ``shift = (down, right)`` pixels (fractions interpolate linearly), edges replicated.

    Shape:
        - maps: ``(N, C, H, W)``; output: the same.
    """
    out = maps
    for dim, s in ((-2, float(shift[0])), (-1, float(shift[1]))):
        if s == 0:
            continue
        lo = int(s // 1)
        frac = s - lo
        out = (1 - frac) * _roll(out, lo, dim) + (frac * _roll(out, lo + 1, dim) if frac else 0)
    return out


def _roll(maps: Tensor, k: int, dim: int) -> Tensor:
    """Moves ``maps`` by ``k`` whole pixels along ``dim`` (positive: towards higher indices), edges replicated."""
    if k == 0:
        return maps
    n = maps.shape[dim]
    idx = (torch.arange(n, device=maps.device) - k).clamp(0, n - 1)
    return maps.index_select(dim, idx)


@dataclass
class _Row:
    meta: dict[str, Any]
    meter: DenseMeter
    band: list[Tensor] = field(default_factory=list)
    flops: float = 0.0
    seconds: float = 0.0
    area: float = 0.0


def _timed(fn: Callable[[], Any], count: bool) -> tuple[Any, float, float]:
    """``fn()``, its wall time and (when ``count``) its FLOPs."""
    if not count:
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0, float("nan")
    counter = FlopCounterMode(display=False)
    t0 = time.perf_counter()
    with counter:
        out = fn()
    return out, time.perf_counter() - t0, float(counter.get_total_flops())


def evaluate_stitch(model: nn.Module, dataset: Dataset, config: StitchEvalConfig, *, num_classes: int,
                    ignore_index: int | None, input_size: Sequence[int] | None = None,
                    runner: StitchRunner | None = None,
                    progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Evaluates ``model`` natively, at the finer output stride and with each mask, on ``dataset``.

    Args:
        model: A segmentation model in eval mode returning ``(N, K', H, W)`` logits (or a dict with ``"out"``).
        dataset: ``(image tensor, label map)`` pairs, e.g. a
            :class:`~polyglean.data.segmentation.SegmentationDataset`.
        config: Sites, mode and masks.
        num_classes: Classes scored.
        ignore_index: Label value of unlabelled pixels.
        input_size: ``(C, H, W)`` to discover the sites at (default: the first image's).
        runner: A :class:`StitchRunner` made beforehand (to validate before loading data); default: made here.
        progress: Called with ``(images done, images total)``.

    Returns:
        ``{"results": [row, ...], "num_images", "sites", "factor", "native_stride", "stride", "mode"}``. Rows as the
        other segmentation rows (``budget``, ``aggregate``, ``align``, ``tta``, ``miou``, ``per_class_iou``,
        ``boundary_miou_k*``, ``forward_equivalents``, ``seconds``, ``seconds_per_image``, ``miou_delta``) plus
        ``stitch`` (``none``, ``full``, ``edges``, ``uncertain``), ``mask_param``, ``mode``, ``sites``,
        ``output_stride``, ``gflops_per_image`` (measured), ``mask_area`` (share of the finer grid) and
        ``boundary_miou_delta`` (paired bootstrap on the first band).

    FLOPs: the native and full rows are counted on the first batch of each input size (their count does not depend
    on the content) and the masked ``phase`` rows on every batch; times are per call, without the counter except
    for the masked ``phase`` rows, whose count depends on the mask (their times include the counter's overhead).
    """
    config.check()
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ArgumentError("the dataset is empty")
    if runner is None:
        size = tuple(input_size) if input_size is not None else tuple(dataset[0][0].shape)
        runner = StitchRunner(model, config, size)
    band_k = config.bands[0]
    base_meta = {"budget": 1, "aggregate": "none", "align": False, "tta": "none", "mode": config.mode}

    def row(stitch: str, param: float | None, stride: Sequence[float], sites: list[str]) -> _Row:
        return _Row({**base_meta, "stitch": stitch, "mask_param": param, "sites": sites,
                     "output_stride": list(stride)}, DenseMeter(num_classes, ignore_index, tuple(config.bands)))

    rows: dict[tuple[str, float | None], _Row] = {
        ("none", None): row("none", None, runner.native_stride, []),
        ("full", None): row("full", None, runner.stride, runner.sites),
    }
    rows[("none", None)].meta["mode"] = "native"
    for w in config.widths:
        rows[("edges", w)] = row("edges", w, runner.stride, runner.sites)
    for t in config.thresholds:
        rows[("uncertain", t)] = row("uncertain", t, runner.stride, runner.sites)

    counted: dict[tuple[str, tuple[int, ...]], float] = {}
    shift: tuple[float, float] = (0.0, 0.0)
    loader = make_loader(dataset, batch_size=config.batch_size, workers=config.workers)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    done, total = 0, len(dataset)  # type: ignore[arg-type]
    with torch.no_grad():
        for x, y in loader:
            x = x.to(device)
            label_size = tuple(y.shape[-2:])
            shape = tuple(x.shape)

            def cost(key: str, fn: Callable[[], Tensor]) -> tuple[Tensor, float, float]:
                if (key, shape) not in counted:
                    _, _, counted[(key, shape)] = _timed(fn, True)
                out, seconds, _ = _timed(fn, False)
                return out, seconds, counted[(key, shape)]

            plain, s_plain, f_plain = cost("native", lambda: runner.native(x))
            plain_l = _resize(plain, label_size)
            ref = plain_l.argmax(1).cpu()
            _score(rows[("none", None)], ref, y, None, band_k, ignore_index, num_classes, f_plain, s_plain, 0.0)
            shift = runner.registration(x, label_size) if config.register else (0.0, 0.0)
            fine, s_fine, f_fine = cost("full", lambda: runner.full(x))
            fine_l = translate(_resize(fine, label_size), shift)
            _score(rows[("full", None)], fine_l.argmax(1).cpu(), y, ref, band_k, ignore_index, num_classes, f_fine,
                   s_fine, 1.0)
            for (kind, value), r in rows.items():
                if kind not in ("edges", "uncertain"):
                    continue
                if runner.fine is None:
                    (out, mask), seconds, flops = _timed(lambda: runner.masked(x, kind, value), True)
                    out_l = translate(_resize(out, label_size), shift)
                    mask_l = translate(_resize(mask[:, None].float(), label_size, "nearest"), shift)[:, 0] > 0.5
                else:
                    t0 = time.perf_counter()
                    mask = runner.plain_mask(plain, kind, value)
                    mask_l = _resize(mask[:, None].float(), label_size, "nearest")[:, 0] > 0.5
                    out_l = fine_l
                    seconds, flops = s_plain + s_fine + time.perf_counter() - t0, f_plain + f_fine
                pred = torch.where(mask_l[:, None], out_l, plain_l).argmax(1).cpu()
                _score(r, pred, y, ref, band_k, ignore_index, num_classes, flops, seconds,
                       float(mask.float().mean()) * x.shape[0])
            done += x.shape[0]
            if progress is not None:
                progress(done, total)

    native = rows[("none", None)]
    base_conf, base_band = torch.stack(native.meter.per_image), torch.stack(native.band)
    out_rows = []
    for key, r in rows.items():
        entry: dict[str, Any] = {**r.meta, **r.meter.scores(),
                                 "gflops_per_image": r.flops / done / 1e9,
                                 "forward_equivalents": r.flops / native.flops if native.flops else float("nan"),
                                 "seconds": r.seconds, "seconds_per_image": r.seconds / done,
                                 "mask_area": r.area / done if key[0] != "none" else None}
        if key != ("none", None):
            entry["miou_delta"] = miou_difference(base_conf, torch.stack(r.meter.per_image), seed=config.seed).as_dict()
            entry[f"boundary_miou_k{band_k}_delta"] = miou_difference(base_band, torch.stack(r.band),
                                                                     seed=config.seed).as_dict()
        out_rows.append(entry)
    return {"results": out_rows, "num_images": done, "sites": runner.sites, "factor": list(runner.factor),
            "native_stride": list(runner.native_stride), "stride": list(runner.stride), "mode": config.mode,
            "registration_shift": list(shift), "all_sites": [s.name for s in runner.net.sites]}


def _resize(maps: Tensor, size: tuple[int, ...], mode: str = "bilinear") -> Tensor:
    """``maps`` at the labels' size (bilinear, ``align_corners=False``; nearest for masks) where they differ."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    if mode == "nearest":
        return F.interpolate(maps, size=size, mode="nearest")
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def _score(r: _Row, pred: Tensor, y: Tensor, ref: Tensor | None, k: int, ignore_index: int | None,
           num_classes: int, flops: float, seconds: float, area: float) -> None:
    r.meter.update(pred, y, ref)
    band = boundary_band(y, k)
    for i in range(y.shape[0]):
        r.band.append(confusion_matrix(pred[i], y[i], num_classes, ignore_index, band[i]))
    r.flops += flops
    r.seconds += seconds
    r.area += area
