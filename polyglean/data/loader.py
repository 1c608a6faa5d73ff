"""A data loader whose errors look the same with and without worker processes.

``torch.utils.data.DataLoader`` re-raises an exception of a worker process in the main process with the worker's
whole traceback folded into its message, so a corrupt image gives one line with ``workers=0`` and some 25 lines
with ``workers=1``. :func:`make_loader` carries a :class:`~polyglean.errors.PolygleanError` (a corrupt image, a
decompression bomb ...) from the worker to the main process as an object and raises the original there, with its
one-line message. Every other exception (a bug) keeps PyTorch's behaviour and its traceback.

Example:
    >>> import torch
    >>> loader = make_loader([(torch.zeros(3), 0)] * 5, batch_size=2)
    >>> [len(y) for _, y in loader]
    [2, 2, 1]
"""

from __future__ import annotations

from collections.abc import Iterable, Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.dataloader import default_collate

from polyglean.errors import ArgumentError, DataError, PolygleanError

__all__ = ["CheckedLoader", "make_loader"]


class _Failed:
    """A user error raised while loading one sample, carried to the main process in place of the sample."""

    def __init__(self, error: PolygleanError) -> None:
        self.error = error


class _Guarded(Dataset[Any]):
    """``dataset`` with every :class:`PolygleanError` of ``__getitem__`` returned as a :class:`_Failed`."""

    def __init__(self, dataset: Dataset[Any] | Sequence[Any]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except PolygleanError as err:
            return _Failed(err)


class _Collate:
    """``collate`` of a batch, or the first :class:`_Failed` in it (picklable for worker processes)."""

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, batch: list[Any]) -> Any:
        for item in batch:
            if isinstance(item, _Failed):
                return item
        return self.collate(batch)


class CheckedLoader:
    """Iterates a ``DataLoader`` and raises a sample's :class:`PolygleanError` as itself (see the module docstring).

    Attributes:
        loader: the underlying ``torch.utils.data.DataLoader``.
        dataset: the data set as given (not the guarded wrapper).
    """

    def __init__(self, loader: DataLoader[Any], dataset: Any) -> None:
        self.loader = loader
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            if isinstance(batch, _Failed):
                raise batch.error
            yield batch


def make_loader(dataset: Dataset[Any] | Sequence[Any], *, batch_size: int, workers: int = 0, shuffle: bool = False,
                generator: torch.Generator | None = None,
                collate_fn: Callable[[list[Any]], Any] | None = None,
                batch_sampler: Iterable[list[int]] | None = None) -> CheckedLoader:
    """A ``DataLoader`` over ``dataset`` that raises a sample's :class:`PolygleanError` the same way with any
    number of workers.

    Args:
        dataset: a map-style data set (e.g. :class:`polyglean.data.ImageDataset` or a ``Subset`` of one).
        batch_size: samples per batch (>= 1).
        workers: worker processes (0: load in this process).
        shuffle: draw a random order each pass (from ``generator``).
        generator: the random order's generator.
        collate_fn: how samples become a batch (default: PyTorch's ``default_collate``).
        batch_sampler: the batches as lists of indices, instead of ``batch_size`` and ``shuffle`` (e.g. the
            batches one process of a distributed run computes).

    Raises:
        DataError: ``dataset`` is empty.
        ValueError: ``batch_size`` < 1 or ``workers`` < 0.
    """
    if batch_size < 1:
        raise ArgumentError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ArgumentError(f"workers must be >= 0, got {workers}")
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise DataError(f"the data set {dataset!r} holds no images")
    collate = _Collate(collate_fn or default_collate)
    if batch_sampler is not None:
        loader = DataLoader(_Guarded(dataset), batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate)
    else:
        loader = DataLoader(_Guarded(dataset), batch_size=batch_size, shuffle=shuffle, generator=generator,
                            num_workers=workers, collate_fn=collate)
    return CheckedLoader(loader, dataset)
