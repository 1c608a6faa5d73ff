"""The registries of the downsampling layers (each a :class:`polyglean.registry.Registry`).

:data:`LAYERS` maps a name to the layer's Module class, :data:`SWAP_RULES` to the rule :func:`polyglean.swap` uses
for one op, :data:`SITE_RULES` to the optional rule for a site of several ops. :func:`register_layer` fills all of
them, and registers the layer's op kind with site discovery, in one call, so that a new layer is its own module plus
one import line in ``polyglean/layers/__init__.py``::

    @register_layer("mypool", swap_rule=_mypool_rule, phase_op=MyPool2dPhase)
    class MyPool2d(nn.Module): ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from polyglean.registry import Registry

__all__ = [
    "LAYERS",
    "MODEL_RULES",
    "SITE_RULES",
    "SWAP_RULES",
    "create_layer",
    "get_layer",
    "list_layers",
    "register_layer",
    "register_site_rule",
    "register_swap_rule",
    "unregister_layer",
]

LAYERS: Registry[type[nn.Module]] = Registry("layer")
"""Layer name -> Module class."""
SWAP_RULES: Registry[Callable[..., Any]] = Registry("swap rule")
"""Layer name -> rule for one module op: ``rule(SwapContext) -> Rewrite | None`` (see :mod:`polyglean.layers.rules`)."""
MODEL_RULES: Registry[Callable[..., Any]] = Registry("model rule")
"""Layer name -> a rewrite of the whole model, ``rule(model, input_size=..., **layer_kwargs)``, for layers that
change more than their own op (``"cad"`` dilates every later layer)."""
SITE_RULES: Registry[Callable[..., Any]] = Registry("site rule")
"""Layer name -> rule for a site of several ops that must agree: ``rule(SiteSwapContext) -> {path: shape}``, which
rewrites the graph. Layers without one are swapped op by op."""

ModuleT = TypeVar("ModuleT", bound=type[nn.Module])
RuleT = TypeVar("RuleT", bound=Callable[..., Any])


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"layer name must be a non-empty string, got {name!r}")
    return name


def register_swap_rule(name: str) -> Callable[[RuleT], RuleT]:
    """Decorator registering the swap rule of layer ``name``; a duplicate name is an error."""
    _check_name(name)

    def add(rule: RuleT) -> RuleT:
        if name in SWAP_RULES:
            raise ValueError(f"a swap rule for layer {name!r} is already registered")
        SWAP_RULES.register(name, rule)
        return rule

    return add


def register_site_rule(name: str) -> Callable[[RuleT], RuleT]:
    """Decorator registering the site rule of layer ``name``; a duplicate name is an error."""
    _check_name(name)

    def add(rule: RuleT) -> RuleT:
        if name in SITE_RULES:
            raise ValueError(f"a site rule for layer {name!r} is already registered")
        SITE_RULES.register(name, rule)
        return rule

    return add


def register_layer(
    name: str,
    *,
    swap_rule: Callable[..., Any] | None = None,
    site_rule: Callable[..., Any] | None = None,
    phase_op: type | None = None,
) -> Callable[[ModuleT], ModuleT]:
    """Class decorator that registers a layer under ``name``, with its swap rules and its op kind.

    Args:
        name: The layer's name (``swap(model, name)``, ``create_layer(name)``).
        swap_rule: How :func:`polyglean.swap` rewrites one op for this layer (``None``: the layer cannot be
            swapped in).
        site_rule: How it rewrites a site of several ops together (optional; see :data:`SITE_RULES`).
        phase_op: A :class:`polyglean.sites.ops.ModulePhaseOp` subclass that runs the layer at any phase of its
            ``stride`` attribute, so that site discovery and ``PhaseNet`` see the layer as a subsampling op (a layer
            that traces to ops discovery knows, such as BlurPool's strided conv, needs none).

    Raises:
        ValueError: If ``name`` is empty or already registered.
        TypeError: If the decorated object is not an ``nn.Module`` subclass.
    """
    _check_name(name)

    def decorator(cls: ModuleT) -> ModuleT:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"only nn.Module subclasses can be registered, got {cls!r} for name {name!r}")
        if name in LAYERS:
            raise ValueError(
                f"layer name {name!r} is already registered to {LAYERS.get(name).__qualname__}; "
                f"choose another name for {cls.__qualname__}"
            )
        for registry, rule in ((SWAP_RULES, swap_rule), (SITE_RULES, site_rule)):
            if rule is not None and name in registry:
                raise ValueError(f"a {registry.kind} for layer {name!r} is already registered")
        if phase_op is not None:
            from polyglean.layers.phase_ops import register_phase_op  # phase_ops imports the sites package

            register_phase_op(cls, phase_op)
        LAYERS.register(name, cls)
        if swap_rule is not None:
            SWAP_RULES.register(name, swap_rule)
        if site_rule is not None:
            SITE_RULES.register(name, site_rule)
        return cls

    return decorator


def unregister_layer(name: str) -> type[nn.Module]:
    """Removes layer ``name`` and its swap rules (for tests and plugins that replace one); returns its class.

    The op kind registered with site discovery stays: it is keyed on the class, which nothing else uses.

    Raises:
        UnknownNameError: unknown name.
    """
    cls = LAYERS.unregister(name)
    for registry in (SWAP_RULES, SITE_RULES):
        if name in registry:
            registry.unregister(name)
    return cls


def list_layers(pattern: str = "*") -> list[str]:
    """Sorted names of the registered layers matching a shell-style wildcard, e.g. ``"*pool"``.

    Example:
        >>> list_layers("*pool")
        ['adapool', 'blurpool', 'softpool']
    """
    return LAYERS.names(pattern)


def get_layer(name: str | type[nn.Module]) -> type[nn.Module]:
    """The layer class registered under ``name`` (a class is returned as is).

    Raises:
        ValueError: If no layer is registered under ``name``; the message lists the known names.
    """
    if isinstance(name, type) and issubclass(name, nn.Module):
        return name
    if not isinstance(name, str):
        raise TypeError(f"layer must be a registered name or an nn.Module class, got {name!r}")
    return LAYERS.get(name)


def create_layer(name: str | type[nn.Module], *args: Any, **kwargs: Any) -> nn.Module:
    """Instantiates the layer ``name`` (a registered name or a class) with the given arguments."""
    return get_layer(name)(*args, **kwargs)
