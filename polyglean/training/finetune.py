"""Fine-tuning a model with its subsampling layers swapped (BlurPool, SoftPool, adaPool, PASA, APS).

:func:`finetune` is ``polyglean train``: a whole run in named steps (:func:`resumable_checkpoint`,
:func:`starting_model`, :func:`training_data`, :func:`epoch_loader`, :func:`train_epoch`), driven by
:class:`FinetuneSettings`, reporting through :class:`FinetuneCallbacks`. Its pieces, usable on their own:
:func:`build_model` (a preset's pretrained weights, then :func:`polyglean.swap` with the downsample's settings from
:data:`DOWNSAMPLES`, so every weight the rewrite keeps starts pretrained), :func:`train_transform` (standard
augmentation), :func:`train_epoch` / :func:`evaluate_loss` (no printing: progress goes to a callback), checkpoints
written atomically (:func:`save_checkpoint`) that record the model spec, the downsample and the phase
augmentation (:mod:`polyglean.training.phase_augment`: each training image at a random phase state), and
:func:`load_finetuned`, which rebuilds the same architecture and loads such a checkpoint strictly with
``weights_only=True``. A run refuses to overwrite an existing checkpoint unless asked to, and resumes only with the
settings it was started with.

Example:
    >>> model, preprocess = build_model("cifar10-resnet20", "blurpool")  # doctest: +SKIP
    >>> optimizer = make_optimizer("sgd", model.parameters(), lr=0.01)  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision import transforms as T

from polyglean.data import CheckedLoader, make_loader, open_dataset
from polyglean.distributed import DistContext, broadcast_object, together
from polyglean.errors import ArgumentError
from polyglean.io import load_torch, write_torch
from polyglean.layers import swap
from polyglean.models import CheckpointError, Preprocess, load_model, load_state_dict_strict, num_classes
from polyglean.models.checkpoint import CheckpointNotFoundError
from polyglean.models.loader import build_architecture
from polyglean.registry import Registry
from polyglean.runtime import Runtime
from polyglean.training.phase_augment import PhaseAugmented, check_probability
from polyglean.training.runs import claim_output, refuse_changed_settings

__all__ = [
    "CHECKPOINT_FORMAT",
    "DOWNSAMPLES",
    "OPTIMIZERS",
    "BatchStats",
    "FinetuneCallbacks",
    "FinetuneSettings",
    "build_model",
    "epoch_loader",
    "epoch_order",
    "evaluate_loss",
    "finetune",
    "load_finetuned",
    "make_optimizer",
    "read_checkpoint",
    "resumable_checkpoint",
    "save_checkpoint",
    "starting_model",
    "train_epoch",
    "train_transform",
    "training_data",
]

CHECKPOINT_FORMAT = "polyglean-finetune/1"

DOWNSAMPLES: Registry[dict[str, Any]] = Registry("downsample layer")
"""Downsample name -> keyword arguments of :func:`polyglean.swap` used by ``train`` and ``eval --downsample``."""
DOWNSAMPLES.register("blurpool", {"filter_size": 3})
DOWNSAMPLES.register("softpool", {"convs": True})  # ResNet-20 has no pooling layer: its strided convs are swapped
DOWNSAMPLES.register("adapool", {"convs": True})
DOWNSAMPLES.register("pasa", {})
DOWNSAMPLES.register("aps", {})

OptimizerFactory = Callable[[Iterable[nn.Parameter], float, float], torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")
OPTIMIZERS.register("sgd", lambda params, lr, wd: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd,
                                                                  nesterov=True))
OPTIMIZERS.register("adamw", lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd))


def build_model(spec: str, downsample: str | None = None, *, weights: str | Path | None = None,
                pretrained: bool = False, random_weights: int | None = None) -> tuple[nn.Module, Preprocess]:
    """The model ``spec`` (pretrained or from ``weights``) with its subsampling layers swapped to ``downsample``.

    Args:
        spec: A model spec of :func:`polyglean.models.load_model` (e.g. ``"cifar10-resnet20"``).
        downsample: A name of :data:`DOWNSAMPLES`, or ``None`` for the model's own layers.
        weights: A checkpoint of the *unswapped* model (default: the preset's pretrained weights).
        pretrained: torchvision/timm: start from the library's weights (as ``load_model``).
        random_weights: start from random weights drawn from this seed, on purpose (as ``load_model``).

    Returns:
        ``(model, preprocess)``; the model is in eval mode. Every weight the rewrite keeps is the loaded one; new
        layers (PASA's filter conv, adaPool's beta) start from their own initialisation.

    Raises:
        ValueError: unknown ``downsample`` (the message lists the known ones) or ``spec``.
        ArgumentError: no source of weights for a torchvision/timm model, or more than one (see ``load_model``).
    """
    settings = DOWNSAMPLES.get(downsample) if downsample is not None else None
    model, preprocess = load_model(spec, weights, pretrained=pretrained, random_weights=random_weights)
    return _swapped(model, preprocess, downsample, settings), preprocess


def _swapped(model: nn.Module, preprocess: Preprocess, downsample: str | None,
             settings: dict[str, Any] | None) -> nn.Module:
    if settings is not None:
        model = swap(model, downsample, input_size=preprocess.input_size, **settings)
    return model.eval()


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint`, read by :func:`polyglean.io.load_torch` (``weights_only``).

    Raises:
        CheckpointNotFoundError: ``path`` does not exist (also a ``FileNotFoundError``).
        CheckpointError: not a readable checkpoint of this format.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    payload = load_torch(path, "fine-tuning checkpoint")
    if not isinstance(payload, Mapping) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a polyglean fine-tuning checkpoint (format {CHECKPOINT_FORMAT!r})")
    return dict(payload)


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> None:
    """Writes ``payload`` (with ``format`` added) atomically with :func:`polyglean.io.write_torch`.

    A crash while writing leaves the previous checkpoint intact.
    """
    write_torch(path, {**payload, "format": CHECKPOINT_FORMAT})


def load_finetuned(spec: str, downsample: str | None, path: str | Path) -> tuple[nn.Module, Preprocess]:
    """Rebuilds the architecture a checkpoint was trained with and loads it strictly (``weights_only=True``).

    Args:
        spec: The model spec; must equal the one the checkpoint records.
        downsample: The downsample name; must equal the one the checkpoint records (``None``: the default layers).
        path: A checkpoint written by ``polyglean train``.

    Returns:
        ``(model, preprocess)`` in eval mode.

    Raises:
        CheckpointError: the checkpoint records another model or downsample, or its keys do not match.
    """
    payload = read_checkpoint(path)
    if payload.get("model") != spec or payload.get("downsample") != downsample:
        raise CheckpointError(
            f"{path} holds model {payload.get('model')!r} with downsample {payload.get('downsample')!r}, not "
            f"{spec!r} with {downsample!r}; pass --model {payload.get('model')} "
            + (f"--downsample {payload['downsample']}" if payload.get("downsample") else "without --downsample")
        )
    settings = DOWNSAMPLES.get(downsample) if downsample is not None else None
    model, preprocess = build_architecture(spec)  # every weight comes from the checkpoint, strictly
    model = _swapped(model, preprocess, downsample, settings)
    load_state_dict_strict(model, payload["state_dict"], source=str(path))
    return model.eval(), preprocess


def train_transform(preprocess: Preprocess) -> Callable[[Any], Tensor]:
    """Standard augmentation before ``preprocess``: random crop with zero padding of 1/8 the side (4 pixels at
    32x32, as for CIFAR) and a horizontal flip."""
    _, h, w = preprocess.input_size
    return T.Compose([T.Resize((h, w)), T.RandomCrop((h, w), padding=max(h, w) // 8), T.RandomHorizontalFlip(),
                      preprocess])


def make_optimizer(name: str, params: Iterable[nn.Parameter], *, lr: float, weight_decay: float = 5e-4
                   ) -> torch.optim.Optimizer:
    """The optimizer ``name`` of :data:`OPTIMIZERS` (``sgd``: momentum 0.9, Nesterov; ``adamw``)."""
    if lr <= 0:
        raise ArgumentError(f"learning rate must be > 0, got {lr}")
    return OPTIMIZERS.get(name)(params, lr, weight_decay)


@dataclass(frozen=True)
class BatchStats:
    """What one training step saw: its loss, correct predictions and images, and the running epoch means."""

    loss: float
    correct: int
    images: int
    mean_loss: float
    accuracy: float


def _device_of(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter or buffer (the CPU for a model without either)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def train_epoch(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, *,
                on_batch: Callable[[BatchStats], None] | None = None) -> dict[str, float]:
    """One pass over ``loader`` with cross-entropy, stepping ``scheduler`` after every batch.

    Returns:
        ``{"loss": mean loss, "top1": accuracy in percent, "images": n}`` over the epoch.
    """
    model.train()
    device = _device_of(model)
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        n, right = len(y), int((logits.detach().argmax(-1) == y).sum())
        total_loss, correct, seen = total_loss + float(loss.detach()) * n, correct + right, seen + n
        if on_batch is not None:
            on_batch(BatchStats(float(loss.detach()), right, n, total_loss / seen, 100.0 * correct / seen))
    if seen == 0:
        raise ArgumentError("the training data loader yielded no batch")
    return {"loss": total_loss / seen, "top1": 100.0 * correct / seen, "images": float(seen)}


@torch.no_grad()
def evaluate_loss(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]]) -> dict[str, float]:
    """Mean cross-entropy and top-1 (percent) of ``model`` in eval mode over ``loader``."""
    model.eval()
    device = _device_of(model)
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        seen += len(y)
    return {"nll": total_loss / max(seen, 1), "top1": 100.0 * correct / max(seen, 1)}


# ------------------------------------------------------------------------------------------ a whole training run
@dataclass(frozen=True)
class FinetuneSettings:
    """Everything a fine-tuning run depends on (what ``polyglean train`` takes).

    Attributes:
        model: model spec; ``downsample``: a name of :data:`DOWNSAMPLES` or ``None``.
        data: training images (class folders or ``images/`` + ``labels.csv``); ``val_data``: optional validation.
        epochs: total epochs; the cosine schedule spans them all.
        weights / pretrained / random_weights: the starting weights, as :func:`polyglean.models.load_model`.
        workers: data-loading processes (does not change the result).
        phase_augment: probability that a training image runs at a random phase state
            (:class:`~polyglean.training.phase_augment.PhaseAugmented`); ``0``: ordinary training.
        phase_sites: the sites drawing phases (``search``, ``main``, ``all`` or comma-separated names; default
            ``search``); only with ``phase_augment > 0``.
        from_scratch: start from the architecture's own random initialisation (seeded by ``seed``), not from
            trained weights.
    """

    model: str
    data: str
    epochs: int
    downsample: str | None = None
    val_data: str | None = None
    lr: float = 0.01
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    batch_size: int = 128
    limit: int | None = None
    seed: int = 0
    workers: int = 0
    weights: str | None = None
    pretrained: bool = False
    random_weights: int | None = None
    phase_augment: float = 0.0
    phase_sites: str | None = None
    from_scratch: bool = False

    def check(self) -> None:
        """Refuses out-of-range settings before any work.

        Raises:
            ArgumentError: naming the option and its value.
        """
        for flag, value, low in (("--epochs", self.epochs, 1), ("--batch-size", self.batch_size, 1),
                                 ("--workers", self.workers, 0)):
            if value < low:
                raise ArgumentError(f"{flag} must be >= {low}, got {value}")
        if self.limit is not None and self.limit < 1:
            raise ArgumentError(f"--limit must be >= 1, got {self.limit}")
        if self.lr <= 0:
            raise ArgumentError(f"--lr must be > 0, got {self.lr}")
        if self.downsample is not None:
            DOWNSAMPLES.get(self.downsample)
        OPTIMIZERS.get(self.optimizer)
        check_probability(self.phase_augment)
        if self.phase_sites is not None and self.phase_augment == 0:
            raise ArgumentError(f"--phase-sites {self.phase_sites} has no effect without --phase-augment P > 0; "
                                "add --phase-augment or drop --phase-sites")
        if self.from_scratch:
            given = [flag for flag, on in (("--weights", self.weights is not None), ("--pretrained", self.pretrained),
                                           ("--random-weights", self.random_weights is not None)) if on]
            if given:
                raise ArgumentError(f"--from-scratch starts from the architecture's own random initialisation "
                                    f"(seeded by --seed); it contradicts {', '.join(given)}")

    def config(self) -> dict[str, Any]:
        """What must not change between a run and its resumption (recorded in the checkpoint)."""
        return {"model": self.model, "downsample": self.downsample, "data": str(self.data), "lr": self.lr,
                "weight_decay": self.weight_decay, "optimizer": self.optimizer, "batch_size": self.batch_size,
                "limit": self.limit, "seed": self.seed, "weights": self.weights, "pretrained": self.pretrained,
                "random_weights": self.random_weights, "phase_augment": self.phase_augment,
                "phase_sites": self.phase_sites, "from_scratch": self.from_scratch}


_CONFIG_DEFAULTS = {"weights": None, "pretrained": False, "random_weights": None,  # checkpoints from before them
                    "phase_augment": 0.0, "phase_sites": None, "from_scratch": False}


@dataclass
class FinetuneCallbacks:
    """Progress of :func:`finetune` (the library never prints): each is optional."""

    on_epoch_start: Callable[[int, int, int], None] | None = None
    """``(epoch, epochs, images)`` before an epoch (1-based)."""
    on_batch: Callable[[BatchStats, float], None] | None = None
    """``(stats, learning rate)`` after every step."""
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None
    """The epoch's record (``epoch``, ``loss``, ``top1``, ``seconds``, ``val_*``) once its checkpoint is written."""
    on_note: Callable[[str], None] | None = None
    """A sentence worth telling the user (e.g. nothing left to train)."""


def resumable_checkpoint(path: str | Path, settings: FinetuneSettings) -> dict[str, Any]:
    """The checkpoint at ``path``, checked to continue with ``settings``.

    Raises:
        CheckpointError: another format, other settings, or another number of epochs (the cosine schedule spans
            the epochs given at the start).
    """
    resumed = read_checkpoint(path)
    refuse_changed_settings(path, resumed.get("config", {}), settings.config(), _CONFIG_DEFAULTS)
    if resumed["total_epochs"] != settings.epochs:
        raise CheckpointError(
            f"cannot resume {path} with --epochs {settings.epochs}: its cosine schedule spans "
            f"{resumed['total_epochs']} epochs"
        )
    return resumed


def starting_model(settings: FinetuneSettings, resume_from: str | Path | None) -> tuple[nn.Module, Preprocess]:
    """The model to train: the checkpoint being resumed, or the (swapped) starting weights with new layers
    initialised from ``settings.seed``."""
    if resume_from is not None:
        return load_finetuned(settings.model, settings.downsample, resume_from)
    torch.manual_seed(settings.seed)  # new layers' initialisation
    if settings.from_scratch:  # the architecture's own initialisation, drawn from the seed
        model, preprocess = build_architecture(settings.model)
        return _swapped(model, preprocess, settings.downsample,
                        DOWNSAMPLES.get(settings.downsample) if settings.downsample is not None else None), preprocess
    return build_model(settings.model, settings.downsample, weights=settings.weights, pretrained=settings.pretrained,
                       random_weights=settings.random_weights)


def training_data(settings: FinetuneSettings, preprocess: Preprocess, classes: int
                  ) -> tuple[Dataset[Any], CheckedLoader | None]:
    """The (augmented, possibly limited) training set and a loader of the validation set, labels checked against
    the model's ``classes``."""
    train_set = open_dataset(settings.data, train_transform(preprocess), limit=settings.limit, num_classes=classes)
    val_loader = None
    if settings.val_data:
        val_set = open_dataset(settings.val_data, preprocess, num_classes=classes)
        val_loader = make_loader(val_set, batch_size=settings.batch_size, workers=settings.workers)
    return train_set, val_loader


class _SeededDraws(Dataset):  # type: ignore[type-arg]
    """``dataset`` whose item ``i`` draws its augmentation from a generator seeded by ``base`` and ``i`` alone, so
    an image is augmented the same way whichever process or worker loads it, in whatever order."""

    def __init__(self, dataset: Dataset[Any], base: int) -> None:
        self.dataset, self.base = dataset, base

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.base * 1_000_003 + int(i))
            return self.dataset[i]

    def __getattr__(self, name: str) -> Any:  # the wrapped set's attributes (e.g. its files, for error messages)
        if name in ("dataset", "base"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def epoch_order(settings: FinetuneSettings, size: int, epoch: int) -> list[list[int]]:
    """The global batches of one epoch: a random order seeded by ``seed`` and ``epoch``, cut into ``batch_size``
    consecutive images (the last batch may be smaller)."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(settings.seed * 1000 + epoch)).tolist()
    return [order[i:i + settings.batch_size] for i in range(0, size, settings.batch_size)]


def epoch_loader(settings: FinetuneSettings, train_set: Dataset[Any], epoch: int,
                 batches: Iterable[list[int]] | None = None) -> CheckedLoader:
    """The shuffled loader of one epoch (:func:`epoch_order`, or ``batches``); each image's augmentation is seeded
    by ``seed``, ``epoch`` and the image's index."""
    if batches is None:
        batches = epoch_order(settings, len(train_set), epoch)  # type: ignore[arg-type]
    return make_loader(_SeededDraws(train_set, settings.seed * 1000 + epoch), batch_size=settings.batch_size,
                       workers=settings.workers, batch_sampler=list(batches))


class _GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalises with the statistics of the global batch (all processes), through
    a differentiable all-reduce: what :class:`torch.nn.SyncBatchNorm` does, on any backend and device (that one
    needs a GPU). Same parameters and buffers as ``BatchNorm2d``, so checkpoints are unchanged."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or not self.track_running_stats:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        count = all_reduce(torch.tensor([float(x.shape[0] * x.shape[2] * x.shape[3])], device=x.device))
        n = count.detach()
        mean = all_reduce(x.sum((0, 2, 3))) / n
        centred = x - mean[None, :, None, None]
        var = all_reduce((centred * centred).sum((0, 2, 3))) / n
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1).clamp(min=1)), alpha=m)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def _global_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every ``BatchNorm2d`` replaced by :class:`_GlobalBatchNorm2d` (state kept)."""
    if type(module) is nn.BatchNorm2d:
        new = _GlobalBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats).to(module.weight.device if module.affine else "cpu")
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, _global_batchnorm(child))
    return module


def _train_epoch_sharded(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], batches: list[list[int]],
                         mine: list[list[int]], input_size: tuple[int, ...], optimizer: torch.optim.Optimizer,
                         scheduler: Any, ctx: DistContext, on_batch: Callable[[BatchStats], None] | None,
                         augment: PhaseAugmented | None = None) -> dict[str, float]:
    """:func:`train_epoch` of one rank: ``mine[k]`` are its images of global batch ``batches[k]``; its loss is
    their summed cross-entropy over the global batch size times the world size, so the gradient DDP averages is
    the global batch's. With ``augment``, every rank draws the phase states of the whole global batch and runs
    its own images at theirs, so the states are those one process would draw."""
    import torch.distributed as torch_dist

    model.train()
    device = _device_of(model)
    stream = iter(loader)
    total_loss, correct, seen = 0.0, 0, 0
    for idx, local in zip(batches, mine, strict=True):
        if local:
            x, y = next(stream)
            x, y = x.to(device), y.to(device)
        else:  # more processes than images in this batch: take part with none
            x = torch.zeros(0, *input_size, device=device)
            y = torch.zeros(0, dtype=torch.long, device=device)
        if augment is not None:
            logits = model(x, augment.draw(len(idx))[ctx.rank::ctx.world_size])
        else:
            logits = model(x)
        summed = F.cross_entropy(logits, y, reduction="sum")
        loss = summed * (ctx.world_size / len(idx))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        both = torch.stack([summed.detach(), (logits.detach().argmax(-1) == y).sum().to(summed.dtype)])
        torch_dist.all_reduce(both)
        batch_loss, right, n = float(both[0]), int(both[1]), len(idx)
        total_loss, correct, seen = total_loss + batch_loss, correct + right, seen + n
        if on_batch is not None:
            on_batch(BatchStats(batch_loss / n, right, n, total_loss / seen, 100.0 * correct / seen))
    if seen == 0:
        raise ArgumentError("the training data loader yielded no batch")
    return {"loss": total_loss / seen, "top1": 100.0 * correct / seen, "images": float(seen)}


def _on_cpu(value: Any) -> Any:
    """``value`` (nested dicts, lists, tuples of tensors and plain values) with every tensor copied to the CPU."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return value


_PHASE_SEED_OFFSET = 500_000_000  # phase draws use another stream than the epoch's order


def finetune(settings: FinetuneSettings, out: str | Path, *, resume: bool = False, overwrite: bool = False,
             callbacks: FinetuneCallbacks | None = None, runtime: Runtime | None = None,
             dist: DistContext | None = None) -> list[dict[str, Any]]:
    """Fine-tunes ``settings.model`` and writes a checkpoint atomically to ``out`` after every epoch.

    Steps: check the settings and the output (an existing ``out`` needs ``resume`` or ``overwrite``); the starting
    model; the data; the optimiser and the cosine schedule over all steps (restored when resuming); then epochs.

    ``runtime`` is the device (default: the CPU); training is ``fp32`` only. The checkpoint holds CPU tensors
    whatever the device, so a run can be resumed on another device.

    With ``dist`` of several processes (``torchrun``; every rank calls this with the same arguments) the model is
    trained with :class:`~torch.nn.parallel.DistributedDataParallel`: each global batch of ``batch_size`` images is
    split between the ranks (rank ``r`` loads every ``world``-th image of it), BatchNorm normalises with the global
    batch's statistics, and each image's augmentation is seeded by its index, so the weights are those of one
    process with the same ``batch_size`` and ``seed``, to float rounding. Rank 0 alone reads and writes ``out``,
    validates and reports.

    Returns:
        The history: one record per epoch trained so far (including resumed ones).

    Raises:
        ArgumentError: bad settings, a precision other than ``fp32``, or ``out`` exists without
            ``resume``/``overwrite``.
        CheckpointError: resuming a checkpoint of other settings.
        DataError: unreadable data or labels out of the model's range.
    """
    ctx = dist if dist is not None else DistContext()
    cb = callbacks if callbacks is not None and ctx.is_main else FinetuneCallbacks()
    rt = runtime if runtime is not None else Runtime()
    settings.check()
    if rt.precision != "fp32":
        raise ArgumentError(f"precision {rt.precision!r}: train fine-tunes in fp32 only; use --precision fp32")
    device = ctx.device_for(rt.device)
    resumed = None
    with together(ctx):  # rank 0 alone writes: it alone checks the output and reads the checkpoint
        if ctx.is_main:
            claim_output(out, resume=resume, overwrite=overwrite)
            resumed = resumable_checkpoint(out, settings) if resume else None
    resumed = broadcast_object(ctx, resumed)
    if resumed is not None and int(resumed["epoch"]) >= settings.epochs:
        if cb.on_note:
            cb.on_note(f"{out} has already trained {resumed['epoch']} of {settings.epochs} epochs; nothing to do")
        return list(resumed["history"])
    with together(ctx):
        if resumed is not None:  # every weight from the checkpoint rank 0 read, strictly
            model, preprocess = build_architecture(settings.model)
            model = _swapped(model, preprocess, settings.downsample,
                             DOWNSAMPLES.get(settings.downsample) if settings.downsample is not None else None)
            load_state_dict_strict(model, resumed["state_dict"], source=str(out))
        else:
            model, preprocess = starting_model(settings, None)
        model = model.to(device)
        if ctx.distributed:  # before the optimiser takes the parameters
            model = _global_batchnorm(model)
            other = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                     and not isinstance(m, _GlobalBatchNorm2d)]
            if other:
                raise ArgumentError(f"{settings.model}: its batch-norm layers {other[:3]} are not BatchNorm2d, so "
                                    "under torchrun they would normalise with each process's share of the batch; "
                                    "fine-tune it in one process")
        train_set, val_loader = training_data(settings, preprocess, num_classes(model, preprocess.input_size))
        augment = None
        if settings.phase_augment > 0:  # after the batch-norm swap: the phase graph calls the modules trained
            augment = PhaseAugmented(model, preprocess.input_size, p=settings.phase_augment,
                                     sites=settings.phase_sites, seed=settings.seed,
                                     leaf_modules=(_GlobalBatchNorm2d,))
    steps_per_epoch = -(-len(train_set) // settings.batch_size)  # type: ignore[arg-type]
    optimizer = make_optimizer(settings.optimizer, model.parameters(), lr=settings.lr,
                               weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs * steps_per_epoch)
    start, history = 0, []
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        start, history = int(resumed["epoch"]), list(resumed["history"])
    trained: nn.Module = model if augment is None else augment
    if ctx.distributed:
        trained = nn.parallel.DistributedDataParallel(trained,
                                                      device_ids=[device] if device.type == "cuda" else None)
    report = cb.on_batch

    def on_batch(stats: BatchStats) -> None:
        if report is not None:
            report(stats, optimizer.param_groups[0]["lr"])

    for epoch in range(start, settings.epochs):
        if cb.on_epoch_start:
            cb.on_epoch_start(epoch + 1, settings.epochs, len(train_set))  # type: ignore[arg-type]
        began = time.perf_counter()
        batches = epoch_order(settings, len(train_set), epoch)  # type: ignore[arg-type]
        if augment is not None:  # the draws of an epoch depend on the seed and the epoch alone (resumable)
            augment.reseed(settings.seed * 1000 + epoch + _PHASE_SEED_OFFSET)
        if ctx.distributed:
            mine = [idx[ctx.rank::ctx.world_size] for idx in batches]
            loader = epoch_loader(settings, train_set, epoch, [m for m in mine if m]) if any(mine) else []
            record: dict[str, Any] = _train_epoch_sharded(trained, loader, batches, mine, preprocess.input_size,
                                                          optimizer, scheduler, ctx, on_batch, augment)
        else:
            record = train_epoch(trained, epoch_loader(settings, train_set, epoch, batches), optimizer, scheduler,
                                 on_batch=on_batch)
        record.update(epoch=epoch + 1, seconds=time.perf_counter() - began)
        history.append(record)
        with together(ctx):  # rank 0 validates and writes; a failure there stops every rank
            if ctx.is_main:
                if val_loader is not None:
                    record.update({f"val_{k}": v for k, v in evaluate_loss(model, val_loader).items()})
                save_checkpoint(out, {
                    "model": settings.model, "downsample": settings.downsample, "config": settings.config(),
                    "epoch": epoch + 1, "total_epochs": settings.epochs, "state_dict": _on_cpu(model.state_dict()),
                    "optimizer": _on_cpu(optimizer.state_dict()), "scheduler": scheduler.state_dict(),
                    "history": history, "phase_augment": augment.settings() if augment is not None else None,
                })
                if cb.on_epoch_end:
                    cb.on_epoch_end(record)
    return history
