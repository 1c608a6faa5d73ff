"""A named registry (criteria, aggregators, ...): a duplicate name is an error, an unknown name lists what exists."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar
from polyglean.errors import ArgumentError

T = TypeVar("T")

__all__ = ["Registry", "UnknownNameError"]


class UnknownNameError(ArgumentError, KeyError):
    """A name that is not registered (a ``KeyError`` for lookups, a ``ValueError`` for user input); the message
    lists the names that exist."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Maps names to objects of one kind.

    Example:
        >>> CRITERIA: Registry[type] = Registry("criterion")
        >>> @CRITERIA.register("entropy")
        ... class Entropy: ...
        >>> CRITERIA.get("entropy").__name__
        'Entropy'
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T | None = None) -> Callable[[T], T] | T:
        """Registers ``item`` under ``name``; without ``item``, returns a decorator."""

        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"a {self.kind} named {name!r} is already registered")
            self._items[name] = obj
            return obj

        return add(item) if item is not None else add

    def get(self, name: str) -> T:
        """The item named ``name``.

        Raises:
            UnknownNameError: unknown name, listing the known ones.
        """
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise UnknownNameError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}") from None

    def unregister(self, name: str) -> T:
        """Removes and returns the item named ``name`` (for tests and plugins that replace one).

        Raises:
            UnknownNameError: unknown name.
        """
        item = self.get(name)
        del self._items[name]
        return item

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching a wildcard pattern, sorted."""
        return sorted(n for n in self._items if fnmatch.fnmatchcase(n, pattern))

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
