"""What a swap rule sees and returns, and the helpers the layers' rules share (see :func:`polyglean.swap`).

A layer's swap rule is a function ``rule(ctx: SwapContext) -> Rewrite | None`` registered with
:func:`polyglean.layers.register_layer` (``swap_rule=``); it lives in the layer's own module. For a site of several
ops that must agree (a residual block's strided conv and its shortcut) a layer may also register a site rule
(``site_rule=``), which rewrites the traced graph (see :class:`SiteSwapContext`).

A replaced module that keeps weights sits inside a :class:`SwapSequential`, so its state-dict keys gain the child's
index (``layer2.0.conv1.weight`` -> ``layer2.0.conv1.0.weight``); :func:`polyglean.swap_key_map` gives the renames.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from polyglean.sites import Site
from polyglean.sites.ops import ModulePhaseOp, PhaseOp

__all__ = [
    "POOLS",
    "Rewrite",
    "SiteRule",
    "SiteSwapContext",
    "SwapContext",
    "SwapRule",
    "SwapSequential",
    "conv_stride1",
    "following_relu",
    "free_path",
    "is_conv",
    "is_pool",
    "is_same_conv",
    "module_calls",
    "pair",
    "pool_kwargs",
    "pooling_rule",
    "relu_after",
    "pool_stride1",
    "set_submodule",
    "square_stride",
]


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
"""A rule for one module op: a :class:`Rewrite`, or ``None`` to leave the op unchanged."""


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
"""A rule for a site of several ops: rewrites the graph in place and returns the paths whose output shapes must
not change, with those shapes."""


# ------------------------------------------------------------------------------------------------------ helpers
POOLS = (nn.MaxPool2d, nn.AvgPool2d)


def is_conv(ctx: SwapContext) -> bool:
    """Whether the op is an ``nn.Conv2d``."""
    return isinstance(ctx.op.module, nn.Conv2d)


def is_pool(ctx: SwapContext) -> bool:
    """Whether the op is exactly an ``nn.MaxPool2d`` or ``nn.AvgPool2d``."""
    return type(ctx.op.module) in POOLS


def conv_stride1(conv: nn.Module) -> nn.Module:
    """The conv itself (of the model copy) with stride 1: same weights, same parameter names."""
    conv.stride = (1, 1)
    return conv


def pool_stride1(pool: nn.Module) -> nn.Module:
    """A new max/avg pooling module with the arguments of ``pool`` and stride 1."""
    if isinstance(pool, nn.MaxPool2d):
        return nn.MaxPool2d(pool.kernel_size, 1, pool.padding, pool.dilation)
    return nn.AvgPool2d(pool.kernel_size, 1, pool.padding, False, pool.count_include_pad, pool.divisor_override)


def pair(value: int | Sequence[int]) -> tuple[int, int]:
    """``value`` as a pair of ints."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def is_same_conv(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` pads "same" (``2 * padding == dilation * (kernel - 1)``) with explicit ints."""
    if isinstance(conv.padding, str):
        return False
    k, p, d = pair(conv.kernel_size), pair(conv.padding), pair(conv.dilation)
    return all(2 * p[i] == d[i] * (k[i] - 1) for i in (0, 1))


def square_stride(ctx: SwapContext, layer: str) -> int:
    """The op's stride ``s`` where it is ``(s, s)``; else a ``ValueError`` naming the op and ``layer``."""
    sh, sw = ctx.stride
    if sh != sw:
        raise ValueError(f"{layer} needs a square stride, but op '{ctx.op.name}' has stride {ctx.stride}")
    return sh


def relu_after(ctx: SwapContext) -> fx.Node | None:
    """The ReLU node that follows the op as ``op -> [BatchNorm2d] -> ReLU``, each node with a single user.

    The ReLU may be an ``nn.ReLU`` module or ``F.relu``/``torch.relu``; ``None`` when there is no such chain.
    """
    gm, node = ctx.graph_module, ctx.node
    for _ in range(2):
        users = list(node.users)
        if len(users) != 1:
            return None
        node = users[0]
        if node.op == "call_function" and node.target in (F.relu, torch.relu):
            return node
        if node.op != "call_module":
            return None
        module = gm.get_submodule(str(node.target))
        if isinstance(module, nn.ReLU):
            return node
        if not isinstance(module, nn.BatchNorm2d):
            return None
    return None


def module_calls(gm: fx.GraphModule, path: str) -> int:
    """How many nodes of ``gm`` call the module at ``path``."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == path)


def following_relu(ctx: SwapContext) -> str | None:
    """Path of the ReLU module that follows the conv as ``conv -> [BatchNorm2d] -> ReLU`` with single users.

    Only a ReLU module called once in the whole graph qualifies (wrapping a shared ReLU would blur its other
    calls too).
    """
    node = relu_after(ctx)
    if node is None or node.op != "call_module":
        return None
    path = str(node.target)
    return path if module_calls(ctx.graph_module, path) == 1 else None


def pool_kwargs(ctx: SwapContext, layer: str) -> dict[str, Any]:
    """``kernel_size``, ``stride``, ``padding`` and ``ceil_mode`` of the op's pooling module (no dilation)."""
    m = ctx.op.module
    if isinstance(m, nn.MaxPool2d) and pair(m.dilation) != (1, 1):
        raise ValueError(f"{layer} has no dilation, but max pooling '{ctx.op.name}' has dilation {m.dilation}")
    return {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding, "ceil_mode": m.ceil_mode}


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Puts ``module`` at the dotted ``path`` of ``root``."""
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, module)


def free_path(gm: fx.GraphModule, block: str, name: str) -> str:
    """``block.name`` (or ``name`` at the root), with a numeric suffix if that attribute exists already."""
    try:
        parent: nn.Module | None = gm.get_submodule(block) if block else gm
    except AttributeError:  # a block of functional ops only: add_submodule creates it
        parent = None
    candidate, k = name, 1
    while parent is not None and hasattr(parent, candidate):
        candidate, k = f"{name}_{k}", k + 1
    return f"{block}.{candidate}" if block else candidate


def pooling_rule(layer_cls: type[nn.Module], layer: str) -> SwapRule:
    """The swap rule of a pooling layer (SoftPool, adaPool): strided ``MaxPool``/``AvgPool`` -> ``layer_cls``.

    The new layer gets the pool's kernel, stride, padding and ``ceil_mode``. Strided convs stay as they are (the
    papers replace pooling layers only) unless the swap is given ``convs=True``: then ``Conv(s)`` ->
    ``Conv(1) + layer_cls(s, s)``.
    """

    def rule(ctx: SwapContext) -> Rewrite | None:
        kwargs = dict(ctx.kwargs)
        convs = bool(kwargs.pop("convs", False))
        name, m = ctx.op.name, ctx.op.module
        if convs and is_conv(ctx):  # opt-in: Conv(s) -> Conv(1) + Pool(s, s)
            pool = layer_cls(kernel_size=ctx.stride, stride=ctx.stride, ceil_mode=True, **kwargs)
            return Rewrite({name: SwapSequential(conv_stride1(m), pool, kept=0)}, name)
        if not is_pool(ctx):
            return None  # strided convs stay: the paper replaces pooling layers only
        return Rewrite({name: layer_cls(**pool_kwargs(ctx, layer), **kwargs)}, name)

    return rule
