"""BlurPool (Zhang, ICML 2019, "Making Convolutional Networks Shift-Invariant Again"), 1-D/2-D/3-D.

A depthwise low-pass filter followed by subsampling: each channel is convolved with a normalised binomial filter
(the outer product of the rows ``[1]``, ``[1, 1]``, ``[1, 2, 1]``, ``[1, 3, 3, 1]``, ... of Pascal's triangle,
divided by its sum) after padding by ``(k - 1) // 2`` before and ``k // 2`` after along every spatial dimension,
and only every ``stride``-th output is computed. The two steps are one strided depthwise convolution
(``F.conv2d(..., stride=stride, groups=C)``), so site discovery sees a strided conv.

Swapping it into a model (:func:`polyglean.swap`) follows one of two recipes:

``recipe="default"``
    ``MaxPool(k, s)`` -> ``MaxPool(k, 1) + BlurPool(s)``; ``AvgPool(s, s)`` -> ``BlurPool(s)`` (else
    ``AvgPool(k, 1) + BlurPool(s)``); a 1x1 unpadded strided conv (a shortcut) -> ``BlurPool(s) + Conv(1)``; any
    other strided conv -> ``Conv(1)``, with the blur after the ReLU when ``conv -> [BN] -> ReLU`` has single users
    and the ReLU module is called only there, and right after the conv otherwise (torchvision's ``BasicBlock``
    shares its ReLU module between two calls). Every padding and kernel size is kept.
``recipe="zhang"`` (antialiased-cnns, Zhang's published antialiased ResNets)
    the blur always comes after the ReLU: ``Conv(s) + [BN] + ReLU + Next`` -> ``Conv(1) + [BN] + ReLU + BlurPool(s)
    + Next``; where the ReLU module is shared, the blur is the first child of the next module, as in
    antialiased-cnns (``layer2.0.conv2`` becomes ``Sequential(BlurPool, conv)`` in a ``BasicBlock``,
    ``layer2.0.conv3`` in a ``Bottleneck``); every ``MaxPool`` -> ``MaxPool(kernel_size=2, stride=1) +
    BlurPool(s)``; the 1x1 shortcut -> ``BlurPool(s) + Conv1x1(1)``. With ``pool_only=True`` (the default, as in
    the published checkpoints) the stem conv (a conv at the model's first subsampling site) keeps its stride.
    :func:`zhang_key_map` and :func:`convert_zhang_state_dict` load antialiased-cnns checkpoints strictly into the
    result.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polyglean.errors import ArgumentError, CheckpointError
from polyglean.layers._registry import register_layer
from polyglean.layers._utils import check_input, ntuple
from polyglean.layers.rules import (
    Rewrite,
    SwapContext,
    SwapSequential,
    conv_stride1,
    following_relu,
    is_conv,
    is_pool,
    module_calls,
    pair,
    pool_stride1,
    relu_after,
)

__all__ = [
    "PAD_TYPES",
    "RECIPES",
    "BlurPool1d",
    "BlurPool2d",
    "BlurPool3d",
    "binomial_filter",
    "blur_pool1d",
    "blur_pool2d",
    "blur_pool3d",
    "blur_pool_nd",
    "convert_zhang_state_dict",
    "zhang_key_map",
]

logger = logging.getLogger(__name__)

MAX_FILTER_SIZE = 7

#: Accepted ``pad_type`` names and the ``F.pad`` mode each one means (Zhang's short names are aliases).
PAD_TYPES: dict[str, str] = {
    "reflect": "reflect",
    "refl": "reflect",
    "replicate": "replicate",
    "repl": "replicate",
    "zeros": "constant",
    "zero": "constant",
    "constant": "constant",
    "circular": "circular",
}

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _check_filter_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"filter size must be an int in 1..{MAX_FILTER_SIZE}, got {size!r}")
    if not 1 <= size <= MAX_FILTER_SIZE:
        raise ValueError(f"filter size must be in 1..{MAX_FILTER_SIZE} (binomial filters), got {size}")
    return size


def _check_pad_type(pad_type: str) -> str:
    if pad_type not in PAD_TYPES:
        known = ", ".join(repr(p) for p in PAD_TYPES)
        raise ValueError(f"unknown pad_type {pad_type!r}; expected one of {known}")
    return PAD_TYPES[pad_type]


def binomial_filter(
    size: int, dims: int = 2, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> Tensor:
    """The normalised binomial filter of ``size`` taps in ``dims`` dimensions.

    The outer product of the row ``[C(size-1, 0), ..., C(size-1, size-1)]`` with itself ``dims`` times, divided by
    its sum (``2^((size-1) * dims)``). The entries are dyadic rationals, exact in every float dtype.

    Args:
        size: Taps per dimension, 1..7.
        dims: Number of spatial dimensions, 1..3.
        dtype: Floating dtype of the result.
        device: Device of the result.

    Shape:
        - output: ``(size,) * dims``

    Example:
        >>> binomial_filter(3, 2) * 16
        tensor([[1., 2., 1.],
                [2., 4., 2.],
                [1., 2., 1.]])
    """
    _check_filter_size(size)
    if dims not in _CONV:
        raise ValueError(f"dims must be 1, 2 or 3, got {dims!r}")
    row = torch.tensor([math.comb(size - 1, i) for i in range(size)], dtype=torch.float64)
    row = row / row.sum()
    filt = row
    for _ in range(dims - 1):
        filt = filt.unsqueeze(-1) * row
    return filt.to(dtype=dtype, device=device)


def _check_blur_input(x: Tensor, dims: int, size: int, mode: str, op: str) -> None:
    """Validates the input of a blur pool (shape, dtype, and large enough for the padding mode)."""
    check_input(x, dims, op)
    after = size // 2
    sizes = tuple(x.shape[2:])
    if mode == "reflect" and after > 0 and min(sizes) <= after:
        raise ValueError(
            f"{op}: pad_type 'reflect' needs every spatial size > {after} for filter size {size}, got {sizes}; "
            f"use pad_type='replicate' or 'zeros' for tiny inputs"
        )
    if mode == "circular" and after > 0 and min(sizes) < after:
        raise ValueError(f"{op}: pad_type 'circular' needs every spatial size >= {after} for filter size {size}, "
                         f"got {sizes}")


def _blur_pool(x: Tensor, filt: Tensor, size: int, dims: int, stride: tuple[int, ...], mode: str,
               channels: int | Tensor) -> Tensor:
    """Pads ``x`` and runs the strided depthwise convolution with ``filt`` (shared by the function and Modules).

    Free of control flow on the input, so that ``torch.fx`` traces it and site discovery sees the strided conv.
    """
    before, after = (size - 1) // 2, size // 2
    if after > 0:
        x = F.pad(x, (before, after) * dims, mode=mode)
    weight = filt.to(dtype=x.dtype, device=x.device).expand((channels, 1) + (size,) * dims)
    return _CONV[dims](x, weight, stride=stride, groups=channels)


def blur_pool_nd(
    x: Tensor, filter_size: int = 3, stride: int | Sequence[int] = 2, pad_type: str = "reflect", *, dims: int
) -> Tensor:
    """BlurPool over the last ``dims`` dimensions of ``x``; see :func:`blur_pool2d` for the arguments."""
    _check_filter_size(filter_size)
    strides = ntuple(stride, dims, "stride")
    mode = _check_pad_type(pad_type)
    _check_blur_input(x, dims, filter_size, mode, f"blur_pool{dims}d")
    filt = binomial_filter(filter_size, dims, dtype=x.dtype, device=x.device)
    return _blur_pool(x, filt, filter_size, dims, strides, mode, x.shape[1])


def blur_pool1d(x: Tensor, filter_size: int = 3, stride: int | Sequence[int] = 2, pad_type: str = "reflect") -> Tensor:
    """1-D BlurPool; arguments as :func:`blur_pool2d`.

    Shape:
        - x: ``(N, C, L)``
        - output: ``(N, C, ceil(L / stride))``
    """
    return blur_pool_nd(x, filter_size, stride, pad_type, dims=1)


def blur_pool2d(x: Tensor, filter_size: int = 3, stride: int | Sequence[int] = 2, pad_type: str = "reflect") -> Tensor:
    """2-D BlurPool: depthwise binomial low-pass filtering, then subsampling by ``stride``.

    Args:
        x: Input.
        filter_size: Taps of the binomial filter per dimension, 1..7 (1 = plain subsampling).
        stride: Subsampling factor, an int or ``(s_h, s_w)``.
        pad_type: ``"reflect"``, ``"replicate"``, ``"zeros"``/``"constant"`` or ``"circular"``
            (``(k - 1) // 2`` before, ``k // 2`` after).

    Returns:
        ``conv2d(pad(x), binomial_filter, stride=stride, groups=C)``.

    Raises:
        TypeError: If ``x`` is not a floating-point tensor.
        ValueError: If ``x`` is not 4-D, ``filter_size`` is outside 1..7, ``stride < 1``, ``pad_type`` is unknown,
            or the input is too small for reflect padding.

    Shape:
        - x: ``(N, C, H, W)``
        - output: ``(N, C, ceil(H / s_h), ceil(W / s_w))``

    Example:
        >>> blur_pool2d(torch.ones(1, 2, 5, 5), filter_size=3)
        tensor([[[[1., 1., 1.],
                  [1., 1., 1.],
                  [1., 1., 1.]],
        <BLANKLINE>
                 [[1., 1., 1.],
                  [1., 1., 1.],
                  [1., 1., 1.]]]])
    """
    return blur_pool_nd(x, filter_size, stride, pad_type, dims=2)


def blur_pool3d(x: Tensor, filter_size: int = 3, stride: int | Sequence[int] = 2, pad_type: str = "reflect") -> Tensor:
    """3-D BlurPool; arguments as :func:`blur_pool2d`.

    Shape:
        - x: ``(N, C, D, H, W)``
        - output: ``(N, C, ceil(D / s_d), ceil(H / s_h), ceil(W / s_w))``
    """
    return blur_pool_nd(x, filter_size, stride, pad_type, dims=3)


class _BlurPoolNd(nn.Module):
    dims: int = 0
    filt: Tensor

    def __init__(
        self,
        channels: int | None = None,
        filter_size: int = 3,
        stride: int | Sequence[int] = 2,
        pad_type: str = "reflect",
    ) -> None:
        super().__init__()
        if channels is not None and (isinstance(channels, bool) or not isinstance(channels, int) or channels < 1):
            raise ValueError(f"channels must be a positive int or None, got {channels!r}")
        self.channels = channels
        self.filter_size = _check_filter_size(filter_size)
        self.stride = ntuple(stride, self.dims, "stride")
        self.pad_type = pad_type
        self._mode = _check_pad_type(pad_type)
        self.register_buffer("filt", binomial_filter(filter_size, self.dims), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, torch.fx.Proxy):  # checks need concrete shapes; tracing records only the ops
            _check_blur_input(x, self.dims, self.filter_size, self._mode, type(self).__name__)
            if self.channels is not None and x.shape[1] != self.channels:
                raise ValueError(
                    f"{type(self).__name__} was built for {self.channels} channels, got input {tuple(x.shape)}; "
                    f"build it with channels={x.shape[1]} or channels=None"
                )
        channels = self.channels if self.channels is not None else x.shape[1]
        return _blur_pool(x, self.filt, self.filter_size, self.dims, self.stride, self._mode, channels)

    def extra_repr(self) -> str:
        ch = "" if self.channels is None else f"channels={self.channels}, "
        return f"{ch}filter_size={self.filter_size}, stride={self.stride}, pad_type={self.pad_type!r}"


class BlurPool1d(_BlurPoolNd):
    """1-D BlurPool, a Module over :func:`blur_pool1d`; the filter is a non-persistent buffer ``filt``.

    Args:
        channels: Optional number of channels, checked in ``forward`` (``None`` accepts any).
        filter_size: Taps of the binomial filter, 1..7.
        stride: Subsampling factor.
        pad_type: ``"reflect"``, ``"replicate"``, ``"zeros"``/``"constant"`` or ``"circular"``.

    Shape:
        - input: ``(N, C, L)``
        - output: ``(N, C, ceil(L / stride))``
    """

    dims = 1


class BlurPool2d(_BlurPoolNd):
    """2-D BlurPool, a Module over :func:`blur_pool2d`; the filter is a non-persistent buffer ``filt``.

    The buffer is left out of ``state_dict()``, so a model whose layers were swapped for BlurPool still loads the
    original checkpoint with ``strict=True``.

    Args:
        channels: Optional number of channels, checked in ``forward`` (``None`` accepts any).
        filter_size: Taps of the binomial filter per dimension, 1..7.
        stride: Subsampling factor.
        pad_type: ``"reflect"``, ``"replicate"``, ``"zeros"``/``"constant"`` or ``"circular"``.

    Shape:
        - input: ``(N, C, H, W)``
        - output: ``(N, C, ceil(H / s_h), ceil(W / s_w))``

    Example:
        >>> BlurPool2d(filter_size=4)(torch.randn(1, 8, 15, 16)).shape
        torch.Size([1, 8, 8, 8])
    """

    dims = 2


class BlurPool3d(_BlurPoolNd):
    """3-D BlurPool, a Module over :func:`blur_pool3d`; the filter is a non-persistent buffer ``filt``.

    Args:
        channels: Optional number of channels, checked in ``forward`` (``None`` accepts any).
        filter_size: Taps of the binomial filter per dimension, 1..7.
        stride: Subsampling factor.
        pad_type: ``"reflect"``, ``"replicate"``, ``"zeros"``/``"constant"`` or ``"circular"``.

    Shape:
        - input: ``(N, C, D, H, W)``
        - output: ``(N, C, ceil(D / s_d), ceil(H / s_h), ceil(W / s_w))``
    """

    dims = 3


# ------------------------------------------------------------------------------------------------------- surgery
RECIPES: tuple[str, ...] = ("default", "zhang")
"""The ways :func:`polyglean.swap` puts BlurPool into a model (see the module docstring)."""


def _recipe_kwargs(ctx: SwapContext) -> tuple[str, bool, dict[str, Any]]:
    """``(recipe, pool_only, BlurPool2d kwargs)`` from the swap's keyword arguments, checked."""
    kwargs = dict(ctx.kwargs)
    recipe = kwargs.pop("recipe", "default")
    pool_only = kwargs.pop("pool_only", None)
    if recipe not in RECIPES:
        raise ArgumentError(f"unknown blurpool recipe {recipe!r}; choose one of {', '.join(map(repr, RECIPES))}")
    if pool_only is not None and recipe != "zhang":
        raise ArgumentError(f"pool_only={pool_only!r} applies to recipe='zhang' only, got recipe={recipe!r}")
    return recipe, True if pool_only is None else bool(pool_only), kwargs


def _blurpool_rule(ctx: SwapContext) -> Rewrite | None:
    recipe, pool_only, kwargs = _recipe_kwargs(ctx)
    name, m, s = ctx.op.name, ctx.op.module, ctx.stride

    def blur(channels: int) -> BlurPool2d:
        return BlurPool2d(channels, stride=s, **kwargs)

    if is_conv(ctx):
        if pair(m.kernel_size) == (1, 1) and pair(m.padding) == (0, 0):  # shortcut: blur, then the 1x1 conv
            return Rewrite({name: SwapSequential(blur(m.in_channels), conv_stride1(m), kept=1)}, name)
        if recipe == "zhang":
            return _zhang_conv(ctx, pool_only, blur)
        relu = following_relu(ctx)
        if relu is not None:  # Zhang: Conv(s) + ReLU -> Conv(1) + ReLU + BlurPool(s)
            wrapped = SwapSequential(ctx.graph_module.get_submodule(relu), blur(m.out_channels), kept=0)
            return Rewrite({name: conv_stride1(m), relu: wrapped}, relu)
        return Rewrite({name: SwapSequential(conv_stride1(m), blur(m.out_channels), kept=0)}, name)
    if recipe == "zhang" and isinstance(m, nn.MaxPool2d):  # antialiased-cnns: MaxPool(2, 1) + BlurPool(s)
        if pair(m.dilation) != (1, 1):
            raise ValueError(f"recipe 'zhang' has no dilated max pooling, but '{name}' has dilation {m.dilation}")
        return Rewrite({name: SwapSequential(nn.MaxPool2d(kernel_size=2, stride=1), blur(ctx.channels), kept=None)},
                       name)
    if isinstance(m, nn.AvgPool2d):
        k, p = pair(m.kernel_size), pair(m.padding)
        direct = tuple(-(-size // r) for size, r in zip(ctx.in_shape[-2:], s))
        if k == s and p == (0, 0) and direct == tuple(ctx.out_shape[-2:]):  # Zhang: AvgPool(s) -> BlurPool(s)
            return Rewrite({name: blur(ctx.channels)}, name)
    if is_pool(ctx):
        return Rewrite({name: SwapSequential(pool_stride1(m), blur(ctx.channels), kept=None)}, name)
    return None


def _zhang_conv(ctx: SwapContext, pool_only: bool, blur: Any) -> Rewrite | None:
    """Zhang's rule for a strided conv that is not a 1x1 shortcut: the blur after the ReLU."""
    name, m = ctx.op.name, ctx.op.module
    if pool_only and ctx.site.index == 0:
        logger.info("swap('blurpool', recipe='zhang'): stem conv '%s' keeps its stride (pool_only=True)", name)
        return None
    gm = ctx.graph_module
    relu = relu_after(ctx)
    if relu is not None and relu.op == "call_module" and module_calls(gm, str(relu.target)) == 1:
        path = str(relu.target)  # a ReLU module of its own: ReLU + BlurPool(s)
        return Rewrite({name: conv_stride1(m), path: SwapSequential(gm.get_submodule(path), blur(m.out_channels),
                                                                     kept=0)}, path)
    if relu is not None and len(relu.users) == 1:
        nxt = next(iter(relu.users))
        if nxt.op == "call_module" and module_calls(gm, str(nxt.target)) == 1:
            module = gm.get_submodule(str(nxt.target))
            if isinstance(module, nn.Conv2d) and pair(module.stride) == (1, 1):  # antialiased-cnns' layout
                path = str(nxt.target)
                return Rewrite({name: conv_stride1(m), path: SwapSequential(blur(m.out_channels), module, kept=1)},
                               path)
    logger.warning("swap('blurpool', recipe='zhang'): conv '%s' is not followed by [BN] + ReLU + a conv of its own; "
                   "the blur goes right after the conv", name)
    return Rewrite({name: SwapSequential(conv_stride1(m), blur(m.out_channels), kept=0)}, name)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _zhang_paths(model: nn.Module) -> dict[str, str]:
    """Module path in ``model`` -> its path in antialiased-cnns' layout.

    antialiased-cnns writes the blur into an enclosing ``nn.Sequential`` (``downsample = Sequential(BlurPool,
    Conv1x1, BN)``; VGG's ``features``), where :func:`polyglean.swap` nests a :class:`SwapSequential`
    (``downsample = Sequential(SwapSequential(BlurPool, Conv1x1), BN)``): the children of a ``SwapSequential``
    inside a plain ``nn.Sequential`` are numbered as children of that ``nn.Sequential``. Elsewhere (``conv2 =
    Sequential(BlurPool, conv)``, ``maxpool = Sequential(MaxPool, BlurPool)``) the layouts agree.
    """
    paths: dict[str, str] = {}

    def visit(module: nn.Module, ours: str, theirs: str) -> None:
        paths[ours] = theirs
        flatten = isinstance(module, nn.Sequential) and not isinstance(module, SwapSequential)
        index = 0
        for name, child in module.named_children():
            if flatten and isinstance(child, SwapSequential):
                for grand_name, grand in child.named_children():
                    visit(grand, _join(_join(ours, name), grand_name), _join(theirs, str(index)))
                    index += 1
            elif flatten:
                visit(child, _join(ours, name), _join(theirs, str(index)))
                index += 1
            else:
                visit(child, _join(ours, name), _join(theirs, name))

    visit(model, "", "")
    return paths


def zhang_key_map(swapped: nn.Module) -> dict[str, str]:
    """Renames from antialiased-cnns' state-dict keys to those of ``swap(model, "blurpool", recipe="zhang")``.

    Covers every key of ``swapped.state_dict()`` (most map to themselves; on a torchvision ResNet the strided
    shortcuts differ: theirs ``layer2.0.downsample.1.weight`` (conv) and ``downsample.2.*`` (BN) are ours
    ``layer2.0.downsample.0.1.weight`` and ``downsample.1.*``). Their BlurPool filters (``*.filt``, persistent
    buffers there, non-persistent here) have no key here; :func:`convert_zhang_state_dict` checks and drops them.

    Example:
        >>> import torchvision
        >>> from polyglean import swap
        >>> aa = swap(torchvision.models.resnet18(), "blurpool", recipe="zhang", filter_size=4, input_size=(3, 64, 64))
        >>> zhang_key_map(aa)["layer2.0.downsample.1.weight"]
        'layer2.0.downsample.0.1.weight'
    """
    paths = _zhang_paths(swapped)
    key_map: dict[str, str] = {}
    for key in swapped.state_dict():
        path, _, leaf = key.rpartition(".")
        key_map[_join(paths[path], leaf)] = key
    return key_map


def _check_blur_filter(key: str, value: object, expected: dict[str, BlurPool2d], sizes: set[int]) -> None:
    """Raises ``CheckpointError`` unless ``value`` is a repeated binomial filter that ``swapped`` would use."""
    if not isinstance(value, Tensor) or value.dim() != 4 or value.shape[1] != 1 or value.shape[2] != value.shape[3]:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise CheckpointError(f"checkpoint key {key!r} of shape {shape} is not a BlurPool filter (C, 1, k, k)")
    size = int(value.shape[-1])
    module = expected.get(key.rpartition(".")[0])
    if module is not None and module.channels is not None and value.shape[0] != module.channels:
        raise CheckpointError(f"checkpoint key {key!r} has {value.shape[0]} channels, the model's blur at that place "
                              f"has {module.channels}; the checkpoint is for another architecture")
    if size not in sizes or (module is not None and size != module.filter_size):
        raise CheckpointError(
            f"checkpoint key {key!r} is a {size}x{size} blur filter, but the model was swapped with filter_size "
            f"{sorted(sizes)}; swap with filter_size={size}"
        )
    want = binomial_filter(size, 2, dtype=value.dtype, device=value.device).expand_as(value)
    if not torch.equal(value, want):
        raise CheckpointError(f"checkpoint key {key!r} is not the binomial filter of size {size}; "
                              "it is not an antialiased-cnns BlurPool")


def convert_zhang_state_dict(state_dict: Mapping[str, Any], swapped: nn.Module) -> dict[str, Tensor]:
    """An antialiased-cnns checkpoint's state dict, renamed for ``swapped`` (made with ``recipe="zhang"``).

    Keys are renamed by :func:`zhang_key_map`; their BlurPool filter buffers (``*.filt``) are checked (shape, the
    binomial filter of the swap's ``filter_size``, one per BlurPool of ``swapped``) and dropped. The result loads
    with ``swapped.load_state_dict(result)`` (strict).

    Args:
        state_dict: The checkpoint's state dict, or the dict antialiased-cnns publishes (``{"state_dict": ...}``).
        swapped: ``polyglean.swap(torchvision_model, "blurpool", recipe="zhang", filter_size=...)``.

    Raises:
        CheckpointError: A key is missing or unexpected, or a filter is not the expected binomial filter.
    """
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    key_map = zhang_key_map(swapped)
    paths = _zhang_paths(swapped)
    blurs = {paths[p]: m for p, m in swapped.named_modules() if isinstance(m, BlurPool2d)}
    sizes = {m.filter_size for m in blurs.values()}
    out: dict[str, Tensor] = {}
    unexpected: list[str] = []
    filters = 0
    for key, value in state_dict.items():
        if key in key_map:
            out[key_map[key]] = value
        elif key.endswith(".filt"):
            _check_blur_filter(key, value, blurs, sizes)
            filters += 1
        else:
            unexpected.append(key)
    missing = [theirs for theirs in key_map if theirs not in state_dict]
    if unexpected or missing:
        raise CheckpointError(
            f"the checkpoint does not fit the swapped {type(swapped).__name__}: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}; swap the same architecture with "
            "recipe='zhang' and the checkpoint's pool_only"
        )
    if filters != len(blurs):
        raise CheckpointError(f"the checkpoint has {filters} BlurPool filters, the swapped model {len(blurs)} "
                              "BlurPool layers; swap with the checkpoint's pool_only")
    return out


register_layer("blurpool", swap_rule=_blurpool_rule)(BlurPool2d)
