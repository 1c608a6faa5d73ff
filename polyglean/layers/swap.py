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
    ``ceil_mode``. Strided convs are left as they are (the papers replace pooling layers only), unless
    ``convs=True`` is given: then ``Conv(s)`` -> ``Conv(1) + SoftPool2d(s, s)`` (``AdaPool2d``), for models that
    subsample with strided convs only, such as the CIFAR ResNets (an extension of ours, not the papers' rule).
``pasa`` (Zou et al. 2020)
    a strided "same" conv (``2 * padding == dilation * (kernel - 1)``) -> ``PASA2d(C_in, s) + Conv(1)`` (the
    adaptive low-pass before subsampling); other strided convs -> ``Conv(1) + PASA2d(C_out, s)``, which keeps the
    output size; ``MaxPool``/``AvgPool(s)`` -> ``Pool(stride 1) + PASA2d(s)``.
``aps`` (Chaman & Dokmanic 2021)
    a single-op site: ``Conv(s)``/``Pool(s)`` -> ``Conv(1)``/``Pool(1)`` + ``APS2d(s)``. A site of several ops
    (a residual block's strided conv and its shortcut, which meet at an add) is a *graph* rewrite (a site rule,
    :data:`SITE_RULES`): every op runs at stride 1, an :class:`APSIndex2d` picks the max-norm component of the
    first op's (the main branch's) stride-1 map per sample, and that index is an explicit input of one
    ``APS2d(s)(y, index=...)`` after every op, shortcut included. The chosen phase reaches the shortcut by a data
    edge, so no execution order can break it and nothing is stored between calls. Strided slices
    (``x[:, :, ::2, ::2]``, CIFAR "option A") become unstrided slices followed by the gather. Then the result is
    the rewritten ``torch.fx.GraphModule`` (traced in eval mode: branches on ``self.training`` are fixed to eval),
    with the new modules at ``<block>.aps_index`` and ``<block>.<op path with "_" for ".">_aps``; it holds no
    parameter of its own, so the state-dict keys are unchanged.

A replaced module that keeps weights sits inside a :class:`SwapSequential`, so its state-dict keys gain the
child's index (``layer2.0.conv1.weight`` -> ``layer2.0.conv1.0.weight``); :func:`swap_key_map` gives the renames,
and with them the original checkpoint loads strictly into a blurpool-swapped model (BlurPool's filter is a
non-persistent buffer). Every other key is unchanged.

Functional ops (``F.max_pool2d`` in ``forward``, CIFAR "option A" slices ``x[:, :, ::2, ::2]``) are not modules and
stay as they are, except under a site rule (APS); :func:`swap` logs a warning naming each. The input model is never
modified.

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
from polyglean.layers.aps import APS2d, APSIndex2d
from polyglean.layers.blurpool import BlurPool2d
from polyglean.layers.pasa import PASA2d
from polyglean.layers.softpool import SoftPool2d
from polyglean.sites import Site, discover
from polyglean.phase.functional import sliced_dims
from polyglean.sites.conv import Conv2dPhase
from polyglean.sites.ops import ModulePhaseOp, PhaseOp
from polyglean.sites.pool import AvgPool2dPhase, MaxPool2dPhase
from polyglean.sites.slicing import SlicePhase

__all__ = ["SITE_RULES", "SWAP_RULES", "SwapSequential", "register_site_rule", "register_swap_rule", "swap",
           "swap_key_map"]

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


MODEL_RULES: dict[str, Callable[..., nn.Module]] = {}
"""Layer name -> a rewrite of the whole model, ``rule(model, input_size=..., **layer_kwargs)``, for layers that
change more than their own op (``"cad"`` dilates every later layer)."""

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


@dataclass(frozen=True)
class SiteSwapContext:
    """Everything a site rule may look at for one site of several ops.

    Attributes:
        site: The site.
        nodes: The nodes of its ops in ``graph_module``, in graph order (the first is the main branch's).
        ops: Their ops, in the same order.
        graph_module: The traced model copy; a site rule rewrites its graph and modules in place.
        in_shapes: Shape of each op's input on the example batch, by op name.
        out_shapes: Shape of each op's output, by op name.
        kwargs: The layer arguments given to :func:`swap`.
    """

    site: Site
    nodes: tuple[fx.Node, ...]
    ops: tuple[PhaseOp, ...]
    graph_module: fx.GraphModule
    in_shapes: dict[str, tuple[int, ...]]
    out_shapes: dict[str, tuple[int, ...]]
    kwargs: dict[str, Any]


SiteRule = Callable[[SiteSwapContext], dict[str, tuple[int, ...]]]
SITE_RULES: dict[str, SiteRule] = {}
"""Layer name -> rule for sites of several ops (which must agree); it rewrites the graph and returns the paths
whose output shapes must not change, with those shapes. Layers without one are swapped op by op."""


def register_site_rule(name: str) -> Callable[[SiteRule], SiteRule]:
    """Decorator registering the site rule of layer ``name``; a duplicate name is an error."""

    def add(rule: SiteRule) -> SiteRule:
        if name in SITE_RULES:
            raise ValueError(f"a site rule for layer {name!r} is already registered")
        SITE_RULES[name] = rule
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
        kwargs = dict(ctx.kwargs)
        convs = bool(kwargs.pop("convs", False))
        name, m = ctx.op.name, ctx.op.module
        if convs and _is_conv(ctx):  # opt-in: Conv(s) -> Conv(1) + Pool(s, s)
            pool = layer_cls(kernel_size=ctx.stride, stride=ctx.stride, ceil_mode=True, **kwargs)
            return Rewrite({name: SwapSequential(_conv_stride1(m), pool, kept=0)}, name)
        if not _is_pool(ctx):
            return None  # strided convs stay: the paper replaces pooling layers only
        return Rewrite({name: layer_cls(**_pool_kwargs(ctx, layer), **kwargs)}, name)

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
    name, m = ctx.op.name, ctx.op.module
    if _is_conv(ctx):
        return Rewrite({name: SwapSequential(_conv_stride1(m), APS2d(ctx.stride, **ctx.kwargs), kept=0)}, name)
    if _is_pool(ctx):
        return Rewrite({name: SwapSequential(_pool_stride1(m), APS2d(ctx.stride, **ctx.kwargs), kept=None)}, name)
    return None


def _stride1_module(ctx: SiteSwapContext, node: fx.Node, op: PhaseOp) -> None:
    """Makes a strided conv/pool module node compute its stride-1 map (same weights, same path)."""
    gm = ctx.graph_module
    module = gm.get_submodule(str(node.target))
    if isinstance(module, nn.Conv2d):
        _conv_stride1(module)
    else:
        _set_submodule(gm, str(node.target), _pool_stride1(module))


def _stride1_slice(ctx: SiteSwapContext, node: fx.Node, op: PhaseOp) -> None:
    """Makes a strided slice ``x[..., ::R_h, ::R_w]`` unstrided (the identity on its range)."""
    x, index = node.args
    strided = sliced_dims(index, len(ctx.in_shapes[op.name]))
    if op.dims != (-2, -1) or any(sl.start not in (None, 0) or sl.stop is not None for _, _, sl in strided):
        raise NotImplementedError(
            f"APS at slicing op '{op.name}': only x[..., ::R_h, ::R_w] over the last two dimensions is rewritten, "
            f"got index {index!r}"
        )
    items = index if isinstance(index, tuple) else (index,)
    node.args = (x, tuple(slice(it.start, it.stop) if isinstance(it, slice) else it for it in items))


_STRIDE1: dict[type[PhaseOp], Callable[[SiteSwapContext, fx.Node, PhaseOp], None]] = {
    Conv2dPhase: _stride1_module,
    MaxPool2dPhase: _stride1_module,
    AvgPool2dPhase: _stride1_module,
    SlicePhase: _stride1_slice,
}
"""Op class -> how to make its node compute the op's stride-1 map instead, for the APS site rule."""


def _free_path(gm: fx.GraphModule, block: str, name: str) -> str:
    """``block.name`` (or ``name`` at the root), with a numeric suffix if that attribute exists already."""
    try:
        parent: nn.Module | None = gm.get_submodule(block) if block else gm
    except AttributeError:  # a block of functional ops only: add_submodule creates it
        parent = None
    candidate, k = name, 1
    while parent is not None and hasattr(parent, candidate):
        candidate, k = f"{name}_{k}", k + 1
    return f"{block}.{candidate}" if block else candidate


@register_site_rule("aps")
def _aps_site_rule(ctx: SiteSwapContext) -> dict[str, tuple[int, ...]]:
    gm, graph, site = ctx.graph_module, ctx.graph_module.graph, ctx.site
    for op in ctx.ops:
        if type(op) not in _STRIDE1:
            raise NotImplementedError(
                f"APS at site '{site.name}': op '{op.name}' ({op.kind}, {type(op).__name__}) has no stride-1 "
                "rewrite; supported in sites of several ops: nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d and strided "
                "slicing x[..., ::R_h, ::R_w]"
            )
    prefix = f"{site.name}."
    block = site.name if all(name.startswith(prefix) for name in site.ops) else ""
    aps_kwargs = dict(ctx.kwargs)
    index_path = _free_path(gm, block, "aps_index")
    gm.add_submodule(index_path, APSIndex2d(site.factor, **aps_kwargs))
    checked: dict[str, tuple[int, ...]] = {}
    index_node: fx.Node | None = None
    for full, op in zip(ctx.nodes, ctx.ops):
        _STRIDE1[type(op)](ctx, full, op)
        relative = op.name[len(prefix):] if block else op.name
        gather_path = _free_path(gm, block, relative.replace(".", "_") + "_aps")
        gm.add_submodule(gather_path, APS2d(site.factor, **aps_kwargs))
        after = full
        if index_node is None:  # the main branch (first op in graph order) chooses the component
            with graph.inserting_after(full):
                index_node = graph.call_module(index_path, (full,))
            after = index_node
        with graph.inserting_after(after):
            gathered = graph.call_module(gather_path, (full,), {"index": index_node})
        full.replace_all_uses_with(gathered, delete_user_cb=lambda user: user not in (gathered, index_node))
        checked[gather_path] = ctx.out_shapes[op.name]
    return checked


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
            ``beta_init=0.3`` (adaPool), ``p=1`` (APS); ``convs=True`` (SoftPool, adaPool) also rewrites strided
            convs (see the module docstring).

    Returns:
        The rewritten deep copy, in the train/eval mode of ``model``; a ``torch.fx.GraphModule`` when a site rule
        rewrote the graph (``"aps"`` on a model with residual downsampling blocks). Keys of kept weights move as
        :func:`swap_key_map` says; all others are unchanged.

    Raises:
        ValueError: If ``layer`` is unknown (the message lists the known names), the model has no subsampling
            site, or a rewrite would change the size of an op's output.
        NotImplementedError: For ``"aps"`` at a site of several ops one of which has no stride-1 rewrite (a
            functional pooling call, a timm "SAME" op; named in the message).
    """
    if layer in MODEL_RULES:
        return MODEL_RULES[layer](model, input_size=input_size, **layer_kwargs)
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
    gm = found.graph_module
    out_shapes = {str(n.target): found.info[n].shape for n in gm.graph.nodes
                  if n.op == "call_module" and n in found.info}
    site_rule = SITE_RULES.get(layer)
    by_site: dict[int, list[tuple[fx.Node, PhaseOp]]] = {}
    for node, (op, index) in found.ops.items():
        by_site.setdefault(index, []).append((node, op))
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    rewritten = False
    for index, members in by_site.items():
        if site_rule is None or len(members) < 2:
            continue
        members.sort(key=lambda member: position[member[0]])
        nodes, ops = zip(*members)
        ctx = SiteSwapContext(found.sites[index], nodes, ops, gm,
                              {op.name: tuple(found.info[n].input_shape or ()) for n, op in members},
                              {op.name: tuple(found.info[n].shape or ()) for n, op in members}, dict(layer_kwargs))
        expected.update(site_rule(ctx))
        rewritten = True
    for node, (op, index) in found.ops.items():
        site = found.sites[index]
        if rewritten and site_rule is not None and len(by_site[index]) > 1:
            continue
        if not isinstance(op, ModulePhaseOp):
            logger.warning("swap(%r): op '%s' (%s) of site '%s' is not a module and stays as it is",
                           layer, op.name, op.kind, site.name)
            continue
        info = found.info[node]
        ctx = SwapContext(op, site, node, gm, tuple(info.input_shape or ()), tuple(info.shape or ()),
                          dict(layer_kwargs))
        rewrite = rule(ctx)
        if rewrite is None:
            logger.info("swap(%r): op '%s' (%s) of site '%s' stays as it is", layer, op.name, op.kind, site.name)
            continue
        rewrites.append((op.name, rewrite))
        expected[rewrite.checked] = out_shapes[rewrite.checked]
    if not rewrites and not rewritten:
        logger.warning("swap(%r): no op of %s is replaced by this rule; the copy is unchanged",
                       layer, type(model).__name__)
    if rewritten:  # the rewritten graph is the model now; its modules are the copy's own
        gm.graph.lint()
        gm.recompile()
        swapped = gm
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
