"""Phase states as a training-time augmentation: each training image runs, with probability ``p``, at a random
phase state of the model's subsampling sites.

The paper leaves open whether the phases a subsampling layer discards can be used in training too. Here they are
an augmentation, as a random crop is: :class:`PhaseAugmented` wraps a model so that in training mode every image
of a batch draws its own state (uniform over the phases of each chosen site, with probability ``p``; the default
state otherwise) and the whole batch runs in one pass; in eval mode it is the model itself.

How training mode works in the phase graph: the model is traced once, in eval mode, by :class:`PhaseNet`, and
:meth:`PhaseNet.train_forward` runs the traced segments in whatever mode the model's modules are in. The segments
call the model's own modules, so BatchNorm normalises with the statistics of the whole batch (images at different
phases together, as images with different crops are) and updates its running statistics, dropout drops, and the
gradients reach the model's own parameters through the phase ops. Tracing in training mode instead would update
the running statistics during the trace, and an eager model has no per-image phase; a forward that calls a
mode-dependent *function* (``F.batch_norm(..., training=self.training)``) is refused, since the trace fixed it.

Draws are reproducible: the generator is reseeded per epoch (:meth:`PhaseAugmented.reseed`), so a run resumed at
an epoch boundary draws what a run straight through draws, and under ``torchrun`` every process draws the states
of the whole global batch and keeps its own images' (:meth:`PhaseAugmented.draw`).

Example:
    >>> import torch
    >>> from polyglean.models import cifar_resnet20
    >>> model = cifar_resnet20()
    >>> augmented = PhaseAugmented(model, (3, 32, 32), p=0.5, seed=0)
    >>> augmented.site_names
    ['layer2.0', 'layer3.0']
    >>> logits = augmented.train()(torch.randn(4, 3, 32, 32))  # each image at its own random state
    >>> logits.shape
    torch.Size([4, 10])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from polyglean.errors import ArgumentError
from polyglean.phase.net import PhaseNet
from polyglean.search.engine import default_search_space
from polyglean.sites import Site

__all__ = ["PhaseAugmented", "check_probability", "resolve_sites"]


def check_probability(p: Any) -> float:
    """``p`` as a float in ``[0, 1]``.

    Raises:
        ArgumentError: not a number in ``[0, 1]``.
    """
    try:
        value = float(p)
    except (TypeError, ValueError):
        raise ArgumentError(f"--phase-augment must be a probability in [0, 1], got {p!r}") from None
    if isinstance(p, bool) or not 0.0 <= value <= 1.0:
        raise ArgumentError(f"--phase-augment must be a probability in [0, 1], got {p!r}")
    return value


def resolve_sites(net: PhaseNet, sites: str | Sequence[str] | None) -> list[Site]:
    """The sites whose phases are drawn.

    Args:
        net: The model's :class:`PhaseNet`.
        sites: ``None`` or ``"search"``: the phase search's default space (the main-path sites but the first and
            the last; see :class:`~polyglean.search.PhaseSearch`), so training draws the states the search later
            explores; ``"main"``: every site on the main path; ``"all"``: every site; or site names (a list, or
            one comma-separated string).

    Raises:
        ArgumentError: an unknown site (the message lists the sites) or an empty choice.
    """
    if sites is None or sites == "search":
        return default_search_space(net)
    if sites == "main":
        chosen = net.main_sites
    elif sites == "all":
        chosen = net.sites
    else:
        names = [s.strip() for s in sites.split(",")] if isinstance(sites, str) else list(sites)
        if not names or any(not n for n in names):
            raise ArgumentError(f"--phase-sites names no site: {sites!r}; give search, main, all or site names")
        chosen = [net.site(n) for n in names]
    if not chosen:
        raise ArgumentError(f"{type(net.model).__name__} has no subsampling site to draw phases at ({sites!r})")
    return sorted({s.index: s for s in chosen}.values(), key=lambda s: s.index)


class PhaseAugmented(nn.Module):
    """A model that, in training mode, runs each image at a random phase state with probability ``p``.

    Args:
        model: The model to train (any mode; it is traced in eval mode and its modes are restored).
        input_size: ``(C, H, W)`` of one input image.
        p: Probability that an image runs at a random state (``0``: the default state always, which is ordinary
            training bit for bit; ``1``: always a random state, possibly the default one).
        sites: Which sites draw a phase (see :func:`resolve_sites`); the others keep ``(0, 0)``.
        seed: Seed of the draws (reseed per epoch with :meth:`reseed`).
        leaf_modules: Module names or types to call as themselves rather than trace into (as for
            :class:`PhaseNet`), e.g. a custom normalisation layer with control flow in its forward.

    In eval mode ``forward`` is ``model(x)``. The model is held, not copied: its ``state_dict`` is the one to save.
    """

    def __init__(self, model: nn.Module, input_size: Sequence[int], *, p: float,
                 sites: str | Sequence[str] | None = None, seed: int = 0,
                 leaf_modules: Iterable[str | type[nn.Module]] = ()) -> None:
        super().__init__()
        self.p = check_probability(p)
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            net = PhaseNet(model, input_size, leaf_modules=leaf_modules)
        finally:
            for m, training in modes.items():
                m.train(training)
        if not net.sites:
            raise ArgumentError(f"{type(model).__name__} has no subsampling sites: there are no phases to train on")
        net.check_trainable()
        self.net = net
        self.sites = resolve_sites(net, sites)
        self._generator = torch.Generator()
        self.reseed(seed)

    @property
    def model(self) -> nn.Module:
        """The wrapped model."""
        return self.net.model

    @property
    def site_names(self) -> list[str]:
        """Names of the sites that draw a phase."""
        return [s.name for s in self.sites]

    def settings(self) -> dict[str, Any]:
        """What a checkpoint records: ``{"p": ..., "sites": [...]}``."""
        return {"p": self.p, "sites": self.site_names}

    def reseed(self, seed: int) -> None:
        """Restarts the draws from ``seed`` (call at the start of every epoch with a seed derived from it)."""
        self._generator.manual_seed(int(seed))

    def draw(self, n: int) -> Tensor:
        """The states of ``n`` images: flat phase indices, shape ``(n, L)`` for the ``L`` sites, on the CPU.

        Each image is augmented with probability ``p``; an augmented image draws every chosen site's phase
        uniformly (so it may draw the default state); the other sites stay at 0. Always consumes the same random
        numbers for ``n`` images whatever ``p`` is.
        """
        states = torch.zeros(n, len(self.net.sites), dtype=torch.long)
        augmented = torch.rand(n, generator=self._generator) < self.p
        for site in self.sites:
            phase = torch.randint(site.num_phases, (n,), generator=self._generator)
            states[:, site.index] = torch.where(augmented, phase, 0)
        return states

    def forward(self, x: Tensor, states: Tensor | None = None) -> Any:
        """In training mode, ``x`` at ``states`` (drawn with :meth:`draw` when not given); in eval mode the model.

        Shape:
            - x: ``(N, C, H, W)``
            - states: ``(N, L)`` flat phase indices (see :class:`PhaseNet`)
        """
        if not self.training:
            return self.net.model(x)
        if states is None:
            states = self.draw(x.shape[0])
        if x.shape[0] == 0 or not bool(states.any()):
            return self.net.train_forward(x, None)
        return self.net.train_forward(x, states.to(x.device))

    def extra_repr(self) -> str:
        return f"p={self.p}, sites={self.site_names}"
