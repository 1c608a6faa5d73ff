"""Independent references for the exactness contract: each op run at stride 1, on its input extended at the
bottom/right with the op's pad value, then sliced at ``[dy::R_h, dx::R_w]`` to the default output size.

Written separately from ``polyglean.phase.functional`` (convolutions by stride-1 ``F.conv2d``, average pooling by
stride-1 depthwise summing convolutions, "SAME" padding by timm's own ``pad_same``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _extend(x: Tensor, rows: int, cols: int, value: float) -> Tensor:
    return F.pad(x, (0, cols, 0, rows), value=value)


def _take(y: Tensor, phase: tuple[int, int], factor: tuple[int, int], out_hw: tuple[int, int]) -> Tensor:
    dy, dx = phase
    out = y[..., dy::factor[0], dx::factor[1]][..., : out_hw[0], : out_hw[1]]
    assert tuple(out.shape[-2:]) == tuple(out_hw), (out.shape, out_hw)
    return out


def conv2d_ref(x: Tensor, weight: Tensor, bias: Tensor | None, stride: Any, padding: Any, dilation: Any,
               groups: int, phase: tuple[int, int], padding_mode: str = "zeros",
               pads: tuple[int, int, int, int] | None = None) -> Tensor:
    s, d = pair(stride), pair(dilation)
    if pads is None:
        ph, pw = pair(padding)
        pads = (pw, pw, ph, ph)
    mode = "constant" if padding_mode == "zeros" else padding_mode
    xp = F.pad(x, pads, mode=mode) if any(pads) else x
    default = F.conv2d(xp, weight, bias, s, 0, d, groups)
    big = _extend(xp, 2 * s[0] + weight.shape[-2] * d[0], 2 * s[1] + weight.shape[-1] * d[1], 0.0)
    return _take(F.conv2d(big, weight, bias, 1, 0, d, groups), phase, s, tuple(default.shape[-2:]))


def max_pool2d_ref(x: Tensor, kernel: Any, stride: Any, padding: Any, dilation: Any, ceil_mode: bool,
                   phase: tuple[int, int], pads: tuple[int, int, int, int] | None = None) -> Tensor:
    k, s, d = pair(kernel), pair(stride), pair(dilation)
    if pads is None:
        ph, pw = pair(padding)
        default = F.max_pool2d(x, k, s, (ph, pw), d, ceil_mode)
        pads = (pw, pw, ph, ph)
    else:
        default = F.max_pool2d(F.pad(x, pads, value=float("-inf")), k, s, 0, d, ceil_mode)
    xp = F.pad(x, pads, value=float("-inf"))
    big = _extend(xp, 2 * s[0] + k[0] * d[0], 2 * s[1] + k[1] * d[1], float("-inf"))
    return _take(F.max_pool2d(big, k, 1, 0, d), phase, s, tuple(default.shape[-2:]))


def avg_pool2d_ref(x: Tensor, kernel: Any, stride: Any, padding: Any, ceil_mode: bool, count_include_pad: bool,
                   divisor_override: int | None, phase: tuple[int, int]) -> Tensor:
    """Sums and counts by stride-1 depthwise convolutions with a ones kernel; PyTorch's divisor rule."""
    k, s, p = pair(kernel), pair(stride), pair(padding)
    default = F.avg_pool2d(x, k, s, p, ceil_mode, count_include_pad, divisor_override)
    c = x.shape[-3]
    ones_k = x.new_ones((c, 1, *k))
    rows, cols = 2 * s[0] + k[0], 2 * s[1] + k[1]
    xp = _extend(F.pad(x, (p[1], p[1], p[0], p[0])), rows, cols, 0.0)
    sums = F.conv2d(xp, ones_k, None, 1, 0, 1, c)
    if divisor_override:
        counts = torch.full_like(sums, float(divisor_override))
    else:
        mask = x.new_ones(x.shape)
        mask = F.pad(mask, (p[1], p[1], p[0], p[0]), value=1.0 if count_include_pad else 0.0)
        counts = F.conv2d(_extend(mask, rows, cols, 0.0), ones_k, None, 1, 0, 1, c).clamp_min(1.0)
    return _take(sums / counts, phase, s, tuple(default.shape[-2:]))


def slice_ref(x: Tensor, dims: tuple[int, ...], starts: tuple[int, ...], steps: tuple[int, ...],
              stops: tuple[int | None, ...], phase: tuple[int, ...]) -> Tensor:
    """``x`` restricted to ``[start, stop)`` on each sliced dim (the stride-1 op), zero-extended, sliced."""
    out = x
    for dim, start, step, stop, d in zip(dims, starts, steps, stops, phase):
        size = out.shape[dim]
        lo, hi, _ = slice(start, stop, step).indices(size)
        want = len(range(lo, hi, step))
        region = out.narrow(dim, lo, max(hi - lo, 0))
        ext_shape = list(region.shape)
        ext_shape[dim] = 2 * step
        region = torch.cat([region, region.new_zeros(ext_shape)], dim)
        idx = torch.arange(want) * step + d
        out = region.index_select(dim, idx)
    return out


def _same_pads(x: Tensor, kernel: Any, stride: Any, dilation: Any) -> tuple[int, int, int, int]:
    from timm.layers.padding import get_same_padding

    k, s, d = pair(kernel), pair(stride), pair(dilation)
    ph = get_same_padding(x.shape[-2], k[0], s[0], d[0])
    pw = get_same_padding(x.shape[-1], k[1], s[1], d[1])
    return (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)


def _bind(names: tuple[str, ...], defaults: dict[str, Any], args: tuple, kwargs: dict) -> dict[str, Any]:
    out = dict(defaults)
    out.update(zip(names, args))
    out.update(kwargs)
    return out


def op_reference(op: Any, phase: tuple[int, int], args: tuple, kwargs: dict) -> Tensor:
    """One subsampling node of a traced model, at ``phase``, by the stride-1 op sliced."""
    x = args[0]
    module = getattr(op, "module", None)
    if op.kind == "conv" and module is not None:
        m = module
        return conv2d_ref(x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups, phase, m.padding_mode)
    if op.kind == "conv":
        a = _bind(("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
                  dict(bias=None, stride=1, padding=0, dilation=1, groups=1), args, kwargs)
        return conv2d_ref(x, a["weight"], a["bias"], a["stride"], a["padding"], a["dilation"], a["groups"], phase)
    if op.kind == "conv_same":
        m = module
        pads = _same_pads(x, m.weight.shape[-2:], m.stride, m.dilation)
        return conv2d_ref(x, m.weight, m.bias, m.stride, 0, m.dilation, m.groups, phase, pads=pads)
    if op.kind == "max_pool":
        if module is not None:
            m = module
            return max_pool2d_ref(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, phase)
        a = _bind(("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode"),
                  dict(stride=None, padding=0, dilation=1, ceil_mode=False), args, kwargs)
        return max_pool2d_ref(x, a["kernel_size"], a["stride"] or a["kernel_size"], a["padding"], a["dilation"],
                              a["ceil_mode"], phase)
    if op.kind == "max_pool_same":
        m = module
        pads = _same_pads(x, m.kernel_size, m.stride, m.dilation)
        return max_pool2d_ref(x, m.kernel_size, m.stride, 0, m.dilation, m.ceil_mode, phase, pads=pads)
    if op.kind == "avg_pool":
        if module is not None:
            m = module
            return avg_pool2d_ref(x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                                  m.divisor_override, phase)
        a = _bind(("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                   "divisor_override"), dict(stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                                             divisor_override=None), args, kwargs)
        return avg_pool2d_ref(x, a["kernel_size"], a["stride"] or a["kernel_size"], a["padding"], a["ceil_mode"],
                              a["count_include_pad"], a["divisor_override"], phase)
    if op.kind == "avg_pool_same":
        m = module
        pads = _same_pads(x, m.kernel_size, m.stride, 1)
        return avg_pool2d_ref(F.pad(x, pads), m.kernel_size, m.stride, 0, m.ceil_mode, m.count_include_pad, None,
                              phase)
    if op.kind == "std_conv_same":
        m = module
        w = m.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        w = (w - mean) / torch.sqrt(var + m.eps)
        if getattr(m, "gain", None) is not None:
            w = w * (m.gain * m.scale).view(-1, 1, 1, 1)
        pads = _same_pads(x, w.shape[-2:], m.stride, m.dilation) if m.same_pad else None
        padding = 0 if m.same_pad else m.padding
        return conv2d_ref(x, w, m.bias, m.stride, padding, m.dilation, m.groups, phase, pads=pads)
    if op.kind == "slice":
        index = list(args[1])
        assert None not in index, index
        if Ellipsis in index:
            at = index.index(Ellipsis)
            index[at:at + 1] = [slice(None)] * (x.dim() - len(index) + 1)
        index = tuple(index + [slice(None)] * (x.dim() - len(index)))
        strided = [(d, sl) for d, sl in enumerate(index) if isinstance(sl, slice) and (sl.step or 1) > 1]
        dims = tuple(d for d, _ in strided)
        plain = tuple(slice(None) if d in dims else sl for d, sl in enumerate(index))
        assert all(sl == slice(None) for sl in plain), "reference handles strided slices only"
        return slice_ref(x, dims, tuple(sl.start or 0 for _, sl in strided), tuple(sl.step for _, sl in strided),
                         tuple(sl.stop for _, sl in strided), phase[: len(dims)])
    if op.kind == "patch_merge":
        return patch_merge_ref(module, x, phase)
    raise NotImplementedError(op.kind)


def patch_merge_ref(module: Any, x: Tensor, phase: tuple[int, int]) -> Tensor:
    """Swin patch merging at stride 1 (every 2x2 neighbourhood, zero past the input), sliced at the phase."""
    n, h, w, c = x.shape
    out_h, out_w = -(-h // 2), -(-w // 2)
    ext = F.pad(x, (0, 0, 0, 3, 0, 3))
    quads = [ext[:, dy:dy + h + 2, dx:dx + w + 2] for dy, dx in ((0, 0), (1, 0), (0, 1), (1, 1))]
    merged = module.reduction(module.norm(torch.cat(quads, -1)))
    dy, dx = phase
    return merged[:, dy::2, dx::2][:, :out_h, :out_w]


def reference_forward(net: Any, x: Tensor, phases: dict[int, tuple[int, int]], noise: float = 0.0,
                      seed: int = 0) -> Any:
    """The model at ``phases`` (site index -> phase) by an fx Interpreter over the traced graph, replacing each
    subsampling node of a non-default site by its stride-1 reference; independent of PhaseNet's segments.

    With ``noise > 0``, the output of every subsampling node of the sites in ``phases`` is perturbed by
    ``noise * max|output| * N(0, 1)`` (seeded): run with ``noise`` one machine epsilon, the difference to the
    unperturbed run is the rounding floor of the model behind those sites, what a rounding-level difference at the
    site becomes at the output.
    """
    from torch import fx

    found = net.discovery

    perturbed: list[str] = []  # the nodes perturbed so far: each draws from its own seed

    class _Runner(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            if n in found.ops:
                op, site = found.ops[n]
                phase = phases.get(site, (0, 0))
                if phase != (0, 0):
                    args, kwargs = self.fetch_args_kwargs_from_env(n)
                    out = op_reference(op, phase, args, kwargs)
                else:
                    out = super().run_node(n)
                if noise and site in phases:
                    g = torch.Generator(device=out.device).manual_seed(seed + len(perturbed))
                    perturbed.append(n.name)
                    out = out + noise * out.abs().max() * torch.randn(out.shape, generator=g, device=out.device,
                                                                      dtype=out.dtype)
                return out
            return super().run_node(n)

    with torch.no_grad():
        return _Runner(found.graph_module).run(x)
