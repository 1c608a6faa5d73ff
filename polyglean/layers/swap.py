"""Layer surgery: replace a model's subsampling ops by BlurPool, SoftPool, adaPool, PASA or APS.

:func:`swap` finds the subsampling sites with the same discovery as ``PhaseNet`` (:func:`polyglean.sites.discover`)
and rewrites every *module* op of every site by the rule registered for the layer (:data:`SWAP_RULES`):

``blurpool`` (Zhang 2019)
    ``MaxPool(k, s)`` -> ``MaxPool(k, 1) + BlurPool(s)``; ``AvgPool(s, s)`` -> ``BlurPool(s)`` (else
    ``AvgPool(k, 1) + BlurPool(s)`` when the sizes would differ); a 1x1 unpadded strided conv (a shortcut) ->
    ``BlurPool(s) + Conv(1)`` as in antialiased-cnns; any other strided conv -> ``Conv(1)``, and the blur goes
    after the ReLU when the fx graph shows ``conv -> [BatchNorm] -> ReLU`` with single users and a ReLU module
    called only there (Zhang's ``Conv + ReLU -> Conv(1) + ReLU + BlurPool``); otherwise (e.g. the ReLU module is
    shared by two calls, as in torchvision's ``BasicBlock``) the blur goes right after the conv, before BN/ReLU:
    the only place module surgery can put it without changing what the shared module computes elsewhere.
``softpool`` / ``adapool``
    strided ``MaxPool``/``AvgPool`` -> ``SoftPool2d``/``AdaPool2d`` with the same kernel, stride, padding and
    ``ceil_mode``. Strided convs are left as they are (the papers replace pooling layers only).
``pasa`` (Zou et al. 2020)
    a strided "same" conv (``2 * padding == dilation * (kernel - 1)``) -> ``PASA2d(C_in, s) + Conv(1)`` (the
    adaptive low-pass before subsampling); other strided convs -> ``Conv(1) + PASA2d(C_out, s)``, which keeps the
    output size; ``MaxPool``/``AvgPool(s)`` -> ``Pool(stride 1) + PASA2d(s)``.
``aps`` (Chaman & Dokmanic 2021)
    ``Conv(s)``/``Pool(s)`` -> ``Conv(1)``/``Pool(1)`` + ``APS2d(s)``, for sites made of one op only. A site whose
    ops must agree (a residual block's main conv and shortcut) needs the main branch's choice passed to the
    shortcut, which module surgery cannot do; :func:`swap` raises ``NotImplementedError`` naming such a site.

A replaced module that keeps weights sits inside a :class:`SwapSequential`, so its state-dict keys gain the
child's index (``layer2.0.conv1.weight`` -> ``layer2.0.conv1.0.weight``); :func:`swap_key_map` gives the renames,
and with them the original checkpoint loads strictly into a blurpool-swapped model (BlurPool's filter is a
non-persistent buffer). Every other key is unchanged.

Functional ops (``F.max_pool2d`` in ``forward``, CIFAR "option A" slices ``x[:, :, ::2, ::2]``) are not modules and
stay as they are; :func:`swap` logs a warning naming each. The input model is never modified.

Example:
    >>> import torchvision  # doctest: +SKIP
    >>> model = torchvision.models.resnet18()  # doctest: +SKIP
    >>> aa = swap(model, "blurpool", input_size=(3, 64, 64), filter_size=3)  # doctest: +SKIP
    >>> key_map = swap_key_map(aa)  # doctest: +SKIP
    >>> aa.load_state_dict({key_map.get(k, k): v for k, v in model.state_dict().items()})  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn

from polyglean.layers import phase_ops  # noqa: F401  (registers the op kinds of the layers)
from polyglean.layers._registry import list_layers
from polyglean.layers.adapool import AdaPool2d
from polyglean.layers.aps import APS2d
from polyglean.layers.blurpool import BlurPool2d
from polyglean.layers.pasa import PASA2d
from polyglean.layers.softpool import SoftPool2d
from polyglean.sites import Site, discover
from polyglean.sites.ops import ModulePhaseOp

__all__ = ["SWAP_RULES", "SwapSequential", "register_swap_rule", "swap", "swap_key_map"]

logger = logging.getLogger(__name__)


class SwapSequential(nn.Sequential):
    """An ``nn.Sequential`` made by :func:`swap`; ``kept`` is the index of the child that is the original module.

    Args:
        *modules: The children, in order.
        kept: Index of the child that replaces the original module (its weights), or ``None`` if none does.
    """

    def __init__(self, *modules: nn.Module, kept: int | None = None) -> None:
        super().__init__(*modules)
        if kept is not None and not 0 <= kept < len(modules):
            raise ValueError(f"kept={kept} is not the index of one of the {len(modules)} children")
        self.kept = kept

    def extra_repr(self) -> str:
        return f"kept={self.kept}"


@dataclass
class Rewrite:
    """What one rule does to one op: modules to put at paths, and the path whose output size must not change."""

    modules: dict[str, nn.Module] = field(default_factory=dict)
    checked: str = ""


@dataclass(frozen=True)
class SwapContext:
    """Everything a swap rule may look at for one module op.

    Attributes:
        op: The op (a module op; ``op.module`` is the model copy's module, ``op.name`` its path).
        site: The site the op belongs to.
        node: The op's node in ``graph_module``.
        graph_module: The traced model copy.
        in_shape: Shape of the op's input on the example batch.
        out_shape: Shape of its output.
        kwargs: The layer arguments given to :func:`swap`.
    """

    op: ModulePhaseOp
    site: Site
    node: fx.Node
    graph_module: fx.GraphModule
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    kwargs: dict[str, Any]

    @property
    def stride(self) -> tuple[int, int]:
        return self.op.factor

    @property
    def channels(self) -> int:
        return int(self.in_shape[1])


SwapRule = Callable[[SwapContext], "Rewrite | None"]
SWAP_RULES: dict[str, SwapRule] = {}
"""Layer name -> rule; a rule returns a :class:`Rewrite`, or ``None`` to leave the op unchanged."""


def register_swap_rule(name: str) -> Callable[[SwapRule], SwapRule]:
    """Decorator registering the swap rule of layer ``name``; a duplicate name is an error."""

    def add(rule: SwapRule) -> SwapRule:
        if name in SWAP_RULES:
            raise ValueError(f"a swap rule for layer {name!r} is already registered")
        SWAP_RULES[name] = rule
        return rule

    return add


# ------------------------------------------------------------------------------------------------------ helpers
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)


def _is_conv(ctx: SwapContext) -> bool:
    return isinstance(ctx.op.module, nn.Conv2d)


def _is_pool(ctx: SwapContext) -> bool:
    return type(ctx.op.module) in _POOLS


def _conv_stride1(conv: nn.Module) -> nn.Module:
    """The conv itself (of the model copy) with stride 1: same weights, same parameter names."""
    conv.stride = (1, 1)
    return conv


def _pool_stride1(pool: nn.Module) -> nn.Module:
    if isinstance(pool, nn.MaxPool2d):
        return nn.MaxPool2d(pool.kernel_size, 1, pool.padding, pool.dilation)
    return nn.AvgPool2d(pool.kernel_size, 1, pool.padding, False, pool.count_include_pad, pool.divisor_override)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _is_same_conv(conv: nn.Conv2d) -> bool:
    if isinstance(conv.padding, str):
        return False
    k, p, d = _pair(conv.kernel_size), _pair(conv.padding), _pair(conv.dilation)
    return all(2 * p[i] == d[i] * (k[i] - 1) for i in (0, 1))


def _square_stride(ctx: SwapContext, layer: str) -> int:
    sh, sw = ctx.stride
    if sh != sw:
        raise ValueError(f"{layer} needs a square stride, but op '{ctx.op.name}' has stride {ctx.stride}")
    return sh


def _users(node: fx.Node) -> list[fx.Node]:
    return list(node.users)


def _following_relu(ctx: SwapContext) -> str | None:
    """Path of the ReLU module that follows the conv as ``conv -> [BatchNorm2d] -> ReLU`` with single users.

    Only a ReLU module called once in the whole graph qualifies (wrapping a shared ReLU would blur its other
    calls too).
    """
    gm, node = ctx.graph_module, ctx.node
    for _ in range(2):
        users = _users(node)
        if len(users) != 1 or users[0].op != "call_module":
            return None
        node = users[0]
        module = gm.get_submodule(str(node.target))
        if isinstance(module, nn.ReLU):
            calls = sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target)
            return str(node.target) if calls == 1 else None
        if not isinstance(module, nn.BatchNorm2d):
            return None
    return None


def _pool_kwargs(ctx: SwapContext, layer: str) -> dict[str, Any]:
    m = ctx.op.module
    if isinstance(m, nn.MaxPool2d) and _pair(m.dilation) != (1, 1):
        raise ValueError(f"{layer} has no dilation, but max pooling '{ctx.op.name}' has dilation {m.dilation}")
    return {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding, "ceil_mode": m.ceil_mode}


# -------------------------------------------------------------------------------------------------------- rules
@register_swap_rule("blurpool")
def _blurpool_rule(ctx: SwapContext) -> Rewrite | None:
    name, m, s = ctx.op.name, ctx.op.module, ctx.stride

    def blur(channels: int) -> BlurPool2d:
        return BlurPool2d(channels, stride=s, **ctx.kwargs)

    if _is_conv(ctx):
        if _pair(m.kernel_size) == (1, 1) and _pair(m.padding) == (0, 0):  # shortcut: blur, then the 1x1 conv
            return Rewrite({name: SwapSequential(blur(m.in_channels), _conv_stride1(m), kept=1)}, name)
        relu = _following_relu(ctx)
        if relu is not None:  # Zhang: Conv(s) + ReLU -> Conv(1) + ReLU + BlurPool(s)
            wrapped = SwapSequential(ctx.graph_module.get_submodule(relu), blur(m.out_channels), kept=0)
            return Rewrite({name: _conv_stride1(m), relu: wrapped}, relu)
        return Rewrite({name: SwapSequential(_conv_stride1(m), blur(m.out_channels), kept=0)}, name)
    if isinstance(m, nn.AvgPool2d):
        k, p = _pair(m.kernel_size), _pair(m.padding)
        direct = tuple(-(-size // r) for size, r in zip(ctx.in_shape[-2:], s))
        if k == s and p == (0, 0) and direct == tuple(ctx.out_shape[-2:]):  # Zhang: AvgPool(s) -> BlurPool(s)
            return Rewrite({name: blur(ctx.channels)}, name)
    if _is_pool(ctx):
        return Rewrite({name: SwapSequential(_pool_stride1(m), blur(ctx.channels), kept=None)}, name)
    return None


def _pooling_rule(layer_cls: type[nn.Module], layer: str) -> SwapRule:
    def rule(ctx: SwapContext) -> Rewrite | None:
        if not _is_pool(ctx):
            return None  # strided convs stay: the paper replaces pooling layers only
        return Rewrite({ctx.op.name: layer_cls(**_pool_kwargs(ctx, layer), **ctx.kwargs)}, ctx.op.name)

    return rule


register_swap_rule("softpool")(_pooling_rule(SoftPool2d, "softpool"))
register_swap_rule("adapool")(_pooling_rule(AdaPool2d, "adapool"))


def _pasa(channels: int, stride: int, kwargs: dict[str, Any]) -> PASA2d:
    """PASA2d with ``groups`` (default 2) reduced to a divisor of ``channels`` (e.g. 1 for an RGB stem)."""
    kwargs = dict(kwargs)
    groups = math.gcd(int(kwargs.pop("groups", 2)), channels)
    return PASA2d(channels, stride=stride, groups=groups, **kwargs)


@register_swap_rule("pasa")
def _pasa_rule(ctx: SwapContext) -> Rewrite | None:
    name, m = ctx.op.name, ctx.op.module
    s = _square_stride(ctx, "PASA2d")
    if _is_conv(ctx):
        if _is_same_conv(m):  # Zou et al.: the adaptive low-pass before subsampling, then the conv at stride 1
            return Rewrite({name: SwapSequential(_pasa(m.in_channels, s, ctx.kwargs), _conv_stride1(m), kept=1)},
                           name)
        return Rewrite({name: SwapSequential(_conv_stride1(m), _pasa(m.out_channels, s, ctx.kwargs), kept=0)}, name)
    if _is_pool(ctx):
        return Rewrite({name: SwapSequential(_pool_stride1(m), _pasa(ctx.channels, s, ctx.kwargs), kept=None)},
                       name)
    return None


@register_swap_rule("aps")
def _aps_rule(ctx: SwapContext) -> Rewrite | None:
    if len(ctx.site.ops) > 1:
        raise NotImplementedError(
            f"APS at site '{ctx.site.name}' with ops {list(ctx.site.ops)}: the ops must share the phase chosen on "
            "the main branch, which module surgery cannot pass between branches; only single-op sites are "
            "swapped to APS"
        )
    name, m = ctx.op.name, ctx.op.module
    if _is_conv(ctx):
        return Rewrite({name: SwapSequential(_conv_stride1(m), APS2d(ctx.stride, **ctx.kwargs), kept=0)}, name)
    if _is_pool(ctx):
        return Rewrite({name: SwapSequential(_pool_stride1(m), APS2d(ctx.stride, **ctx.kwargs), kept=None)}, name)
    return None


# ---------------------------------------------------------------------------------------------------- surgery
def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, module)


def _output_shapes(model: nn.Module, paths: Sequence[str], example: Tensor) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []

    def hook(path: str) -> Callable[..., None]:
        def record(_module: nn.Module, _args: Any, out: Any) -> None:
            if isinstance(out, Tensor):
                shapes[path] = tuple(out.shape)

        return record

    try:
        for path in paths:
            handles.append(model.get_submodule(path).register_forward_hook(hook(path)))
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def swap(model: nn.Module, layer: str, *, input_size: Sequence[int] = (3, 224, 224), **layer_kwargs: Any
         ) -> nn.Module:
    """A copy of ``model`` whose subsampling modules are replaced by ``layer``, by the rules of this module.

    Args:
        model: Any image model that ``polyglean.sites.discover`` can trace; it is not modified.
        layer: ``"blurpool"``, ``"softpool"``, ``"adapool"``, ``"pasa"`` or ``"aps"``.
        input_size: ``(C, H, W)`` of one input image, for discovery and the size checks.
        **layer_kwargs: Passed to every new layer, e.g. ``filter_size=5`` (BlurPool), ``groups=4`` (PASA),
            ``beta_init=0.3`` (adaPool), ``p=1`` (APS).

    Returns:
        The rewritten deep copy, in the train/eval mode of ``model``. Keys of kept weights move as
        :func:`swap_key_map` says; all others are unchanged.

    Raises:
        ValueError: If ``layer`` is unknown (the message lists the known names), the model has no subsampling
            site, or a rewrite would change the size of an op's output.
        NotImplementedError: For ``"aps"`` at a site of several ops (named in the message).
    """
    if layer not in SWAP_RULES:
        known = ", ".join(repr(n) for n in list_layers() if n in SWAP_RULES)
        raise ValueError(f"unknown layer {layer!r} for swap; known layers: {known}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    rule = SWAP_RULES[layer]
    swapped = copy.deepcopy(model)
    found = discover(swapped, input_size)
    if not found.sites:
        raise ValueError(
            f"{type(model).__name__} has no subsampling site for input size {tuple(input_size)} (no strided conv, "
            f"pooling or slicing was found); there is nothing to swap to {layer!r}"
        )
    rewrites: list[tuple[str, Rewrite]] = []
    expected: dict[str, tuple[int, ...]] = {}
    out_shapes = {str(n.target): found.info[n].shape for n in found.graph_module.graph.nodes
                  if n.op == "call_module" and n in found.info}
    for node, (op, index) in found.ops.items():
        site = found.sites[index]
        if not isinstance(op, ModulePhaseOp):
            logger.warning("swap(%r): op '%s' (%s) of site '%s' is not a module and stays as it is",
                           layer, op.name, op.kind, site.name)
            continue
        info = found.info[node]
        ctx = SwapContext(op, site, node, found.graph_module, tuple(info.input_shape or ()), tuple(info.shape or ()),
                          dict(layer_kwargs))
        rewrite = rule(ctx)
        if rewrite is None:
            logger.info("swap(%r): op '%s' (%s) of site '%s' stays as it is", layer, op.name, op.kind, site.name)
            continue
        rewrites.append((op.name, rewrite))
        expected[rewrite.checked] = out_shapes[rewrite.checked]
    if not rewrites:
        logger.warning("swap(%r): no op of %s is replaced by this rule; the copy is unchanged",
                       layer, type(model).__name__)
    ref = next(swapped.parameters(), None)
    for _, rewrite in rewrites:
        for path, module in rewrite.modules.items():
            if ref is not None:
                module.to(device=ref.device, dtype=ref.dtype)
            _set_submodule(swapped, path, module)
    swapped.train(model.training)
    _check_sizes(swapped, layer, expected, input_size)
    return swapped


def _check_sizes(swapped: nn.Module, layer: str, expected: dict[str, tuple[int, ...]], input_size: Sequence[int]
                 ) -> None:
    """Raises ``ValueError`` unless each checked path of the swapped model keeps its original output shape."""
    if not expected:
        return
    gen = torch.Generator().manual_seed(0)
    ref = next(swapped.parameters(), None)
    example = torch.randn(2, *input_size, generator=gen)
    if ref is not None:
        example = example.to(device=ref.device, dtype=ref.dtype)
    was_training = swapped.training
    swapped.eval()
    try:
        shapes = _output_shapes(swapped, list(expected), example)
    except RuntimeError as err:
        raise ValueError(f"the model swapped to {layer!r} no longer runs on input size {tuple(input_size)}: {err}"
                         ) from err
    finally:
        swapped.train(was_training)
    for path, shape in expected.items():
        if shapes.get(path) != shape:
            raise ValueError(
                f"swapping '{path}' to {layer!r} changes its output from {shape} to {shapes.get(path)} for input "
                f"size {tuple(input_size)}; this op's padding/ceil_mode has no size-preserving rewrite"
            )


def swap_key_map(swapped: nn.Module) -> dict[str, str]:
    """Renames of state-dict keys made by :func:`swap`: original key -> key in ``swapped``.

    Each :class:`SwapSequential` that holds the original module as child ``kept`` moves that module's keys from
    ``path.name`` to ``path.kept.name``; keys not in the map are unchanged.

    Example:
        >>> key_map = swap_key_map(swapped)  # doctest: +SKIP
        >>> swapped.load_state_dict({key_map.get(k, k): v for k, v in original.state_dict().items()})  # doctest: +SKIP
    """
    key_map: dict[str, str] = {}
    for path, module in swapped.named_modules():
        if isinstance(module, SwapSequential) and module.kept is not None:
            prefix = f"{path}." if path else ""
            for key in module[module.kept].state_dict():
                key_map[f"{prefix}{key}"] = f"{prefix}{module.kept}.{key}"
    return key_map
