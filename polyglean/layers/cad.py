"""CAD: content-adaptive downsampling (Hesse et al., "Content-Adaptive Downsampling in Convolutional Neural
Networks", CVPRW 2023).

A downsampling site keeps the high resolution only where a mask says so; elsewhere each ``R_h x R_w`` cell is
pooled (averaged) to one value. Run densely, the site's op works at stride 1, the cell grid's pooled values are
repeated over their cells, and every later op is dilated by ``R`` (as in a DeepLab at output stride 8), so the
masked cells see the finer grid and the others the coarse one. Two masks, as in the paper:

- ``edge``: ``|∇ gray| >= threshold`` on the input image (Sobel), dilated by a trimap ``width`` (image pixels), a
  cell kept when any of its pixels is;
- ``learned``: a 1x1 conv on the cell-pooled features gives two logits per cell; training samples the mask with
  straight-through Gumbel-softmax (so the choice gets gradients), evaluation takes the argmax.

:func:`cad_pool2d` is the pure function, :class:`CADPool2d`/:class:`CADMask` the Modules, :func:`cad_swap` the
model rewrite (``polyglean.swap(model, "cad")``), :func:`cad_multiply_adds` the multiply-add count a sparse
implementation would spend (the paper's measure).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from polyglean.errors import ArgumentError, ModelError
from polyglean.layers._registry import register_layer
from polyglean.layers._registry import MODEL_RULES

__all__ = [
    "CADMask",
    "CADPool2d",
    "cad_multiply_adds",
    "cad_pool2d",
    "cad_swap",
    "gumbel_mask",
    "image_edge_mask",
]


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    if len(v) != 2:
        raise ArgumentError(f"expected an int or a pair, got {v!r}")
    return (int(v[0]), int(v[1]))


def _cells(size: Sequence[int], factor: tuple[int, int]) -> tuple[int, int]:
    return (-(-int(size[0]) // factor[0]), -(-int(size[1]) // factor[1]))


def cad_pool2d(x: Tensor, mask: Tensor, factor: int | tuple[int, int] = 2) -> Tensor:
    """Keeps ``x`` where ``mask`` is 1 and averages each ``R_h x R_w`` cell where it is 0.

    A soft mask (values in ``[0, 1]``) blends the two, so a straight-through mask passes gradients to its logits.
    Cells cut by the bottom/right border average their pixels inside the map.

    Args:
        x: The high-resolution map.
        mask: One value per cell.
        factor: Cell size ``(R_h, R_w)``.

    Shape:
        - x: ``(N, C, H, W)``
        - mask: ``(N, 1, ceil(H / R_h), ceil(W / R_w))`` or ``(N, ceil(H / R_h), ceil(W / R_w))``
        - output: ``(N, C, H, W)``

    Example:
        >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> cad_pool2d(x, torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]))[0, 0, :2]
        tensor([[0.0000, 1.0000, 4.5000, 4.5000],
                [4.0000, 5.0000, 4.5000, 4.5000]])
    """
    rh, rw = _pair(factor)
    if rh < 1 or rw < 1:
        raise ArgumentError(f"factor must be positive, got {factor!r}")
    if x.dim() != 4:
        raise ArgumentError(f"cad_pool2d needs x of shape (N, C, H, W), got {tuple(x.shape)}")
    if mask.dim() == 3:
        mask = mask[:, None]
    h, w = x.shape[-2:]
    cells = _cells((h, w), (rh, rw))
    if mask.dim() != 4 or mask.shape[1] != 1 or tuple(mask.shape[-2:]) != cells or mask.shape[0] != x.shape[0]:
        raise ArgumentError(
            f"mask must have shape ({x.shape[0]}, 1, {cells[0]}, {cells[1]}) for x of shape {tuple(x.shape)} and "
            f"factor {(rh, rw)}, got {tuple(mask.shape)}"
        )
    mask = mask.to(x.dtype)
    pooled = F.avg_pool2d(x, (rh, rw), (rh, rw), ceil_mode=True)
    up = pooled.repeat_interleave(rh, -2).repeat_interleave(rw, -1)[..., :h, :w]
    m = mask.repeat_interleave(rh, -2).repeat_interleave(rw, -1)[..., :h, :w]
    return m * x + (1 - m) * up


def image_edge_mask(image: Tensor, cells: Sequence[int], threshold: float = 0.1, width: int = 1) -> Tensor:
    """The edge mask: ``|∇ gray| >= threshold`` (Sobel), dilated by ``width`` pixels, reduced to a cell grid.

    Args:
        image: Input images (3 channels: luma ``0.299 R + 0.587 G + 0.114 B``; otherwise the channel mean). The
            threshold is in the image's own units per pixel.
        cells: ``(h, w)`` of the cell grid; a cell is 1 when any pixel of its image region is.
        threshold: Gradient magnitude above which a pixel is an edge.
        width: Trimap width in image pixels.

    Shape:
        - image: ``(N, C, H, W)``
        - output: ``(N, 1, h, w)``, 0/1 in the image's dtype.
    """
    if image.dim() != 4:
        raise ArgumentError(f"image must be (N, C, H, W), got shape {tuple(image.shape)}")
    if width < 0:
        raise ArgumentError(f"trimap width must be >= 0, got {width}")
    if image.shape[1] == 3:
        luma = torch.tensor([0.299, 0.587, 0.114], device=image.device, dtype=image.dtype)
        gray = (image * luma.view(1, 3, 1, 1)).sum(1, keepdim=True)
    else:
        gray = image.mean(1, keepdim=True)
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=image.device,
                         dtype=image.dtype) / 8
    padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, sobel.view(1, 1, 3, 3))
    gy = F.conv2d(padded, sobel.t().reshape(1, 1, 3, 3))
    edge = ((gx * gx + gy * gy).sqrt() >= threshold).to(image.dtype)
    if width > 0:
        edge = F.max_pool2d(edge, 2 * width + 1, 1, width)
    return F.adaptive_max_pool2d(edge, tuple(int(c) for c in cells))


def gumbel_mask(logits: Tensor, tau: float = 1.0, *, training: bool = True) -> Tensor:
    """A hard 0/1 mask from two logits per cell: straight-through Gumbel-softmax in training, argmax otherwise.

    Shape:
        - logits: ``(N, 2, h, w)`` (channel 1: keep the high resolution)
        - output: ``(N, 1, h, w)``
    """
    if logits.dim() != 4 or logits.shape[1] != 2:
        raise ArgumentError(f"logits must be (N, 2, h, w), got shape {tuple(logits.shape)}")
    if training:
        return F.gumbel_softmax(logits, tau=tau, hard=True, dim=1)[:, 1:2]
    return (logits[:, 1:2] > logits[:, 0:1]).to(logits.dtype)


@register_layer("cad")
class CADPool2d(nn.Module):
    """Content-adaptive downsampling: keep the map where the mask is 1, average each cell where it is 0.

    Args:
        factor: Cell size ``(R_h, R_w)``.

    Shape:
        - x: ``(N, C, H, W)``; mask: ``(N, 1, ceil(H / R_h), ceil(W / R_w))``
        - output: ``(N, C, H, W)``
    """

    def __init__(self, factor: int | tuple[int, int] = 2) -> None:
        super().__init__()
        self.factor = _pair(factor)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return cad_pool2d(x, mask, self.factor)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class CADMask(nn.Module):
    """The mask of a CAD site: from the input image's edges, or learned from the features.

    Args:
        mode: ``"edge"`` or ``"learned"``.
        factor: Cell size ``(R_h, R_w)`` on the features.
        channels: Feature channels (``"learned"`` only).
        threshold: Edge threshold (``"edge"``).
        width: Trimap width in image pixels (``"edge"``).
        tau: Gumbel-softmax temperature (``"learned"``).
        keep: Initial share of high-resolution cells (``"learned"``): the logits' bias starts at its log-odds.

    Shape:
        - features: ``(N, C, H, W)``; image: ``(N, C_img, H_img, W_img)``
        - output: ``(N, 1, ceil(H / R_h), ceil(W / R_w))``
    """

    def __init__(self, mode: str = "edge", factor: int | tuple[int, int] = 2, *, channels: int | None = None,
                 threshold: float = 0.1, width: int = 1, tau: float = 1.0, keep: float = 0.5) -> None:
        super().__init__()
        if mode not in ("edge", "learned"):
            raise ArgumentError(f"CAD mask must be 'edge' or 'learned', got {mode!r}")
        if mode == "learned" and (channels is None or channels < 1):
            raise ArgumentError(f"a learned CAD mask needs the feature channels, got channels={channels!r}")
        if not 0.0 < keep < 1.0:
            raise ArgumentError(f"keep must be in (0, 1), got {keep}")
        self.mode, self.factor = mode, _pair(factor)
        self.threshold, self.width, self.tau = float(threshold), int(width), float(tau)
        self.predict: nn.Conv2d | None = None
        if mode == "learned":
            assert channels is not None
            self.predict = nn.Conv2d(channels, 2, 1)
            nn.init.zeros_(self.predict.weight)
            with torch.no_grad():
                self.predict.bias.copy_(torch.tensor([0.0, math.log(keep / (1 - keep))]))

    def forward(self, features: Tensor, image: Tensor | None = None) -> Tensor:
        cells = _cells(features.shape[-2:], self.factor)
        if self.mode == "edge":
            if image is None:
                raise ArgumentError("the edge CAD mask needs the input image")
            return image_edge_mask(image, cells, self.threshold, self.width).to(features.dtype)
        assert self.predict is not None
        pooled = F.avg_pool2d(features, self.factor, self.factor, ceil_mode=True)
        return gumbel_mask(self.predict(pooled), self.tau, training=self.training)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, factor={self.factor}"


# ------------------------------------------------------------------------------------------------ the rewrite
_STRIDED = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


def cad_swap(model: nn.Module, *, site: str | int | None = None, mask: str = "edge",
             input_size: Sequence[int] = (3, 224, 224), **mask_kwargs: Any) -> fx.GraphModule:
    """A copy of ``model`` with content-adaptive downsampling at one site (default: the last).

    The site's ops run at stride 1 followed by :class:`CADPool2d`; one :class:`CADMask` (fed the site's first op's
    output and the input image) gives the mask all of them share; every later conv and max pool is dilated by the
    site's factor, so the result is the finer-output-stride network with the unmasked cells pooled. Where the mask
    is all 1 it is exactly the model with the site's stride removed (shift-and-stitch's network); all 0, the cells
    are constant.

    Args:
        model: Any image model that PhaseNet can trace; not modified.
        site: The site (name or index); it must be the last strided one.
        mask: ``"edge"`` or ``"learned"`` (see :class:`CADMask`).
        input_size: ``(C, H, W)`` for discovery.
        **mask_kwargs: Passed to :class:`CADMask` (``threshold``, ``width``, ``tau``, ``keep``).

    Returns:
        The rewritten ``torch.fx.GraphModule`` (new modules at ``<site>.cad_mask`` and ``<site>.cad_pool``; the
        original state-dict keys are unchanged), in ``model``'s train/eval mode. Its output is finer by the factor.

    Raises:
        ModelError: a later site keeps its stride, a later op sees the whole map (global pooling, named), an op of
            the site or after it has no dilated form (a functional op, an average pool), or a module is shared
            across the site.
    """
    from polyglean.phase.net import PhaseNet
    from polyglean.phase.stitch import plan

    if mask not in ("edge", "learned"):
        raise ArgumentError(f"CAD mask must be 'edge' or 'learned', got {mask!r}")
    unknown = set(mask_kwargs) - {"threshold", "width", "tau", "keep"}
    if unknown:
        raise ArgumentError(f"unknown CAD option(s) {sorted(unknown)}; known: keep, tau, threshold, width")
    copied = copy.deepcopy(model).eval()  # traced in eval mode; the rewrite gets the model's mode back at the end
    net = PhaseNet(copied, input_size=input_size)
    if not net.sites:
        raise ModelError(f"{type(model).__name__} has no subsampling site to make content-adaptive")
    try:
        chosen = net.site(site if site is not None else -1)
    except ValueError as err:
        raise ArgumentError(str(err)) from None
    try:
        plan(net, [chosen])
    except (ArgumentError, ModelError) as err:
        raise ModelError(f"cannot swap 'cad' at site '{chosen.name}': {err}") from None
    gm = net.discovery.graph_module
    ops = net.discovery.ops
    site_nodes = [n for n, (_, idx) in ops.items() if idx == chosen.index]
    deps: dict[fx.Node, bool] = {}
    for n in gm.graph.nodes:
        deps[n] = n in site_nodes or any(deps[a] for a in n.all_input_nodes)
    rh, rw = chosen.factor
    for n in site_nodes:
        module = gm.get_submodule(str(n.target)) if n.op == "call_module" else None
        if not isinstance(module, _STRIDED):
            raise ModelError(
                f"cannot swap 'cad' at site '{chosen.name}': its op '{ops[n][0].name}' is not a Conv2d or pooling "
                "module, so it cannot run at stride 1"
            )
        module.stride = (1, 1)
    users: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            users.setdefault(str(n.target), []).append(n)
    for target, nodes in users.items():
        after = [deps[n] and n not in site_nodes for n in nodes]
        if not any(after):
            continue
        module = gm.get_submodule(target)
        kernel = getattr(module, "kernel_size", None)
        if kernel is None:
            continue
        kh, kw = _pair(kernel)
        if kh == 1 and kw == 1:
            continue
        if not all(after):
            raise ModelError(f"cannot swap 'cad': layer '{target}' is called both before and after site "
                             f"'{chosen.name}', so it cannot be dilated for one call only")
        if not isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
            raise ModelError(f"cannot swap 'cad': layer '{target}' ({type(module).__name__}) after site "
                             f"'{chosen.name}' has no dilated form")
        dh, dw = _pair(module.dilation)
        module.dilation = (dh * rh, dw * rw)
        if not isinstance(module.padding, str):
            ph, pw = _pair(module.padding)
            module.padding = (ph * rh, pw * rw)
    for n in gm.graph.nodes:
        if n.op == "call_function" and deps[n] and n not in site_nodes and getattr(n.target, "__name__", "") in (
                "conv2d", "max_pool2d", "avg_pool2d"):
            raise ModelError(f"cannot swap 'cad': functional '{n.target.__name__}' at node '{n.name}' after site "
                             f"'{chosen.name}' cannot be dilated by module surgery")
    image = next(n for n in gm.graph.nodes if n.op == "placeholder")
    channels = net.discovery.info[site_nodes[0]].shape[1]
    mask_module = CADMask(mask, chosen.factor, channels=channels if mask == "learned" else None, **mask_kwargs)
    ref = next(copied.parameters(), None)
    if ref is not None:
        mask_module.to(device=ref.device, dtype=ref.dtype)
    gm.add_submodule(f"{chosen.name}.cad_mask", mask_module)
    gm.add_submodule(f"{chosen.name}.cad_pool", CADPool2d(chosen.factor))
    with gm.graph.inserting_after(site_nodes[0]):
        mask_node = gm.graph.call_module(f"{chosen.name}.cad_mask", (site_nodes[0], image))
    for n in site_nodes:
        with gm.graph.inserting_after(mask_node if n is site_nodes[0] else n):
            pooled = gm.graph.call_module(f"{chosen.name}.cad_pool", (n, mask_node))
        n.replace_all_uses_with(pooled, delete_user_cb=lambda u: u not in (pooled, mask_node))
    gm.graph.lint()
    gm.recompile()
    gm.train(model.training)
    return gm


def cad_multiply_adds(net: Any, site: str | int, area: float) -> float:
    """Multiply-adds of one image with CAD at ``site``, as a sparse implementation spends them (the paper's count).

    Everything before the site runs once; the part from the site on costs its coarse multiply-adds on the pooled
    cells and ``R_h R_w`` times as much on the kept ones: ``prefix + tail · ((1 - a) + a R_h R_w)``. The prefix and
    tail are measured with ``torch.utils.flop_counter`` on the plain model (a multiply-add = 2 FLOPs); the mask's own
    cost is not included.

    Args:
        net: The plain model's ``PhaseNet`` (its ``input_size`` sets the image size).
        site: The CAD site.
        area: Share of cells kept at the high resolution, in ``[0, 1]``.
    """
    if not 0.0 <= area <= 1.0:
        raise ArgumentError(f"area must be in [0, 1], got {area}")
    s = net.site(site)
    flops = net.segment_flops()
    entry = net.entry_segment(s)
    prefix, tail = sum(flops[:entry]), sum(flops[entry:])
    return (prefix + tail * ((1 - area) + area * s.num_phases)) / 2


MODEL_RULES.register("cad", cad_swap)
