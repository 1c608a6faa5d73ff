"""Finding the subsampling sites of any model by rule: trace, run once, match op kinds, group by dataflow."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from polyglean.sites.ops import PhaseOp, function_kinds, is_module_kind, match_function, match_module
from polyglean.sites.trace import NodeInfo, record, trace
from polyglean.errors import UnsupportedOpError

__all__ = ["Discovery", "Site", "UnsupportedOpError", "discover"]



@dataclass(frozen=True)
class Site:
    """A group of subsampling ops that take one resolution level to the next and must share a phase.

    Attributes:
        name: The block the ops belong to (their common module path), e.g. ``"layer2.0"``.
        ops: Dotted names of the ops, e.g. ``("layer2.0.conv1", "layer2.0.downsample.0")``.
        factor: ``(R_h, R_w)``.
        level: Number of subsampling steps from the input to this site's output (1 for the first site).
        in_size: Spatial size ``(H, W)`` of the site's input, for the input size the model was inspected at.
        out_size: Spatial size of its output.
        index: Position among the model's sites, input to output.
    """

    name: str
    ops: tuple[str, ...]
    factor: tuple[int, int]
    level: int
    in_size: tuple[int, int]
    out_size: tuple[int, int]
    index: int

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


def _match_ops(gm: fx.GraphModule, info: dict[fx.Node, NodeInfo]) -> dict[fx.Node, PhaseOp]:
    found: dict[fx.Node, PhaseOp] = {}
    used_names: set[str] = set()
    for node in gm.graph.nodes:
        op: PhaseOp | None = None
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            op = match_module(module, str(node.target))
            if op is None and not is_module_kind(module) and not _is_builtin(module):
                _check_opaque(node, module, info[node])
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


def _check_opaque(node: fx.Node, module: nn.Module, info: NodeInfo) -> None:
    """Refuses an opaque (untraced) module that visibly subsamples an NCHW map."""
    if info.input_shape is None or info.shape is None or len(info.input_shape) != 4 or len(info.shape) != 4:
        return
    if info.shape[-2] < info.input_shape[-2] or info.shape[-1] < info.input_shape[-1]:
        raise UnsupportedOpError(
            f"module '{node.target}' ({type(module).__name__}) subsamples {info.input_shape[-2:]} -> "
            f"{info.shape[-2:]} but is opaque to tracing and has no registered op kind. Hint: register one with "
            "polyglean.register_module_op, or let PhaseNet trace into it (it is a leaf of timm's or yours)."
        )


def _group(gm: fx.GraphModule, info: dict[fx.Node, NodeInfo], ops: dict[fx.Node, PhaseOp]
           ) -> tuple[list[list[fx.Node]], dict[fx.Node, int]]:
    """Groups op nodes whose outputs meet (add, concat, ...) at the same level; returns groups and levels."""
    tags: dict[fx.Node, frozenset[fx.Node]] = {}
    level: dict[fx.Node, int] = {}
    uf = _UnionFind()
    for node in gm.graph.nodes:
        inputs = [tags[a] for a in node.all_input_nodes if tags.get(a)]
        merged = frozenset().union(*inputs) if inputs else frozenset()
        if len(inputs) >= 2:
            by_level: dict[int, list[fx.Node]] = {}
            for op_node in merged:
                by_level.setdefault(level[op_node], []).append(op_node)
            for same in by_level.values():
                for other in same[1:]:
                    uf.union(same[0], other)
        if node in ops:
            level[node] = 1 + max((level[t] for t in merged), default=0)
            uf.find(node)
            tags[node] = frozenset([node])
        elif node in info and info[node].carries_tensor:
            tags[node] = merged
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node in ops:
            groups.setdefault(uf.find(node), []).append(node)
    return list(groups.values()), level


def discover(model: nn.Module, input_size: Sequence[int] = (3, 224, 224),
             leaf_modules: Iterable[str | type[nn.Module]] = (), example: Tensor | None = None) -> Discovery:
    """Finds the subsampling sites of ``model``.

    Args:
        model: Any image model; traced with torch.fx (its weights are shared, not copied).
        input_size: ``(C, H, W)`` of one input image; an example batch of 2 such images is run once.
        leaf_modules: Module names or types not to trace into (see :func:`polyglean.sites.trace.trace`).
        example: An example batch to run instead of random data.

    Returns:
        A :class:`Discovery` with the sites ordered from input to output.

    Raises:
        TraceError: the model does not trace (the message names the module).
        UnsupportedOpError: an opaque part subsamples, or ops that must share a phase have different factors.
    """
    gm = trace(model, leaf_modules)
    functions = set(function_kinds())

    def keep(n: fx.Node) -> bool:
        try:
            return n.op == "call_function" and n.target in functions
        except TypeError:
            return False

    if example is None:
        gen = torch.Generator().manual_seed(0)
        param = next(itertools.chain(model.parameters(), model.buffers()), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        example = torch.randn(2, *input_size, generator=gen).to(device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        info = record(gm, example, keep)
    finally:
        model.train(was_training)
    found = _match_ops(gm, info)
    groups, level = _group(gm, info, found)
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    groups.sort(key=lambda g: min(position[n] for n in g))

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
        sites.append(Site(name, op_names, members[0].factor, level[first], in_size, out_size, index))
        for n, op in zip(group, members):
            ops[n] = (op, index)
    # The example's tensors are no longer needed; keep shapes only.
    for node_info in info.values():
        node_info.args, node_info.kwargs = (), {}
    return Discovery(gm, sites, ops, info, tuple(input_size))
