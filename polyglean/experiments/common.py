"""What every experiment shares: the progress callback, the image selection, a model's class count, per-image
outcomes and their comparison with a reference (paired bootstrap interval and McNemar's exact test)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from polyglean.errors import ArgumentError, DataError
from polyglean.metrics import classification_metrics
from polyglean.stats import mcnemar, paired_bootstrap

__all__ = [
    "ImageSelection",
    "Outcomes",
    "Progress",
    "base_samples",
    "compare",
    "data_fingerprint",
    "model_classes",
    "select_images",
]

Progress = Callable[[str, int, int], None]
"""``progress(stage, images_done, images_total)``, called after every batch (the CLI draws a bar from it)."""

Part = Literal["all", "even", "odd"]


def _nothing(stage: str, done: int, total: int) -> None:
    return None


@dataclass(frozen=True)
class ImageSelection:
    """Which images of a data set an experiment uses, applied in this order: ``part`` (the even- or odd-numbered
    images in file order), then ``subset`` (a range ``START:STOP`` of a fixed shuffled order, see
    :func:`polyglean.data.subset_dataset`), then ``limit`` (at most N, evenly spread).

    Args:
        part: ``"all"``, ``"even"`` or ``"odd"``.
        subset: ``(start, stop)`` with ``stop = -1`` for the end, or None.
        limit: at most this many images, or None.
    """

    part: Part = "all"
    subset: tuple[int, int] | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.part not in ("all", "even", "odd"):
            raise ArgumentError(f"part must be 'all', 'even' or 'odd', got {self.part!r}")
        if self.limit is not None and self.limit < 1:
            raise ArgumentError(f"limit must be >= 1, got {self.limit}")
        if self.subset is not None:
            start, stop = self.subset
            if start < 0 or (stop != -1 and stop <= start):
                raise ArgumentError(f"subset {start}:{stop} is empty or negative; need 0 <= START < STOP")


def select_images(dataset: Dataset[Any], selection: ImageSelection) -> Dataset[Any]:
    """The images of ``dataset`` that ``selection`` names (a ``Subset``, or ``dataset`` itself).

    Raises:
        DataError: the selection is outside the data set or leaves no image.
    """
    from polyglean.data import limit_dataset, subset_dataset

    n = len(dataset)  # type: ignore[arg-type]
    if selection.part != "all":
        dataset = Subset(dataset, list(range(0 if selection.part == "even" else 1, n, 2)))
    if selection.subset is not None:
        start, stop = selection.subset
        m = len(dataset)  # type: ignore[arg-type]
        if not 0 <= start < (m if stop == -1 else stop) <= m:
            raise DataError(f"subset {start}:{'' if stop == -1 else stop} is outside the {m} selected images "
                            f"(of {n} in the data set)")
        dataset = subset_dataset(dataset, start, stop)
    dataset = limit_dataset(dataset, selection.limit, spread=True)
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise DataError(f"the image selection {selection} leaves no image of {n}")
    return dataset


def base_samples(dataset: Any) -> tuple[Any, list[int]]:
    """The data set under nested ``Subset``s and the indices into it of ``dataset``'s items, in order."""
    indices = list(range(len(dataset)))
    while isinstance(dataset, Subset):
        indices = [dataset.indices[i] for i in indices]
        dataset = dataset.dataset
    return dataset, indices


def data_fingerprint(dataset: Any) -> str:
    """SHA-256 of the selected images' names (relative to the data set's root), sizes, modification times and
    labels, in order: a cache keyed on it is invalid once an image is replaced, added, removed or relabelled.

    Raises:
        DataError: the data set does not list its files (``samples`` of ``(path, label)``).
    """
    base, indices = base_samples(dataset)
    samples = getattr(base, "samples", None)
    if samples is None:
        raise DataError(f"{type(base).__name__} does not list its files; it cannot key a cache")
    root = getattr(base, "root", None)
    h = hashlib.sha256()
    for i in indices:
        path, label = samples[i]
        st = path.stat()
        name = str(path.relative_to(root)) if root is not None and path.is_relative_to(root) else path.name
        h.update(json.dumps([name, st.st_size, st.st_mtime_ns, int(label)]).encode())
    return h.hexdigest()


def model_classes(model: nn.Module, input_size: Sequence[int], device: str | torch.device = "cpu") -> int:
    """The number of classes a classifier predicts (one forward of a zero image).

    Raises:
        ArgumentError: the model does not return logits ``(1, K)``.
    """
    with torch.no_grad():
        out = model(torch.zeros(1, *input_size, device=device))
    if not isinstance(out, Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ArgumentError(f"the evaluation needs a classifier returning logits (N, K); the model returned {shape}")
    return int(out.shape[-1])


@dataclass
class Outcomes:
    """Per-image results of one prediction on labelled images.

    Attributes:
        correct: ``(N,)`` True where the top-1 class is the label.
        nll: ``(N,)`` negative log-likelihood of the label.
        pred: ``(N,)`` the predicted class.
    """

    correct: Tensor
    nll: Tensor
    pred: Tensor

    @classmethod
    def of(cls, logits: Tensor, labels: Tensor) -> Outcomes:
        """Outcomes of ``logits`` ``(N, K)`` against ``labels`` ``(N,)``."""
        pred = logits.argmax(-1)
        nll = F.cross_entropy(logits.float(), labels, reduction="none")
        return cls(correct=pred == labels, nll=nll.detach(), pred=pred)


def compare(outcomes: Outcomes, reference: Outcomes, *, seed: int = 0) -> dict[str, Any]:
    """The change of top-1 (points) and NLL against ``reference`` on the same images, each with a paired 95%
    bootstrap interval, and McNemar's exact p on the images fixed and broken.

    Returns:
        ``delta_top1``, ``delta_top1_ci`` ``[low, high]``, ``delta_nll``, ``delta_nll_ci``, ``fixed``, ``broken``,
        ``mcnemar_p``.
    """
    top1 = paired_bootstrap(reference.correct.float(), outcomes.correct.float(), seed=seed)
    nll = paired_bootstrap(reference.nll, outcomes.nll, seed=seed)
    test = mcnemar(reference.correct, outcomes.correct)
    return {
        "delta_top1": 100 * top1.delta, "delta_top1_ci": [100 * top1.low, 100 * top1.high],
        "delta_nll": nll.delta, "delta_nll_ci": [nll.low, nll.high],
        "fixed": test.fixed, "broken": test.broken, "mcnemar_p": test.p_value,
    }


def metrics_row(logits: Tensor, labels: Tensor, reference: Outcomes | None) -> tuple[dict[str, Any], Outcomes]:
    """top1/top5/nll/ece of ``logits`` and, against ``reference``, :func:`compare`; and the per-image outcomes."""
    logits, labels = logits.detach().float().cpu(), labels.cpu()
    if len(labels) == 0:
        raise DataError("no images were evaluated")
    outcomes = Outcomes.of(logits, labels)
    row: dict[str, Any] = dict(classification_metrics(logits, labels))
    row["n_images"] = len(labels)
    if reference is not None:
        row.update(compare(outcomes, reference))
    return row, outcomes


def build_search(net: Any, **settings: Any) -> Any:
    """A :class:`~polyglean.search.PhaseSearch` of ``net``; the settings it refuses (a budget beyond the search
    space's states, an unknown site, an aggregator that needs a trained module) raise :class:`ArgumentError`.
    """
    from polyglean.errors import PolygleanError
    from polyglean.search import PhaseSearch

    try:
        return PhaseSearch(net, **settings)
    except ValueError as err:
        if isinstance(err, PolygleanError):
            raise
        raise ArgumentError(str(err)) from err


ACTIVATION_FACTOR = 64
"""A model's activations at one input are assumed to take at most this many times the input's memory (the CNNs
here take 10-40x): an input size whose activations would not fit in the machine's memory is refused up front."""


def check_input_size(input_size: Sequence[int], batch: int = 2, *, memory: int | None = None) -> None:
    """Refuses an input size whose batch of ``batch`` images (float32) times :data:`ACTIVATION_FACTOR` would not fit
    in ``memory`` bytes (default: the machine's physical memory), before anything is allocated.

    Raises:
        ArgumentError: a side < 1, or an input too large for the memory.
    """
    import math
    import os

    if any(int(s) < 1 for s in input_size):
        raise ArgumentError(f"input size must be positive, got {tuple(input_size)}")
    if memory is None:
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # not POSIX: no bound known
            return
    need = batch * math.prod(int(s) for s in input_size) * 4 * ACTIVATION_FACTOR
    if need > memory:
        raise ArgumentError(f"input size {tuple(input_size)} needs about {need / 2**30:.0f} GiB for a batch of {batch} "
                            f"and its activations; this machine has {memory / 2**30:.0f} GiB; use a smaller size")
