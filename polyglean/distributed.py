"""Evaluation across processes and machines with ``torch.distributed`` (as started by ``torchrun``).

The images are cut into the same global batches as a single-process run (``batch_size`` consecutive images each)
and the batches, not the images, are dealt to the ranks round-robin. A batch therefore holds the same images in
every run, whatever the number of processes, and the search, which is per image but runs a batch as a whole,
does exactly the same arithmetic: the per-image results, and so every metric, are identical to a single-process
run. Each image is evaluated once (no padding); ranks left without a batch (more processes than batches) only
take part in the collectives.

After every batch the ranks agree, with one all-reduce, on whether any of them failed and on how many images
are done (progress, shown on rank 0). The lowest rank that failed raises its own error; every other rank raises
:class:`PeerFailed`, which the command line exits on without printing, so the error is shown once and no rank
waits for a peer that has stopped. Collectives have a timeout (the process group's) for peers that die without
a word; ``torchrun`` also stops the other workers when one exits with an error.

Finished batches can be kept in a :class:`BatchStore` (one file per batch, written atomically, in a folder keyed
on the run's settings), so a run that is killed resumes with the batches that are still missing, also with
another number of processes.

Example (single process; under ``torchrun`` the same code runs on every rank)::

    ctx = init_distributed()
    batches = global_batches(len(dataset), 32)
    payloads = run_sharded(batches, compute, ctx=ctx)  # on rank 0: one payload per batch, in batch order
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from polyglean.errors import ArgumentError, CheckpointError, PolygleanError
from polyglean.io import load_torch, write_json, write_torch

__all__ = [
    "BatchStore",
    "DistContext",
    "PeerFailed",
    "broadcast_object",
    "together",
    "global_batches",
    "init_distributed",
    "run_sharded",
    "settings_key",
    "shutdown_distributed",
]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800.0


class PeerFailed(PolygleanError, RuntimeError):
    """Another rank failed; that rank shows the error. The command line exits on this one without a message."""

    quiet = True


@dataclass(frozen=True)
class DistContext:
    """Which process this is among how many.

    Attributes:
        rank: This process's index, ``0 <= rank < world_size``.
        world_size: Number of processes.
        local_rank: Index among the processes of this machine (the GPU it uses).
        backend: ``gloo`` or ``nccl`` when a process group is initialised, else ``None``.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that reports progress and writes results."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process, with a process group."""
        return self.world_size > 1 and self.backend is not None

    def device_for(self, device: torch.device) -> torch.device:
        """The device this rank uses: ``cuda`` without an index becomes ``cuda:<local_rank>``."""
        if device.type == "cuda" and device.index is None and self.distributed:
            return torch.device("cuda", self.local_rank % max(torch.cuda.device_count(), 1))
        return device


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ArgumentError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: torch.device | str = "cpu", *, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Joins the process group that ``torchrun`` describes in the environment (``RANK``, ``WORLD_SIZE``, ...).

    Without those variables (a plain single-process run) nothing is initialised. The backend is ``nccl`` for a
    CUDA device and ``gloo`` otherwise; each rank on CUDA uses the GPU of its local rank.

    Args:
        device: The device the run uses.
        timeout_s: Timeout of every collective: a peer silent for longer is taken as dead.

    Raises:
        ArgumentError: inconsistent environment (rank out of range) or a bad timeout.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ArgumentError(f"RANK={rank} / WORLD_SIZE={world} from the environment are inconsistent")
    if timeout_s <= 0:
        raise ArgumentError(f"the distributed timeout must be > 0 seconds, got {timeout_s}")
    if world == 1:
        return DistContext(0, 1, 0, None)
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local % max(torch.cuda.device_count(), 1))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(dist.get_rank(), dist.get_world_size(), local, dist.get_backend())


def shutdown_distributed(ctx: DistContext) -> None:
    """Leaves the process group (if this module joined one)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def _flag_device(ctx: DistContext) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if ctx.backend == "nccl" else torch.device("cpu")


def _agree(ctx: DistContext, error: BaseException | None, images: int = 0) -> int:
    """All ranks learn whether any failed (then each raises) and how many images all did; returns that sum."""
    if not ctx.distributed:
        if error is not None:
            raise error
        return images
    flags = torch.tensor([1 if error is not None else 0, images], dtype=torch.long, device=_flag_device(ctx))
    dist.all_reduce(flags)
    failed, total = (int(v) for v in flags.tolist())
    if failed:
        first = torch.tensor([ctx.rank if error is not None else ctx.world_size], device=flags.device)
        dist.all_reduce(first, op=dist.ReduceOp.MIN)  # the lowest failing rank shows its error, once
        if error is not None and int(first.item()) == ctx.rank:
            raise error
        raise PeerFailed(f"rank {ctx.rank}: stopped because {failed} rank(s) failed (rank {int(first.item())} "
                         "shows the error)")
    return total


@contextlib.contextmanager
def together(ctx: DistContext) -> Iterator[None]:
    """Runs a block on every rank and then agrees on its outcome: if it failed anywhere, every rank stops (the
    failing one with its error, the others with :class:`PeerFailed`). Use it around per-rank set-up work (model
    loading, data checks) so that a rank that fails there does not leave the others waiting in a collective."""
    error: BaseException | None = None
    try:
        yield
    except Exception as exc:  # re-raised below, after the other ranks have heard of it
        error = exc
    _agree(ctx, error)


def broadcast_object(ctx: DistContext, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (picklable; CPU tensors)."""
    return _broadcast(ctx, value)


def _broadcast(ctx: DistContext, value: Any) -> Any:
    if not ctx.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=_flag_device(ctx) if ctx.backend == "nccl" else None)
    return box[0]


def global_batches(num_items: int, batch_size: int) -> list[list[int]]:
    """Consecutive batches of ``batch_size`` item indices (the last may be smaller): the batches of a
    single-process run, which every distributed run uses too.

    Raises:
        ArgumentError: ``batch_size < 1`` or ``num_items < 0``.
    """
    if batch_size < 1:
        raise ArgumentError(f"batch size must be >= 1, got {batch_size}")
    if num_items < 0:
        raise ArgumentError(f"number of items must be >= 0, got {num_items}")
    return [list(range(i, min(i + batch_size, num_items))) for i in range(0, num_items, batch_size)]


def settings_key(settings: dict[str, Any]) -> str:
    """A SHA-256 of the canonical JSON of ``settings`` (everything that changes the results)."""
    text = json.dumps(settings, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class BatchStore:
    """Finished batches of a run, one file each, in ``root/<key>/`` (``key`` from :func:`settings_key`).

    Args:
        root: Folder for the batches of runs (e.g. beside the result file).
        settings: Everything that changes a batch's results (model and weights fingerprint, images, search
            set-up, batch size, device type, precision); its hash names the sub-folder, and it is written there.
        resume: Use batches a killed run left. Without it, finding such batches is an error, so that a run never
            silently mixes in old results.

    Raises:
        ArgumentError: batches of the same settings exist and ``resume`` is false.
    """

    def __init__(self, root: str | Path, settings: dict[str, Any], *, resume: bool = False) -> None:
        self.settings = settings
        self.key = settings_key(settings)
        self.root = Path(root)
        self.folder = self.root / self.key[:16]
        self.resume = resume
        existing = self.done()
        if existing and not resume:
            raise ArgumentError(f"{self.folder} holds {len(existing)} finished batches of an interrupted run with "
                                "the same settings; pass --resume to continue it, or remove that folder")

    def _path(self, index: int) -> Path:
        return self.folder / f"batch-{index:07d}.pt"

    def done(self) -> set[int]:
        """Indices of the batches saved so far."""
        if not self.folder.is_dir():
            return set()
        out = set()
        for p in self.folder.glob("batch-*.pt"):
            try:
                out.add(int(p.stem.split("-", 1)[1]))
            except ValueError:
                continue
        return out

    def save(self, index: int, payload: Any) -> None:
        """Writes one batch's payload atomically (only tensors, numbers, strings, lists and dicts)."""
        if not (self.folder / "settings.json").is_file():
            write_json(self.folder / "settings.json", {"key": self.key, "settings": self.settings})
        write_torch(self._path(index), {"key": self.key, "index": index, "payload": payload})

    def has(self, index: int) -> bool:
        return self._path(index).is_file()

    def load(self, index: int) -> Any:
        """A saved batch's payload.

        Raises:
            CheckpointError: unreadable, or saved under other settings.
        """
        record = load_torch(self._path(index), "saved batch")
        if not isinstance(record, dict) or record.get("key") != self.key or record.get("index") != index:
            raise CheckpointError(f"{self._path(index)} does not belong to this run (other settings); remove "
                                  f"{self.folder} and run again")
        return record["payload"]

    def clear(self) -> None:
        """Removes this run's folder (after its results are written), and the root folder if that leaves it empty."""
        shutil.rmtree(self.folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.root.rmdir()


def run_sharded(
    batches: Sequence[Sequence[int]],
    compute: Callable[[list[list[int]]], Iterator[Any]],
    *,
    ctx: DistContext = DistContext(),
    store: BatchStore | None = None,
    images: Callable[[Any], int] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[Any] | None:
    """Computes every batch exactly once across the ranks and gathers the payloads on rank 0.

    Args:
        batches: The global batches (item indices), e.g. from :func:`global_batches`; identical on every rank.
        compute: Given this rank's batches (in order), yields one payload per batch (picklable: tensors on the
            CPU, numbers, strings, lists, dicts). A generator, so data loading can run ahead in workers.
        ctx: This process among the others (:func:`init_distributed`).
        store: Where finished batches are saved, and from where a resumed run takes them.
        images: Number of images in a payload (for progress); default ``len`` of the batch.
        on_progress: Called on rank 0 with ``(images done, images in all)`` after every step.

    Returns:
        On rank 0 the payloads of all batches in batch order; ``None`` on the other ranks.

    Raises:
        PeerFailed: another rank failed (this one stops too).
    """
    total_images = sum(len(b) for b in batches)
    error: BaseException | None = None
    done: set[int] = set()
    if ctx.is_main and store is not None:
        try:
            done = store.done()
        except OSError as exc:
            error = exc
    _agree(ctx, error)
    done = _broadcast(ctx, sorted(done))
    done_set = set(done)
    if done_set and ctx.is_main:
        log.info("resuming: %d of %d batches were saved by an earlier run", len(done_set), len(batches))
    pending = [k for k in range(len(batches)) if k not in done_set]
    mine = pending[ctx.rank::ctx.world_size]
    results: dict[int, Any] = {}
    error = None
    try:  # batches this rank finds in its own store (a node-local folder) need no new work
        if store is not None:
            for k in mine:
                if store.has(k):
                    results[k] = store.load(k)
    except (OSError, PolygleanError) as exc:
        error = exc
    to_compute = [k for k in mine if k not in results]
    steps = len(to_compute)
    if ctx.distributed:
        count = torch.tensor([steps], dtype=torch.long, device=_flag_device(ctx))
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        steps = int(count.item())
    progress = _agree(ctx, error, sum(len(batches[k]) for k in results)) + sum(len(batches[k]) for k in done_set)
    if on_progress is not None and ctx.is_main:
        on_progress(progress, total_images)
    stream = compute([list(batches[k]) for k in to_compute]) if to_compute else iter(())
    for step in range(steps):
        error, count_images = None, 0
        if step < len(to_compute):
            k = to_compute[step]
            try:
                payload = next(stream)
                if store is not None:
                    store.save(k, payload)
                results[k] = payload
                count_images = images(payload) if images is not None else len(batches[k])
            except StopIteration:
                error = RuntimeError(f"compute() stopped after {step} of {len(to_compute)} batches")
            except Exception as exc:  # shared with the other ranks below, then re-raised here
                error = exc
        progress += _agree(ctx, error, count_images)
        if on_progress is not None and ctx.is_main:
            on_progress(progress, total_images)
    with contextlib.suppress(StopIteration):
        next(stream)  # let a generator finish (close its loader)
    if ctx.distributed:
        gathered: list[Any] = [None] * ctx.world_size if ctx.is_main else None  # type: ignore[assignment]
        dist.gather_object(results, gathered if ctx.is_main else None, dst=0)
        if not ctx.is_main:
            return None
        for part in gathered:
            results.update(part)
    missing = [k for k in range(len(batches)) if k not in results]
    for k in missing:
        if store is None or k not in done_set:
            raise RuntimeError(f"batch {k} was neither computed nor saved")  # a bug, not an input error
        results[k] = store.load(k)
    return [results[k] for k in range(len(batches))]

