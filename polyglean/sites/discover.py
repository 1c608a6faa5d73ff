"""Finding the subsampling sites of any model by rule: trace, run once, match op kinds, group by dataflow."""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from polyglean.errors import TraceError, UnsupportedOpError
from polyglean.sites.ops import PhaseOp, function_kinds, is_module_kind, match_function, match_module
from polyglean.sites.trace import NodeInfo, record, timm_leaf_types, trace

__all__ = ["Discovery", "Site", "UnsupportedOpError", "discover"]

Reduction = tuple[Fraction, Fraction]

# Products whose later operands are contracted away (attention's keys and values): their result keeps the spatial
# layout of the first operand only.
_CONTRACTIONS: set[Any] = {operator.matmul, torch.matmul, torch.bmm, torch.einsum, torch.baddbmm,
                           F.scaled_dot_product_attention}
_CONTRACTION_METHODS = {"matmul", "bmm", "__matmul__", "baddbmm"}
# Padding grows a map by a few pixels; it never upsamples.
_PADS: set[Any] = {F.pad, torch.constant_pad_nd, torch._C._nn.pad}


@dataclass(frozen=True)
class Site:
    """A group of subsampling ops that take one resolution level to the next and must share a phase.

    Attributes:
        name: The block the ops belong to (their common module path), e.g. ``"layer2.0"``.
        ops: Dotted names of the ops, e.g. ``("layer2.0.conv1", "layer2.0.downsample.0")``.
        factor: ``(R_h, R_w)``.
        level: Resolution level of the site's output: the rank of its :attr:`reduction` among the model's sites
            (1 for the finest, the first reduction of the input; sites at the same reduction share a level).
        in_size: Spatial size ``(H, W)`` of the site's input, for the input size the model was inspected at.
        out_size: Spatial size of its output.
        index: Position among the model's sites, input to output.
        reduction: Total reduction ``(r_h, r_w)`` from the model's input to this site's output, along the dataflow:
            the factors of the sites on the way multiply, upsampling divides, and where paths meet the largest
            reduction counts (a product that contracts tokens, attention, takes the smallest of its operands).
        main_path: Whether every path from the input to the output passes through this site (a cut of the
            graph): its phase then displaces everything after it. Sites off the main path (the spatial-reduction
            convolutions of attention, auxiliary branches) are searchable, but the default search space and the
            alignment of feature maps follow the main path only.
    """

    name: str
    ops: tuple[str, ...]
    factor: tuple[int, int]
    level: int
    in_size: tuple[int, int]
    out_size: tuple[int, int]
    index: int
    reduction: tuple[int, int] = (1, 1)
    main_path: bool = True

    @property
    def num_phases(self) -> int:
        """``R_h * R_w``."""
        return self.factor[0] * self.factor[1]

    @property
    def discarded(self) -> float:
        """Share of the stride-1 activations the default phase discards, ``1 - 1 / (R_h R_w)``."""
        return 1.0 - 1.0 / self.num_phases


@dataclass
class Discovery:
    """Everything found about a model: its graph, its sites and the runnable op of every subsampling node."""

    graph_module: fx.GraphModule
    sites: list[Site]
    ops: dict[fx.Node, tuple[PhaseOp, int]]  # subsampling node -> (its PhaseOp, its site index)
    info: dict[fx.Node, NodeInfo]
    input_size: tuple[int, ...]
    batch: int = 2  # images in the example batch the graph was recorded on

    @property
    def main_sites(self) -> list[Site]:
        """The sites on the main path, input to output."""
        return [s for s in self.sites if s.main_path]

    @property
    def total_factor(self) -> tuple[int, int]:
        """Reduction of the main path: the reduction at the output of its last site (``(1, 1)`` without one)."""
        main = self.main_sites
        return main[-1].reduction if main else (1, 1)

    @property
    def max_reduction(self) -> tuple[int, int]:
        """The largest reduction of any path (per dimension): the smallest input every path still fits."""
        return (max((s.reduction[0] for s in self.sites), default=1),
                max((s.reduction[1] for s in self.sites), default=1))


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    last = next(reversed(stack.values()))
    return last[0] if isinstance(last, tuple) else str(last)


def _fn_name(target: Any) -> str:
    return getattr(target, "__name__", None) or str(target)


def _spatial(shape: Sequence[int] | None, dims: tuple[int, int]) -> tuple[int, int]:
    if shape is None:
        return (0, 0)
    return (shape[dims[0]], shape[dims[1]])


def _common_prefix(names: Sequence[str]) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for group in zip(*parts):
        if len(set(group)) != 1:
            break
        common.append(group[0])
    return ".".join(common)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[fx.Node, fx.Node] = {}

    def find(self, a: fx.Node) -> fx.Node:
        self.parent.setdefault(a, a)
        while self.parent[a] is not a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: fx.Node, b: fx.Node) -> None:
        self.parent[self.find(a)] = self.find(b)


def _is_builtin(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.nn")


class _TraceInto(Exception):
    """An opaque module of a type timm declares untraceable subsamples: discovery retraces into that type."""

    def __init__(self, cls: type[nn.Module], message: str) -> None:
        super().__init__(message)
        self.cls = cls


def _match_ops(gm: fx.GraphModule, info: dict[fx.Node, NodeInfo], retraceable: set[type[nn.Module]]
               ) -> dict[fx.Node, PhaseOp]:
    found: dict[fx.Node, PhaseOp] = {}
    used_names: set[str] = set()
    for node in gm.graph.nodes:
        op: PhaseOp | None = None
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            op = match_module(module, str(node.target))
            if op is None and not is_module_kind(module) and not _is_builtin(module):
                _check_opaque(node, module, info[node], retraceable)
        elif node.op == "call_function" and node in info and (info[node].args or info[node].kwargs):
            path = _module_path(node)
            base = f"{path}.{_fn_name(node.target)}" if path else _fn_name(node.target)
            name = base
            for k in itertools.count(1):
                if name not in used_names:
                    break
                name = f"{base}_{k}"
            op = match_function(node.target, info[node].args, info[node].kwargs, name)
        if op is not None:
            used_names.add(op.name)
            found[node] = op
    return found


def _strided(module: nn.Module) -> str | None:
    """The name of a submodule (or the module itself, ``""``) with a stride other than 1, if any."""
    for name, m in module.named_modules():
        stride = getattr(m, "stride", None)
        if stride is None or isinstance(stride, bool):
            continue
        values = [stride] if isinstance(stride, int) else list(stride) if isinstance(stride, (tuple, list)) else []
        if any(isinstance(v, int) and v > 1 for v in values):
            return name
    return None


def _kernel_shrink(module: nn.Module) -> tuple[int, int]:
    """How much the stride-1 kernels inside ``module`` can shrink a map: ``Σ max(0, (k - 1) d - 2 p)`` per dim."""
    total = [0, 0]
    for m in module.modules():
        kernel = getattr(m, "kernel_size", None)
        if kernel is None:
            continue
        k = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)[-2:]
        dil = getattr(m, "dilation", 1)
        d = (dil, dil) if isinstance(dil, int) else tuple(dil)[-2:]
        pad = getattr(m, "padding", 0)
        p = (pad, pad) if isinstance(pad, int) else tuple(pad)[-2:] if isinstance(pad, (tuple, list)) else (0, 0)
        for i in range(min(2, len(k), len(d), len(p))):
            total[i] += max(0, (int(k[i]) - 1) * int(d[i]) - 2 * int(p[i]))
    return (total[0], total[1])


def _check_opaque(node: fx.Node, module: nn.Module, info: NodeInfo, retraceable: set[type[nn.Module]]) -> None:
    """Refuses an opaque (untraced) module that subsamples: it shrinks an NCHW map and has a stride inside, or
    shrinks it more than its kernels can explain.

    A map can shrink without subsampling (a valid-padding 7x7 convolution on a 7x7 map gives 1x1): a module whose
    parts are all at stride 1 and whose kernels account for the shrinking is not a subsampling site. A type timm
    declares untraceable is traced into instead (``_TraceInto``).
    """
    if info.input_shape is None or info.shape is None or len(info.input_shape) != 4 or len(info.shape) != 4:
        return
    shrink = (info.input_shape[-2] - info.shape[-2], info.input_shape[-1] - info.shape[-1])
    if shrink[0] <= 0 and shrink[1] <= 0:
        return
    inner = _strided(module)
    if inner is None:
        explained = _kernel_shrink(module)
        if shrink[0] <= explained[0] and shrink[1] <= explained[1]:
            return
        why = "more than its kernels explain"
    else:
        why = f"stride at '{node.target}.{inner}'" if inner else "it has a stride"
    message = (
        f"module '{node.target}' ({type(module).__name__}) subsamples {info.input_shape[-2:]} -> "
        f"{info.shape[-2:]} ({why}) but is opaque to tracing and has no registered op kind"
    )
    if type(module) in retraceable:
        raise _TraceInto(type(module), message)
    raise UnsupportedOpError(
        message + ". Hint: register one with polyglean.register_module_op, or let PhaseNet trace into it "
        "(do not name it in leaf_modules)."
    )


def _carries(info: dict[fx.Node, NodeInfo], node: fx.Node) -> bool:
    return node.op == "placeholder" or (node in info and info[node].carries_tensor)


def _lineage(node: fx.Node, info: dict[fx.Node, NodeInfo]) -> list[fx.Node]:
    """The inputs whose spatial layout ``node``'s output carries on: all tensor inputs, except for products that
    contract their later operands (attention's keys and values), which keep the first operand's."""
    inputs = [a for a in node.all_input_nodes if _carries(info, a)]
    return inputs[:1] if _is_contraction(node) else inputs


def _is_contraction(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in _CONTRACTION_METHODS) or (
        node.op == "call_function" and _safe_in(node.target, _CONTRACTIONS))


def _safe_in(target: Any, items: set[Any]) -> bool:
    try:
        return target in items
    except TypeError:  # unhashable target
        return False


def _upsampling(i: NodeInfo) -> tuple[Fraction, Fraction] | None:
    """``(in / out)`` per spatial dimension for a node that enlarges an NCHW map by at least 1.5 in both dimensions
    (upsampling; padding adds a few pixels and is not), else None."""
    a, b = i.input_shape, i.shape
    if a is None or b is None or len(a) != 4 or len(b) != 4 or a[0] != b[0] or a[1] != b[1]:
        return None
    if 2 * b[-2] >= 3 * a[-2] > 0 and 2 * b[-1] >= 3 * a[-1] > 0:
        return (Fraction(a[-2], b[-2]), Fraction(a[-1], b[-1]))
    return None


def _is_pad(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return _safe_in(node.target, _PADS)
    if node.op == "call_method":
        return node.target == "pad"
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), nn.modules.padding._ConstantPadNd
                          | nn.modules.padding._ReflectionPadNd | nn.modules.padding._ReplicationPadNd
                          | nn.modules.padding.CircularPad2d)
    return False


def _reductions(gm: fx.GraphModule, info: dict[fx.Node, NodeInfo], ops: dict[fx.Node, PhaseOp]
                ) -> dict[fx.Node, Reduction]:
    """The reduction of every tensor value from the input, along the dataflow (largest path where paths meet).

    A product that contracts tokens (attention) takes the smallest reduction of its operands: its result has the
    tokens of one operand and reduces over the others (PVT's keys and values are spatially reduced, GCViT's global
    queries are).
    """
    red: dict[fx.Node, Reduction] = {}
    one = Fraction(1)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            red[node] = (one, one)
            continue
        if not _carries(info, node):
            continue
        if _is_contraction(node):
            ins = [red[a] for a in node.all_input_nodes if a in red]
            if ins:
                red[node] = (min(v[0] for v in ins), min(v[1] for v in ins))
            continue
        lineage = _lineage(node, info)
        ins = [red[a] for a in lineage if a in red]
        if not ins:
            continue
        r = (max(v[0] for v in ins), max(v[1] for v in ins))
        if node in ops:
            f = ops[node].factor
            r = (r[0] * f[0], r[1] * f[1])
        elif len(lineage) == 1 and not _is_pad(gm, node):  # one map in: broadcasting (SE's x * s) is not it
            up = _upsampling(info[node])
            if up is not None:
                r = (r[0] * up[0], r[1] * up[1])
        red[node] = r
    return red


def _group(gm: fx.GraphModule, info: dict[fx.Node, NodeInfo], ops: dict[fx.Node, PhaseOp],
           red: dict[fx.Node, Reduction]) -> list[list[fx.Node]]:
    """Groups op nodes whose outputs meet (add, concat, ...) at the same reduction: they must share a phase."""
    tags: dict[fx.Node, frozenset[fx.Node]] = {}
    uf = _UnionFind()
    for node in gm.graph.nodes:
        inputs = [tags[a] for a in _lineage(node, info) if tags.get(a)]
        merged = frozenset().union(*inputs) if inputs else frozenset()
        if len(inputs) >= 2:
            by_level: dict[Reduction, list[fx.Node]] = {}
            for op_node in merged:
                by_level.setdefault(red[op_node], []).append(op_node)
            for same in by_level.values():
                for other in same[1:]:
                    uf.union(same[0], other)
        if node in ops:
            uf.find(node)
            tags[node] = frozenset([node])
        elif _carries(info, node):
            tags[node] = merged
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node in ops:
            groups.setdefault(uf.find(node), []).append(node)
    return list(groups.values())


def _is_cut(nodes: list[fx.Node], blocked: set[fx.Node], info: dict[fx.Node, NodeInfo]) -> bool:
    """Whether every path of tensors from the input to the output passes through ``blocked`` (sizes read from the
    input, e.g. ``x.shape[0]`` for a reshape, are not paths)."""
    reached: set[fx.Node] = set()
    for n in nodes:
        if n in blocked or (n.op != "output" and not _carries(info, n)):
            continue
        if n.op == "placeholder" or any(a in reached for a in n.all_input_nodes):
            reached.add(n)
            if n.op == "output":
                return False
    return True


def _example(model: nn.Module, input_size: Sequence[int], example: Tensor | None) -> Tensor:
    if example is None:
        gen = torch.Generator().manual_seed(0)
        param = next(itertools.chain(model.parameters(), model.buffers()), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        return torch.randn(2, *input_size, generator=gen).to(device=device, dtype=dtype)
    if not isinstance(example, Tensor) or example.dim() != len(input_size) + 1 or example.shape[0] < 1:
        shape = tuple(example.shape) if isinstance(example, Tensor) else type(example).__name__
        raise ValueError(f"example must be a batch (N, {', '.join(map(str, input_size))}) with N >= 1, got {shape}")
    # One image is run twice, so that batch-sized values can be told from others that have a leading 1.
    return example.repeat(2, *([1] * (example.dim() - 1))) if example.shape[0] == 1 else example


def discover(model: nn.Module, input_size: Sequence[int] = (3, 224, 224),
             leaf_modules: Iterable[str | type[nn.Module]] = (), example: Tensor | None = None) -> Discovery:
    """Finds the subsampling sites of ``model``.

    Args:
        model: Any image model; traced with torch.fx (its weights are shared, not copied). Arguments of its
            ``forward`` after the image that have defaults are traced at their defaults.
        input_size: ``(C, H, W)`` of one input image; an example batch of 2 such images is run once.
        leaf_modules: Module names or types not to trace into (see :func:`polyglean.sites.trace.trace`).
        example: An example batch (any size) to run instead of random data; a single image is run twice.

    Returns:
        A :class:`Discovery` with the sites ordered from input to output.

    Raises:
        TraceError: the model does not trace (the message names the module).
        UnsupportedOpError: an opaque part subsamples, or ops that must share a phase have different factors.
    """
    functions = set(function_kinds())

    def keep(n: fx.Node) -> bool:
        return n.op == "call_function" and _safe_in(n.target, functions)

    example = _example(model, input_size, example)
    user_types = {m for m in leaf_modules if isinstance(m, type)}
    retraceable = timm_leaf_types() - user_types
    trace_into: set[type[nn.Module]] = set()
    opaque: _TraceInto | None = None
    while True:
        try:
            gm = trace(model, leaf_modules, trace_into)
        except TraceError as err:
            if opaque is None:
                raise
            raise UnsupportedOpError(f"{opaque}; tracing into it fails: {err}") from err
        was_training = model.training
        model.eval()
        try:
            info = record(gm, example, keep)
        finally:
            model.train(was_training)
        try:
            found = _match_ops(gm, info, retraceable - trace_into)
            break
        except _TraceInto as err:
            opaque = err
            trace_into.add(err.cls)
    red = _reductions(gm, info, found)
    groups = _group(gm, info, found, red)
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    groups.sort(key=lambda g: min(position[n] for n in g))

    def whole(r: Reduction) -> tuple[int, int]:
        return (math.ceil(r[0]), math.ceil(r[1]))

    levels = sorted({whole(red[g[0]]) for g in groups}, key=lambda r: (r[0] * r[1], r))
    sites: list[Site] = []
    ops: dict[fx.Node, tuple[PhaseOp, int]] = {}
    names: set[str] = set()
    for index, group in enumerate(groups):
        group.sort(key=lambda n: position[n])
        members = [found[n] for n in group]
        factors = {op.factor for op in members}
        if len(factors) != 1:
            raise UnsupportedOpError(
                f"ops {[op.name for op in members]} meet at an add/concat and must share a phase, but their "
                f"factors differ: {sorted(factors)}"
            )
        first = group[0]
        op_names = tuple(op.name for op in members)
        name = op_names[0] if len(op_names) == 1 else (_common_prefix(op_names) or op_names[0])
        if name in names:
            name = op_names[0]
        names.add(name)
        in_size = _spatial(info[first].input_shape, members[0].dims)
        out_size = _spatial(info[first].shape, members[0].dims)
        reduction = whole(red[first])
        sites.append(Site(name, op_names, members[0].factor, levels.index(reduction) + 1, in_size, out_size, index,
                          reduction, _is_cut(nodes, set(group), info)))
        for n, op in zip(group, members):
            ops[n] = (op, index)
    # The example's tensors are no longer needed; keep shapes only.
    for node_info in info.values():
        node_info.args, node_info.kwargs = (), {}
    return Discovery(gm, sites, ops, info, tuple(input_size), int(example.shape[0]))
