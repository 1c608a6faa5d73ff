"""Tracing a model into a torch.fx graph whose subsampling ops are visible, and recording what each node saw."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn

from polyglean.sites.ops import is_module_kind
from polyglean.errors import TraceError

__all__ = ["NodeInfo", "TraceError", "record", "trace"]



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


def trace(model: nn.Module, leaf_modules: Iterable[str | type[nn.Module]] = ()) -> fx.GraphModule:
    """Traces ``model`` (in eval mode, restored afterwards) into a GraphModule that shares its weights.

    Args:
        model: Any ``nn.Module`` whose ``forward`` takes one image batch.
        leaf_modules: Module names or types to keep opaque (not traced into), for parts that do not trace.

    Raises:
        TraceError: naming the innermost module that failed to trace, with a hint.
    """
    timm_types, timm_fns = _timm_notrace()
    types = {m for m in leaf_modules if isinstance(m, type)} | timm_types
    names = {m for m in leaf_modules if isinstance(m, str)}
    tracer = _Tracer(types, names, timm_fns)
    was_training = model.training
    model.eval()
    try:
        graph = tracer.trace(model)
    except Exception as err:
        where = f"module '{tracer.failed_scope}'" if tracer.failed_scope else f"{type(model).__name__}.forward"
        raise TraceError(
            f"torch.fx cannot trace {where} of {type(model).__name__}: {type(err).__name__}: {err}. "
            "Hint: keep the part opaque with PhaseNet(model, leaf_modules=[...]) if it does not subsample, "
            "or make its forward free of data-dependent control flow."
        ) from err
    finally:
        model.train(was_training)
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
