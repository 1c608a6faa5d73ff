"""Subsampling ops: the registry of op kinds and the runnable :class:`PhaseOp` each kind produces.

An op kind is a rule that looks at one node of a traced model (a module call or a function call with its actual
arguments) and, when the node subsamples, returns a :class:`PhaseOp`: a Module that runs the node's computation at
any phase, per image. Kinds are registered for module types (``register_module_op``) and for functions
(``register_function_op``); the built-in ones live beside this file, one file per kind.

``PhaseOp.forward(*args, phase=None, **kwargs)`` takes the node's own arguments plus ``phase``: ``None`` (the
default op, called unchanged, so the default is bit-exact), a flat phase index ``dy * R_w + dx`` for the whole
batch, or a ``(N,)`` LongTensor of flat indices, one per image.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from polyglean.registry import Registry
from polyglean.sites.geometry import Phase

__all__ = [
    "FUNCTION_KINDS",
    "MODULE_KINDS",
    "PhaseOp",
    "PhaseValue",
    "function_kinds",
    "match_function",
    "match_module",
    "module_kinds",
    "register_function_op",
    "register_module_op",
]

PhaseValue = int | Tensor | None

ModuleFactory = Callable[[nn.Module, str], "PhaseOp | None"]
FunctionFactory = Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any], str], "PhaseOp | None"]

MODULE_KINDS: Registry[tuple[type[nn.Module], ModuleFactory]] = Registry("op kind for a module type")
"""Op kinds of module types, keyed by the type's qualified name (``"torch.nn.modules.conv.Conv2d"``)."""
FUNCTION_KINDS: Registry[tuple[Callable[..., Any], FunctionFactory]] = Registry("op kind for a function")
"""Op kinds of functions called in ``forward``, keyed by the function's qualified name."""


def qualified_name(obj: Any) -> str:
    """``module.qualname`` of a type, ``module.name`` of a function: the key of its op kind."""
    module = getattr(obj, "__module__", None) or "builtins"
    attr = "__qualname__" if isinstance(obj, type) else "__name__"
    return f"{module}.{getattr(obj, attr, None) or repr(obj)}"


class PhaseOp(nn.Module):
    """One subsampling op of a model, runnable at any phase.

    Attributes:
        name: Dotted name of the op (its module path, or ``module.function`` for a functional op).
        factor: ``(R_h, R_w)``.
        dims: The input's spatial dimensions ``(h, w)`` as negative indices (``(-2, -1)`` for NCHW).
        kind: Short name of the op kind (``conv``, ``max_pool``, ``slice``, ...).
    """

    kind: str = "op"

    def __init__(self, name: str, factor: tuple[int, int], dims: tuple[int, int] = (-2, -1)) -> None:
        super().__init__()
        self.name = name
        self.factor = (int(factor[0]), int(factor[1]))
        self.dims = dims

    @property
    def num_phases(self) -> int:
        return self.factor[0] * self.factor[1]

    def default(self, *args: Any, **kwargs: Any) -> Tensor:
        """The unmodified op."""
        raise NotImplementedError

    def at_phase(self, phase: Phase, *args: Any, **kwargs: Any) -> Tensor:
        """The op at phase ``(dy, dx)`` for the whole batch (``args[0]`` is the batched input)."""
        raise NotImplementedError

    def forward(self, *args: Any, phase: PhaseValue = None, **kwargs: Any) -> Tensor:
        if phase is None:
            return self.default(*args, **kwargs)
        if isinstance(phase, int):
            return self._uniform(phase, args, kwargs)
        values = torch.unique(phase)
        if values.numel() == 1:
            return self._uniform(int(values), args, kwargs)
        x, rest = args[0], args[1:]
        out: Tensor | None = None
        for value in values.tolist():
            idx = (phase == value).nonzero().squeeze(1).to(x.device)
            y = self._uniform(value, (x.index_select(0, idx), *rest), kwargs)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out.index_copy_(0, idx, y)
        assert out is not None
        return out

    def _uniform(self, flat: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        if flat == 0:
            return self.default(*args, **kwargs)
        if not 0 <= flat < self.num_phases:
            raise ValueError(
                f"phase index {flat} out of range for factor {self.factor} at op '{self.name}' "
                f"(expected 0 <= p < {self.num_phases})"
            )
        return self.at_phase(divmod(flat, self.factor[1]), *args, **kwargs)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, kind={self.kind}, factor={self.factor}"


class ModulePhaseOp(PhaseOp):
    """A :class:`PhaseOp` over a module; shares the module (and so its weights)."""

    def __init__(self, module: nn.Module, name: str, factor: tuple[int, int], dims: tuple[int, int] = (-2, -1)
                 ) -> None:
        super().__init__(name, factor, dims)
        self.module = module

    def default(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.module(*args, **kwargs)


class FunctionPhaseOp(PhaseOp):
    """A :class:`PhaseOp` over a function call found in ``forward``."""

    def __init__(self, fn: Callable[..., Any], name: str, factor: tuple[int, int],
                 dims: tuple[int, int] = (-2, -1)) -> None:
        super().__init__(name, factor, dims)
        self.fn = fn

    def default(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.fn(*args, **kwargs)


def register_module_op(cls: type[nn.Module], factory: ModuleFactory | None = None) -> Any:
    """Registers the op kind of a module type; usable as a decorator on the factory.

    The factory receives ``(module, name)`` and returns a :class:`PhaseOp`, or ``None`` when that module does not
    subsample (e.g. stride 1). Registering a type twice is an error. The kinds live in :data:`MODULE_KINDS`.

    Example:
        >>> @register_module_op(MyStridedConv)  # doctest: +SKIP
        ... def _my_conv(module, name): ...
    """

    def add(fn: ModuleFactory) -> ModuleFactory:
        MODULE_KINDS.register(qualified_name(cls), (cls, fn))
        return fn

    return add(factory) if factory is not None else add


def register_function_op(fn: Callable[..., Any], factory: FunctionFactory | None = None) -> Any:
    """Registers the op kind of a function (e.g. ``F.max_pool2d``); usable as a decorator on the factory.

    The factory receives ``(fn, args, kwargs, name)`` with the actual argument values seen when the model ran.
    The kinds live in :data:`FUNCTION_KINDS`.
    """

    def add(factory_: FunctionFactory) -> FunctionFactory:
        FUNCTION_KINDS.register(qualified_name(fn), (fn, factory_))
        return factory_

    return add(factory) if factory is not None else add


def module_kinds() -> tuple[type[nn.Module], ...]:
    """The module types with a registered op kind."""
    return tuple(MODULE_KINDS[name][0] for name in MODULE_KINDS)


def function_kinds() -> tuple[Callable[..., Any], ...]:
    """The functions with a registered op kind."""
    return tuple(FUNCTION_KINDS[name][0] for name in FUNCTION_KINDS)


def _module_factory(module: nn.Module) -> ModuleFactory | None:
    cls = type(module)
    key = qualified_name(cls)
    if key in MODULE_KINDS and MODULE_KINDS[key][0] is cls:
        return MODULE_KINDS[key][1]
    # A subclass that keeps its base's forward computes what the base computes (e.g. a renamed nn.Conv2d).
    for base in cls.__mro__[1:]:
        key = qualified_name(base)
        if key in MODULE_KINDS and MODULE_KINDS[key][0] is base and cls.forward is base.forward:
            return MODULE_KINDS[key][1]
    return None


def is_module_kind(module: nn.Module) -> bool:
    """Whether the module's type has a registered op kind (subsampling or not)."""
    return _module_factory(module) is not None


def match_module(module: nn.Module, name: str) -> PhaseOp | None:
    """The :class:`PhaseOp` of a module call, or ``None`` when it does not subsample."""
    factory = _module_factory(module)
    return None if factory is None else factory(module, name)


def match_function(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], name: str
                   ) -> PhaseOp | None:
    """The :class:`PhaseOp` of a function call with these actual arguments, or ``None``."""
    key = qualified_name(fn)
    if key not in FUNCTION_KINDS or FUNCTION_KINDS[key][0] is not fn:
        return None
    factory = FUNCTION_KINDS[key][1]
    return None if factory is None else factory(fn, args, kwargs, name)


def bind(names: tuple[str, ...], defaults: dict[str, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
         ) -> dict[str, Any]:
    """Binds positional and keyword arguments of a function without a Python signature (torch builtins)."""
    bound = dict(defaults)
    for key, value in zip(names, args):
        bound[key] = value
    for key, value in kwargs.items():
        if key not in names:
            raise TypeError(f"unexpected argument {key!r}; expected one of {names}")
        bound[key] = value
    return bound
