"""The registry of the downsampling layers: name -> Module class (a :class:`polyglean.registry.Registry`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from polyglean.registry import Registry

__all__ = ["LAYERS", "create_layer", "get_layer", "list_layers", "register_layer"]

LAYERS: Registry[type[nn.Module]] = Registry("layer")

ModuleT = TypeVar("ModuleT", bound=type[nn.Module])


def register_layer(name: str) -> Callable[[ModuleT], ModuleT]:
    """Class decorator that registers a layer under ``name``.

    Raises:
        ValueError: If ``name`` is empty or already registered.
        TypeError: If the decorated object is not an ``nn.Module`` subclass.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"layer name must be a non-empty string, got {name!r}")

    def decorator(cls: ModuleT) -> ModuleT:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"only nn.Module subclasses can be registered, got {cls!r} for name {name!r}")
        if name in LAYERS:
            raise ValueError(
                f"layer name {name!r} is already registered to {LAYERS.get(name).__qualname__}; "
                f"choose another name for {cls.__qualname__}"
            )
        LAYERS.register(name, cls)
        return cls

    return decorator


def list_layers(pattern: str = "*") -> list[str]:
    """Sorted names of the registered layers matching a shell-style wildcard, e.g. ``"*pool"``."""
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
