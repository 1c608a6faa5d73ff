"""Tracing a model into a torch.fx graph whose subsampling ops are visible, and recording what each node saw."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn

from polyglean.sites.ops import is_module_kind
from polyglean.errors import TraceError

__all__ = ["NodeInfo", "TraceError", "record", "timm_leaf_types", "trace"]



def _timm_notrace() -> tuple[set[type[nn.Module]], list[Callable[..., Any]]]:
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:  # pragma: no cover
        return set(), []
    return set(timm_fx.get_notrace_modules()), list(timm_fx.get_notrace_functions())


class _Tracer(fx.Tracer):
    """fx tracer whose leaves are torch.nn modules, registered op kinds, timm's untraceable layers and the user's."""

    def __init__(self, leaf_types: set[type[nn.Module]], leaf_names: set[str],
                 autowrap_functions: Iterable[Callable[..., Any]]) -> None:
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names
        self.path_stack: list[str] = []
        self.failed_scope: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m) in self.leaf_types or module_qualified_name in self.leaf_names or is_module_kind(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        self.path_stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_scope is None:
                self.failed_scope = self.path_stack[-1]
            raise
        finally:
            self.path_stack.pop()


def timm_leaf_types() -> set[type[nn.Module]]:
    """The module types timm declares untraceable (kept opaque unless discovery has to look inside)."""
    return _timm_notrace()[0]


def _defaults(model: nn.Module) -> dict[str, Any]:
    """Every argument of ``model.forward`` after the image that has a default, with that default."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in params[1:] if p.kind in kinds and p.default is not inspect.Parameter.empty}


def _inline_constants(graph: fx.Graph, values: dict[str, Any]) -> None:
    """Replaces the placeholders of arguments traced at their defaults by the default values themselves."""
    for node in list(graph.nodes):
        if node.op != "placeholder" or not node.args:
            continue
        base = str(node.target)
        base = base.rsplit("_", 1)[0] if base not in values and base.rsplit("_", 1)[-1].isdigit() else base
        name = base if base in values else None
        if name is None:
            continue
        value = values[name]
        for user in list(node.users):
            user.args = fx.map_arg(user.args, lambda a: value if a is node else a)
            user.kwargs = fx.map_arg(user.kwargs, lambda a: value if a is node else a)
        graph.erase_node(node)


def trace(model: nn.Module, leaf_modules: Iterable[str | type[nn.Module]] = (),
          trace_into: Iterable[type[nn.Module]] = ()) -> fx.GraphModule:
    """Traces ``model`` (in eval mode, restored afterwards) into a GraphModule that shares its weights.

    Arguments of ``forward`` after the image that have defaults (e.g. ``attn_mask=None``) are traced at their
    defaults, so the graph takes the image batch alone.

    Args:
        model: Any ``nn.Module`` whose ``forward`` takes one image batch.
        leaf_modules: Module names or types to keep opaque (not traced into), for parts that do not trace.
        trace_into: Types timm declares untraceable that are traced into all the same (discovery retries with a
            type here when such a module turns out to subsample).

    Raises:
        TraceError: naming the innermost module that failed to trace, with a hint.
    """
    timm_types, timm_fns = _timm_notrace()
    types = {m for m in leaf_modules if isinstance(m, type)} | (timm_types - set(trace_into))
    names = {m for m in leaf_modules if isinstance(m, str)}
    tracer = _Tracer(types, names, timm_fns)
    defaults = _defaults(model)
    was_training = model.training
    model.eval()
    try:
        graph = tracer.trace(model, concrete_args=defaults or None)
    except Exception as err:
        where = f"module '{tracer.failed_scope}'" if tracer.failed_scope else f"{type(model).__name__}.forward"
        raise TraceError(
            f"torch.fx cannot trace {where} of {type(model).__name__}: {type(err).__name__}: {err}. "
            "Hint: keep the part opaque with PhaseNet(model, leaf_modules=[...]) if it does not subsample, "
            "or make its forward free of data-dependent control flow."
        ) from err
    finally:
        model.train(was_training)
    _inline_constants(graph, defaults)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


@dataclass
class NodeInfo:
    """What one node produced when the traced model ran on an example batch."""

    shape: tuple[int, ...] | None = None  # for tensor outputs
    is_tensor: bool = False
    carries_tensor: bool = False  # a tensor, or a tuple/list/dict holding one (e.g. the output of chunk)
    args: tuple[Any, ...] = ()  # actual argument values (only kept for call_function nodes)
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None  # shape of the first tensor argument


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, keep_args: Callable[[fx.Node], bool]) -> None:
        super().__init__(gm)
        self.info: dict[fx.Node, NodeInfo] = {}
        self.keep_args = keep_args

    def run_node(self, n: fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        out = super().run_node(n)
        info = NodeInfo()
        if isinstance(out, Tensor):
            info.shape, info.is_tensor = tuple(out.shape), True
        info.carries_tensor = _carries_tensor(out)
        first = next((a for a in args if isinstance(a, Tensor)), None)
        if first is not None:
            info.input_shape = tuple(first.shape)
        if self.keep_args(n):
            info.args, info.kwargs = tuple(args), dict(kwargs)
        self.info[n] = info
        return out


def _carries_tensor(value: Any) -> bool:
    if isinstance(value, Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_carries_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_carries_tensor(v) for v in value.values())
    return False


@torch.no_grad()
def record(gm: fx.GraphModule, example: Tensor, keep_args: Callable[[fx.Node], bool]) -> dict[fx.Node, NodeInfo]:
    """Runs ``gm`` on ``example`` and returns every node's :class:`NodeInfo`."""
    recorder = _Recorder(gm, keep_args)
    recorder.run(example)
    return recorder.info
