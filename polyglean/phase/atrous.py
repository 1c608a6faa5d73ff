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
to the same size. A transposed conv whose kernel equals its stride (a decoder's upsampling, as ESPNet's) takes the
factor back: each cell gets its own sub-kernel (:class:`SubKernelUpsample`), and what follows runs on a map that
much less fine. A resize by a fixed factor, a transposed conv with overlapping cells, an average pool or a
functional conv after a site has no dilated form and is refused by name.

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

__all__ = ["SubKernelUpsample", "atrous", "atrous_strides"]

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
    factor = _factors(gm, ops, chosen)  # per node: how much finer than the trained model's its output map is

    def factor_in(n: fx.Node) -> tuple[int, int]:
        return _max_factor(factor[a] for a in n.all_input_nodes)

    users: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            users.setdefault(str(n.target), []).append(n)
    for target, nodes in users.items():
        if not any(deps[n] for n in nodes):
            continue
        module = gm.get_submodule(target)
        site_call = [n for n in nodes if n in ops and ops[n][1] in chosen]
        ry, rx = factor_in(nodes[0])
        if _spatial(module) and any(factor_in(n) != (ry, rx) for n in nodes):
            raise ModelError(f"cannot build the à trous network: layer '{target}' is called on maps of different "
                             f"strides (e.g. both before and after the sites {[s.name for s in p.sites]}), so it "
                             "cannot be dilated for one call only")
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
        if _takes_factor(module, (ry, rx)):
            parent, _, leaf = target.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, leaf, SubKernelUpsample(module, (ry, rx)))
            continue
        why = _no_dilated_form(module, (ry, rx))
        if why:
            raise ModelError(
                f"cannot build the à trous network from site '{p.sites[0].name}': layer '{target}' "
                f"({type(module).__name__}) after it {why}. Hint: stitch or rewrite a model truncated before it.")
        _dilate(module, (ry, rx))
    for n in gm.graph.nodes:
        if n.op != "call_function" or n in ops or factor_in(n) == (1, 1):
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
    outputs = [a for a in gm.graph.nodes if a.op == "output"]
    gm.output_factor = _max_factor(factor[a] for a in outputs[0].all_input_nodes) if outputs else (1, 1)
    gm.recompile()
    _check_shapes(gm, net.input_size, next(copied.parameters(), None), p.sites[0].name, fake=shapes_only)
    gm.train(model.training)
    return gm


def _max_factor(factors: Any) -> tuple[int, int]:
    fs = list(factors)
    return (max((f[0] for f in fs), default=1), max((f[1] for f in fs), default=1))


def _factors(gm: fx.GraphModule, ops: dict, chosen: dict[int, Site]) -> dict[fx.Node, tuple[int, int]]:
    """Per node, how many times finer than in the trained model its output map is in the à trous network: a chosen
    site's op multiplies the factor of its input by the site's factor, a transposed conv that
    :func:`_takes_factor` divides it by its stride, every other op keeps the largest factor of its inputs."""
    factor: dict[fx.Node, tuple[int, int]] = {}
    for n in gm.graph.nodes:
        f = _max_factor(factor[a] for a in n.all_input_nodes)
        if n in ops and ops[n][1] in chosen:
            site = chosen[ops[n][1]]
            f = (f[0] * site.factor[0], f[1] * site.factor[1])
        elif n.op == "call_module" and f != (1, 1):
            module = gm.get_submodule(str(n.target))
            if _takes_factor(module, f):
                f = (f[0] // module.stride[0], f[1] // module.stride[1])
        factor[n] = f
    return factor


def _takes_factor(module: nn.Module, factor: tuple[int, int]) -> bool:
    """Whether ``module`` is a transposed conv that upsamples by exactly its stride (kernel = stride, no padding)
    from a map at least that much finer: on the finer map it becomes :class:`SubKernelUpsample`."""
    if type(module) is not nn.ConvTranspose2d:
        return False
    s, k = _pair(module.stride), _pair(module.kernel_size)
    return (s == k and _pair(module.padding) == (0, 0) and _pair(module.output_padding) == (0, 0)
            and _pair(module.dilation) == (1, 1) and s != (1, 1) and factor[0] % s[0] == 0 and factor[1] % s[1] == 0)


class SubKernelUpsample(nn.Module):
    """A ``kernel = stride = s`` transposed conv of the trained model on a map ``r`` times finer (``r`` a multiple
    of ``s``): no upsampling, a 1x1 conv whose kernel is the sub-kernel of each cell's own position.

    The transposed conv gives output cell ``s i + a`` the value ``W[a] x[i]``: the coarse cell ``i``, which holds
    what the phase in use sampled. On the finer map a cell ``m`` holds the sample of the phase whose samples lie on
    ``m``, and in that phase's run the transposed conv wrote ``W[a] x`` at ``m`` with ``a = (m // (r / s)) mod s``.
    So this is the interleaving, on the transposed conv's output grid, of every phase's output at the cells its own
    samples cover; what follows runs on a map ``r / s`` times finer (not finer at all when ``r = s``).

    Args:
        deconv: The trained ``nn.ConvTranspose2d`` (kernel = stride, no padding); its ``weight`` and ``bias`` are
            kept under the same names.
        factor: How much finer than the trained model's the input map is.
    """

    def __init__(self, deconv: nn.ConvTranspose2d, factor: tuple[int, int]) -> None:
        super().__init__()
        self.weight, self.bias = deconv.weight, deconv.bias
        self.stride, self.groups = _pair(deconv.stride), deconv.groups
        self.step = (factor[0] // self.stride[0], factor[1] // self.stride[1])

    def forward(self, x: Tensor) -> Tensor:
        sh, sw = self.stride
        g = self.groups
        c_in, c_out_g = self.weight.shape[:2]
        # (C_in, C_out/g, sh, sw) -> one 1x1 conv per sub-position: (sh*sw*C_out, C_in/g, 1, 1), grouped alike
        w = self.weight.view(g, c_in // g, c_out_g, sh * sw).permute(3, 0, 2, 1)  # (sub, g, C_out/g, C_in/g)
        outs = [F.conv2d(x, w[k].reshape(g * c_out_g, c_in // g, 1, 1), self.bias, groups=g) for k in range(sh * sw)]
        h, wd = x.shape[-2:]
        a = (torch.arange(h, device=x.device) // self.step[0]) % sh
        b = (torch.arange(wd, device=x.device) // self.step[1]) % sw
        pos = (a[:, None] * sw + b[None, :])  # (H, W): the sub-kernel of each cell
        out = outs[0]
        for k in range(1, sh * sw):
            out = torch.where(pos == k, outs[k], out)
        return out


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


def _no_dilated_form(module: nn.Module, factor: tuple[int, int] = (1, 1)) -> str:
    """Why ``module`` cannot run on the finer map as the à trous network needs ('' when it can)."""
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return (f"upsamples by its stride {module.stride} (kernel {module.kernel_size}, padding {module.padding}) "
                f"from a map {factor[0]}x{factor[1]} times finer: only a 2-d transposed conv with kernel = stride, "
                "no padding, from a map finer by a multiple of its stride has an à trous form")
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
