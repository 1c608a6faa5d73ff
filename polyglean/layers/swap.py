"""Layer surgery: replace a model's subsampling ops by BlurPool, SoftPool, adaPool, PASA or APS.

:func:`swap` finds the subsampling sites with the same discovery as ``PhaseNet`` (:func:`polyglean.sites.discover`)
and rewrites every *module* op of every site by the rule registered for the layer (:data:`SWAP_RULES`; each rule
lives in its layer's module, see :mod:`polyglean.layers.rules`):

``blurpool`` (Zhang 2019)
    ``MaxPool(k, s)`` -> ``MaxPool(k, 1) + BlurPool(s)``; ``AvgPool(s, s)`` -> ``BlurPool(s)`` (else
    ``AvgPool(k, 1) + BlurPool(s)`` when the sizes would differ); a 1x1 unpadded strided conv (a shortcut) ->
    ``BlurPool(s) + Conv(1)`` as in antialiased-cnns; any other strided conv -> ``Conv(1)``, and the blur goes
    after the ReLU when the fx graph shows ``conv -> [BatchNorm] -> ReLU`` with single users and a ReLU module
    called only there (Zhang's ``Conv + ReLU -> Conv(1) + ReLU + BlurPool``); otherwise (e.g. the ReLU module is
    shared by two calls, as in torchvision's ``BasicBlock``) the blur goes right after the conv, before BN/ReLU:
    the only place module surgery can put it without changing what the shared module computes elsewhere.
    ``recipe="zhang"`` builds antialiased-cnns' layout instead (blur after the ReLU, as the first child of the next
    conv where the ReLU is shared; ``MaxPool(2, 1) + BlurPool(s)``; ``pool_only``), see
    :mod:`polyglean.layers.blurpool`.
``softpool`` / ``adapool``
    strided ``MaxPool``/``AvgPool`` -> ``SoftPool2d``/``AdaPool2d`` with the same kernel, stride, padding and
    ``ceil_mode``. Strided convs are left as they are (the papers replace pooling layers only), unless
    ``convs=True`` is given: then ``Conv(s)`` -> ``Conv(1) + SoftPool2d(s, s)`` (``AdaPool2d``), for models that
    subsample with strided convs only, such as the CIFAR ResNets (an extension of ours, not the papers' rule).
``pasa`` (Zou et al. 2020)
    a strided "same" conv (``2 * padding == dilation * (kernel - 1)``) -> ``PASA2d(C_in, s) + Conv(1)`` (the
    adaptive low-pass before subsampling); other strided convs -> ``Conv(1) + PASA2d(C_out, s)``, which keeps the
    output size; ``MaxPool``/``AvgPool(s)`` -> ``Pool(stride 1) + PASA2d(s)``.
``aps`` (Chaman & Dokmanic 2021)
    a single-op site: ``Conv(s)``/``Pool(s)`` -> ``Conv(1)``/``Pool(1)`` + ``APS2d(s)``. A site of several ops
    (a residual block's strided conv and its shortcut, which meet at an add) is a *graph* rewrite (a site rule,
    :data:`SITE_RULES`): every op runs at stride 1, an :class:`APSIndex2d` picks the max-norm component of the
    first op's (the main branch's) stride-1 map per sample, and that index is an explicit input of one
    ``APS2d(s)(y, index=...)`` after every op, shortcut included. The chosen phase reaches the shortcut by a data
    edge, so no execution order can break it and nothing is stored between calls. Strided slices
    (``x[:, :, ::2, ::2]``, CIFAR "option A") become unstrided slices followed by the gather. Then the result is
    the rewritten ``torch.fx.GraphModule`` (traced in eval mode: branches on ``self.training`` are fixed to eval),
    with the new modules at ``<block>.aps_index`` and ``<block>.<op path with "_" for ".">_aps``; it holds no
    parameter of its own, so the state-dict keys are unchanged.

A replaced module that keeps weights sits inside a :class:`SwapSequential`, so its state-dict keys gain the
child's index (``layer2.0.conv1.weight`` -> ``layer2.0.conv1.0.weight``); :func:`swap_key_map` gives the renames,
and with them the original checkpoint loads strictly into a blurpool-swapped model (BlurPool's filter is a
non-persistent buffer). Every other key is unchanged.

Functional ops (``F.max_pool2d`` in ``forward``, CIFAR "option A" slices ``x[:, :, ::2, ::2]``) are not modules and
stay as they are, except under a site rule (APS); :func:`swap` logs a warning naming each. The input model is never
modified.

Example:
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    >>> aa = swap(model, "blurpool", input_size=(3, 32, 32), filter_size=3)
    >>> aa[0].stride, aa[2]  # Conv(s) + BN + ReLU -> Conv(1) + BN + ReLU + BlurPool(s)
    ((1, 1), SwapSequential(
      kept=0
      (0): ReLU()
      (1): BlurPool2d(channels=8, filter_size=3, stride=(2, 2), pad_type='reflect')
    ))
    >>> key_map = swap_key_map(aa)  # no kept weight moved here: the conv keeps its place
    >>> aa.load_state_dict({key_map.get(k, k): v for k, v in model.state_dict().items()})
    <All keys matched successfully>
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn

from polyglean.layers._registry import (
    MODEL_RULES,
    SITE_RULES,
    SWAP_RULES,
    list_layers,
    register_site_rule,
    register_swap_rule,
)
from polyglean.layers.rules import (
    Rewrite,
    SiteSwapContext,
    SwapContext,
    SwapSequential,
    set_submodule,
)
from polyglean.errors import ArgumentError
from polyglean.sites import discover
from polyglean.sites.ops import ModulePhaseOp, PhaseOp

__all__ = ["MODEL_RULES", "SITE_RULES", "SWAP_RULES", "SwapSequential", "register_site_rule", "register_swap_rule", "swap",
           "swap_key_map"]

logger = logging.getLogger(__name__)


def _output_shapes(model: nn.Module, paths: Sequence[str], example: Tensor) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []

    def hook(path: str) -> Callable[..., None]:
        def record(_module: nn.Module, _args: Any, out: Any) -> None:
            if isinstance(out, Tensor):
                shapes[path] = tuple(out.shape)

        return record

    try:
        for path in paths:
            handles.append(model.get_submodule(path).register_forward_hook(hook(path)))
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def swap(model: nn.Module, layer: str, *, input_size: Sequence[int] = (3, 224, 224), **layer_kwargs: Any
         ) -> nn.Module:
    """A copy of ``model`` whose subsampling modules are replaced by ``layer``, by the rules of this module.

    Args:
        model: Any image model that ``polyglean.sites.discover`` can trace; it is not modified.
        layer: A name with a swap rule: ``"blurpool"``, ``"softpool"``, ``"adapool"``, ``"pasa"``, ``"aps"`` or one
            registered with :func:`polyglean.layers.register_layer`.
        input_size: ``(C, H, W)`` of one input image, for discovery and the size checks.
        **layer_kwargs: Passed to every new layer, e.g. ``filter_size=5`` (BlurPool), ``groups=4`` (PASA),
            ``beta_init=0.3`` or ``similarity="vector"`` (adaPool), ``p=1`` (APS); ``convs=True`` (SoftPool,
            adaPool) also rewrites strided convs; ``recipe="zhang"`` and ``pool_only`` choose BlurPool's recipe
            (see the module docstring).

    Returns:
        The rewritten deep copy, in the train/eval mode of ``model``; a ``torch.fx.GraphModule`` when a site rule
        rewrote the graph (``"aps"`` on a model with residual downsampling blocks). Keys of kept weights move as
        :func:`swap_key_map` says; all others are unchanged.

    Raises:
        ValueError: If ``layer`` is unknown (the message lists the known names), the model has no subsampling
            site, or a rewrite would change the size of an op's output.
        NotImplementedError: For ``"aps"`` at a site of several ops one of which has no stride-1 rewrite (a
            functional pooling call, a timm "SAME" op; named in the message).
    """
    if layer in MODEL_RULES:
        return MODEL_RULES[layer](model, input_size=input_size, **layer_kwargs)
    if layer not in SWAP_RULES:
        known = ", ".join(repr(n) for n in list_layers() if n in SWAP_RULES or n in MODEL_RULES)
        raise ArgumentError(f"unknown layer {layer!r} for swap; known layers: {known}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    rule = SWAP_RULES[layer]
    swapped = copy.deepcopy(model)
    found = discover(swapped, input_size)
    if not found.sites:
        raise ValueError(
            f"{type(model).__name__} has no subsampling site for input size {tuple(input_size)} (no strided conv, "
            f"pooling or slicing was found); there is nothing to swap to {layer!r}"
        )
    rewrites: list[tuple[str, Rewrite]] = []
    expected: dict[str, tuple[int, ...]] = {}
    gm = found.graph_module
    out_shapes = {str(n.target): found.info[n].shape for n in gm.graph.nodes
                  if n.op == "call_module" and n in found.info}
    site_rule = SITE_RULES.get(layer) if layer in SITE_RULES else None
    by_site: dict[int, list[tuple[fx.Node, PhaseOp]]] = {}
    for node, (op, index) in found.ops.items():
        by_site.setdefault(index, []).append((node, op))
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    rewritten = False
    for index, members in by_site.items():
        if site_rule is None or len(members) < 2:
            continue
        members.sort(key=lambda member: position[member[0]])
        nodes, ops = zip(*members)
        ctx = SiteSwapContext(found.sites[index], nodes, ops, gm,
                              {op.name: tuple(found.info[n].input_shape or ()) for n, op in members},
                              {op.name: tuple(found.info[n].shape or ()) for n, op in members}, dict(layer_kwargs))
        expected.update(site_rule(ctx))
        rewritten = True
    for node, (op, index) in found.ops.items():
        site = found.sites[index]
        if rewritten and site_rule is not None and len(by_site[index]) > 1:
            continue
        if not isinstance(op, ModulePhaseOp):
            logger.warning("swap(%r): op '%s' (%s) of site '%s' is not a module and stays as it is",
                           layer, op.name, op.kind, site.name)
            continue
        info = found.info[node]
        ctx = SwapContext(op, site, node, gm, tuple(info.input_shape or ()), tuple(info.shape or ()),
                          dict(layer_kwargs))
        rewrite = rule(ctx)
        if rewrite is None:
            logger.info("swap(%r): op '%s' (%s) of site '%s' stays as it is", layer, op.name, op.kind, site.name)
            continue
        rewrites.append((op.name, rewrite))
        expected[rewrite.checked] = out_shapes[rewrite.checked]
    if not rewrites and not rewritten:
        logger.warning("swap(%r): no op of %s is replaced by this rule; the copy is unchanged",
                       layer, type(model).__name__)
    if rewritten:  # the rewritten graph is the model now; its modules are the copy's own
        gm.graph.lint()
        gm.recompile()
        swapped = gm
    ref = next(swapped.parameters(), None)
    for _, rewrite in rewrites:
        for path, module in rewrite.modules.items():
            if ref is not None:
                module.to(device=ref.device, dtype=ref.dtype)
            set_submodule(swapped, path, module)
    swapped.train(model.training)
    _check_sizes(swapped, layer, expected, input_size)
    return swapped


def _check_sizes(swapped: nn.Module, layer: str, expected: dict[str, tuple[int, ...]], input_size: Sequence[int]
                 ) -> None:
    """Raises ``ValueError`` unless each checked path of the swapped model keeps its original output shape."""
    if not expected:
        return
    gen = torch.Generator().manual_seed(0)
    ref = next(swapped.parameters(), None)
    example = torch.randn(2, *input_size, generator=gen)
    if ref is not None:
        example = example.to(device=ref.device, dtype=ref.dtype)
    was_training = swapped.training
    swapped.eval()
    try:
        shapes = _output_shapes(swapped, list(expected), example)
    except RuntimeError as err:
        raise ValueError(f"the model swapped to {layer!r} no longer runs on input size {tuple(input_size)}: {err}"
                         ) from err
    finally:
        swapped.train(was_training)
    for path, shape in expected.items():
        if shapes.get(path) != shape:
            raise ValueError(
                f"swapping '{path}' to {layer!r} changes its output from {shape} to {shapes.get(path)} for input "
                f"size {tuple(input_size)}; this op's padding/ceil_mode has no size-preserving rewrite"
            )


def swap_key_map(swapped: nn.Module) -> dict[str, str]:
    """Renames of state-dict keys made by :func:`swap`: original key -> key in ``swapped``.

    Each :class:`SwapSequential` that holds the original module as child ``kept`` moves that module's keys from
    ``path.name`` to ``path.kept.name``; keys not in the map are unchanged.

    Example:
        >>> original = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1))  # no ReLU: the blur follows the conv
        >>> swapped = swap(original, "blurpool", input_size=(3, 16, 16))
        >>> key_map = swap_key_map(swapped)
        >>> key_map
        {'0.weight': '0.0.weight', '0.bias': '0.0.bias'}
        >>> swapped.load_state_dict({key_map.get(k, k): v for k, v in original.state_dict().items()})
        <All keys matched successfully>
    """
    key_map: dict[str, str] = {}
    for path, module in swapped.named_modules():
        if isinstance(module, SwapSequential) and module.kept is not None:
            prefix = f"{path}." if path else ""
            for key in module[module.kept].state_dict():
                key_map[f"{prefix}{key}"] = f"{prefix}{module.kept}.{key}"
    return key_map
