"""The à trous network of a trained model: the strides of some sites removed, every later op dilated.

Removing a site's stride ``(R_h, R_w)`` and dilating every later conv and max pool by it (padding scaled alike) gives
the finer-output-stride network, DeepLab's ``replace_stride_with_dilation``. Where every op after the site is local,
it is exactly what shift-and-stitch computes (:func:`polyglean.phase.stitch.stitch`: its interleaved phases) and
this function is only another way to run it. Where an op after the site sees the whole map (a global average, a
squeeze-and-excitation, a GroupNorm), stitching is refused, but the à trous network is still well defined: the
global op is taken over the finer map. That network is *not* any phase of the trained model nor an interleaving of
them: its global statistics come from ``R_h R_w`` times as many cells, spaced ``R`` times closer, than the trained
model ever saw. It is what a DeepLab-style "output stride 8 at test time" does with such a model.

A resize to a size read from the input (``F.interpolate(y, size=x.shape[-2:])``) stays: it upsamples the finer map
to the same size. A resize by a fixed factor, a transposed conv, an average pool or a functional conv after a site
has no dilated form and is refused by name.

Example:
    >>> import torchvision  # doctest: +SKIP
    >>> body = torchvision.models.resnet50().eval()  # doctest: +SKIP
    >>> fine = atrous(body, ["layer4.0"], input_size=(3, 224, 224))  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from polyglean.errors import ArgumentError, ModelError
from polyglean.phase.stitch import _graph_deps, _leaves, _pair, plan
from polyglean.sites import Site

__all__ = ["atrous"]

_DILATABLE = (nn.Conv2d, nn.MaxPool2d)
_RESIZE_FUNCTIONS = {F.interpolate, F.upsample, F.upsample_bilinear, F.upsample_nearest}
_SPATIAL_FUNCTIONS = {F.conv2d, torch.conv2d, F.conv_transpose2d, F.max_pool2d, torch.max_pool2d, F.avg_pool2d,
                      F.lp_pool2d, F.unfold, F.fold, F.pixel_shuffle, F.pixel_unshuffle}


def atrous(model: nn.Module, sites: Sequence[str | int | Site] | str | int | Site, *,
           input_size: Sequence[int], shapes_only: bool = False) -> fx.GraphModule:
    """A copy of ``model`` with the strides of ``sites`` removed and every later conv and max pool dilated.

    Args:
        model: Any image model that :class:`~polyglean.phase.net.PhaseNet` can trace; not modified (the copy's
            weights are copies).
        sites: The sites whose stride to remove (names, indices or records): as for stitching, every strided site
            after the first one must be among them.
        input_size: ``(C, H, W)`` for discovery and for the shape check of the rewritten model.
        shapes_only: Run that check on fake tensors (shapes only, no arithmetic): for a quick yes/no, as
            :func:`atrous_strides` needs.

    Returns:
        A ``torch.fx.GraphModule`` with the original state-dict keys, in ``model``'s train/eval mode. Its outputs
        are ``Π R`` times finer than the model's, except where the model resizes to a size it reads from its input.

    Raises:
        ArgumentError: unknown sites, or a set that leaves a later site strided.
        ModelError: an op after a site with no dilated form (named), a module called both before and after a site,
            or a map that no longer fits the one it meets (named, e.g. a skip connection on the coarse grid).

    Shape:
        - input: ``(N, C, H, W)``
        - output: as the model's, with every map after the sites ``(R_h h, R_w w)`` for ``(h, w)``.
    """
    from polyglean.phase.net import PhaseNet

    copied = copy.deepcopy(model).eval()
    net = PhaseNet(copied, input_size=input_size)
    if not net.sites:
        raise ModelError(f"{type(model).__name__} has no subsampling site whose stride could be removed")
    p = plan(net, sites, for_atrous=True)
    chosen = {s.index: s for s in p.sites}
    gm = net.discovery.graph_module
    ops = net.discovery.ops
    deps = _graph_deps(net, set(chosen))

    def factor_before(n: fx.Node) -> tuple[int, int]:
        upstream = deps[n] - ({ops[n][1]} if n in ops else set())
        return (math.prod(chosen[i].factor[0] for i in upstream), math.prod(chosen[i].factor[1] for i in upstream))

    users: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            users.setdefault(str(n.target), []).append(n)
    for target, nodes in users.items():
        after = [bool(deps[n]) for n in nodes]
        if not any(after):
            continue
        module = gm.get_submodule(target)
        if not all(after) and _spatial(module):
            raise ModelError(f"cannot build the à trous network: layer '{target}' is called both before and after "
                             f"the sites {[s.name for s in p.sites]}, so it cannot be dilated for one call only")
        site_call = [n for n in nodes if n in ops and ops[n][1] in chosen]
        ry, rx = factor_before(nodes[0])
        if _spatial(module) and any(factor_before(n) != (ry, rx) for n in nodes):
            raise ModelError(f"cannot build the à trous network: layer '{target}' is called on maps of different "
                             "strides")
        if site_call:
            if not isinstance(module, (*_DILATABLE, nn.AvgPool2d)):
                raise ModelError(f"cannot build the à trous network: the site op '{target}' "
                                 f"({type(module).__name__}) is not a conv or pooling module that can run at stride 1")
            if isinstance(module, nn.AvgPool2d) and (ry, rx) != (1, 1):
                raise ModelError(f"cannot build the à trous network: average pool '{target}' would need a dilation "
                                 "(it lies after another of the sites), which nn.AvgPool2d has not")
            module.stride = (1, 1) if isinstance(module, nn.Conv2d) else 1
        if (ry, rx) == (1, 1) or not _spatial(module):
            continue
        why = _no_dilated_form(module)
        if why:
            raise ModelError(
                f"cannot build the à trous network from site '{p.sites[0].name}': layer '{target}' "
                f"({type(module).__name__}) after it {why}. Hint: stitch or rewrite a model truncated before it.")
        _dilate(module, (ry, rx))
    for n in gm.graph.nodes:
        if n.op != "call_function" or not deps[n] or n in ops:
            continue
        try:
            spatial, resize = n.target in _SPATIAL_FUNCTIONS, n.target in _RESIZE_FUNCTIONS
        except TypeError:
            continue
        name = getattr(n.target, "__name__", str(n.target))
        if spatial:
            raise ModelError(f"cannot build the à trous network: functional '{name}' at node '{n.name}' after site "
                             f"'{p.sites[0].name}' cannot be dilated by module surgery")
        if resize and n.kwargs.get("size") is None and (len(n.args) < 2 or n.args[1] is None):
            raise ModelError(
                f"cannot build the à trous network: '{name}' at node '{n.name}' after site '{p.sites[0].name}' "
                "resizes by a fixed factor, which would leave the finer map finer than the model's output")
    gm.recompile()
    _check_shapes(gm, net.input_size, next(copied.parameters(), None), p.sites[0].name, fake=shapes_only)
    gm.train(model.training)
    return gm


def _spatial(module: nn.Module) -> bool:
    """Whether ``module`` mixes neighbouring cells (a kernel larger than 1x1, or an upsampling)."""
    if isinstance(module, (nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle, nn.ConvTranspose1d, nn.ConvTranspose2d,
                           nn.ConvTranspose3d, nn.Fold, nn.Unfold)):
        return True
    kernel = getattr(module, "kernel_size", None)
    if kernel is None:
        return not (type(module).__module__.startswith("torch.nn")
                    or isinstance(module, nn.modules.batchnorm._BatchNorm))
    return _pair(kernel) != (1, 1) or _pair(getattr(module, "stride", 1)) != (1, 1)


def _no_dilated_form(module: nn.Module) -> str:
    """Why ``module`` cannot run on the finer map as the à trous network needs ('' when it can)."""
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return (f"upsamples by its stride {module.stride} to a grid fixed by the coarse map: on the finer map its "
                "output would be finer than the layers it meets")
    if isinstance(module, (nn.Upsample, nn.PixelShuffle)):
        return "upsamples by a fixed factor, which would leave the finer map finer than the model's output"
    if isinstance(module, _DILATABLE):
        if _pair(module.stride) != (1, 1):
            return f"is strided {module.stride} but not a site"
        return ""
    if isinstance(module, (nn.AvgPool2d, nn.LPPool2d)):
        return "is an average pool, which has no dilated form"
    if getattr(module, "kernel_size", None) is None:
        return "is an opaque module whose spatial extent cannot be dilated"
    return "has no dilated form"


def _dilate(module: nn.Module, factor: tuple[int, int]) -> None:
    """Dilates a conv or max pool by ``factor`` and scales its explicit padding alike."""
    ry, rx = factor
    dh, dw = _pair(module.dilation)
    module.dilation = (dh * ry, dw * rx)
    if not isinstance(getattr(module, "padding", 0), str):
        ph, pw = _pair(module.padding)
        module.padding = (ph * ry, pw * rx)
    if isinstance(module, nn.MaxPool2d):
        module.kernel_size, module.stride = _pair(module.kernel_size), _pair(module.stride)


class _Shapes(fx.Interpreter):
    """Runs the rewritten graph node by node, naming the node where the finer map stops fitting."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            return super().run_node(n)
        except (RuntimeError, ValueError) as err:
            first = str(err).splitlines()[0]
            raise ModelError(f"cannot build the à trous network: at node '{n.name}' the finer map no longer fits "
                             f"({first}); e.g. a skip connection that stayed on the coarse grid") from None


def _check_shapes(gm: fx.GraphModule, input_size: tuple[int, ...], ref: Tensor | None, first: str, *,
                  fake: bool = False) -> None:
    x = torch.zeros(1, *input_size, device=ref.device if ref is not None else None,
                    dtype=ref.dtype if ref is not None and ref.is_floating_point() else None)
    with torch.no_grad():
        if fake:
            from torch._subclasses.fake_tensor import FakeTensorMode

            log = logging.getLogger("torch._subclasses.fake_tensor")  # it logs every failed shape rule at ERROR
            level = log.level
            log.setLevel(logging.CRITICAL)
            try:
                with FakeTensorMode(allow_non_fake_inputs=True):
                    out = _Shapes(gm).run(x)
            finally:
                log.setLevel(level)
        else:
            out = _Shapes(gm).run(x)
    if not any(isinstance(t, Tensor) for t in _leaves(out)):
        raise ArgumentError(f"the à trous network from site '{first}' returns no tensor")


def atrous_strides(model: nn.Module, net: Any) -> list[tuple[int, int] | None]:
    """Per site of ``net`` (a :class:`~polyglean.phase.net.PhaseNet` of ``model``), the output stride of the à trous
    network built from it (it and every later site), or ``None`` where :func:`atrous` refuses that network."""
    from polyglean.phase.stitch import _below

    strides: list[tuple[int, int] | None] = []
    below = _below(net)
    for s in net.sites:
        try:
            atrous(model, [s.name] + [t.name for t in net.sites if s.index in below[t.index]],
                   input_size=net.input_size, shapes_only=True)
        except (ArgumentError, ModelError):
            strides.append(None)
            continue
        # every later site's stride is removed too: the maps after the site stay at the stride of its input
        strides.append((s.reduction[0] // s.factor[0], s.reduction[1] // s.factor[1]))
    return strides
