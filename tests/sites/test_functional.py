"""Exactness of every phase function against the stride-1 op, sliced (REFERENCE.md §1), over random configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import polyglean.phase.functional as phase_functional
from polyglean.sites.conv import conv2d_phase
from polyglean.sites.geometry import same_padding, shift2d
from polyglean.sites.pool import avg_pool2d_phase, max_pool2d_phase
from polyglean.sites.slicing import slice_phase
from tests.reference import avg_pool2d_ref, conv2d_ref, max_pool2d_ref, slice_ref

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


@st.composite
def conv_configs(draw: st.DrawFn) -> dict:
    groups = draw(st.sampled_from([1, 2, 3]))
    cin = groups * draw(st.integers(1, 2))
    cout = groups * draw(st.integers(1, 2))
    k = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    d = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    s = (draw(st.sampled_from([2, 3, 4])), draw(st.sampled_from([2, 3, 4])))
    p = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    min_h, min_w = d[0] * (k[0] - 1) + 1 - 2 * p[0], d[1] * (k[1] - 1) + 1 - 2 * p[1]
    h = draw(st.integers(max(min_h, 1), 17))
    w = draw(st.integers(max(min_w, 1), 17))
    phase = (draw(st.integers(0, s[0] - 1)), draw(st.integers(0, s[1] - 1)))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    if mode != "zeros" and (p[0] >= h or p[1] >= w):
        mode = "zeros"
    return dict(groups=groups, cin=cin, cout=cout, k=k, d=d, s=s, p=p, h=h, w=w, phase=phase, mode=mode,
                bias=draw(st.booleans()), n=draw(st.integers(1, 2)), dtype=draw(st.sampled_from(list(TOL))))


class TestConv2dPhase:
    @SETTINGS
    @given(conv_configs())
    def test_matches_stride1_sliced(self, c: dict) -> None:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(c["n"], c["cin"], c["h"], c["w"], generator=g, dtype=c["dtype"])
        wt = torch.randn(c["cout"], c["cin"] // c["groups"], *c["k"], generator=g, dtype=c["dtype"])
        b = torch.randn(c["cout"], generator=g, dtype=c["dtype"]) if c["bias"] else None
        out = conv2d_phase(x, wt, b, c["s"], c["p"], c["d"], c["groups"], phase=c["phase"], padding_mode=c["mode"])
        ref = conv2d_ref(x, wt, b, c["s"], c["p"], c["d"], c["groups"], c["phase"], c["mode"])
        torch.testing.assert_close(out, ref, **TOL[c["dtype"]])

    @SETTINGS
    @given(conv_configs())
    def test_phase0_is_default(self, c: dict) -> None:
        conv = torch.nn.Conv2d(c["cin"], c["cout"], c["k"], c["s"], c["p"], c["d"], c["groups"], c["bias"],
                               padding_mode=c["mode"]).to(c["dtype"])
        x = torch.randn(c["n"], c["cin"], c["h"], c["w"], dtype=c["dtype"])
        out = conv2d_phase(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups,
                           phase=(0, 0), padding_mode=c["mode"])
        torch.testing.assert_close(out, conv(x), **TOL[c["dtype"]])

    @pytest.mark.parametrize("size", [7, 8, 15, 16])
    def test_asymmetric_same_padding(self, size: int) -> None:
        from timm.layers.padding import pad_same

        x, wt = torch.randn(1, 2, size, size + 1), torch.randn(3, 2, 3, 3)
        top, bottom = same_padding(size, 3, 2, 1)
        left, right = same_padding(size + 1, 3, 2, 1)
        assert torch.equal(pad_same(x, (3, 3), (2, 2)), F.pad(x, (left, right, top, bottom)))
        for phase in [(0, 0), (1, 0), (0, 1), (1, 1)]:
            out = conv2d_phase(x, wt, None, 2, phase=phase, explicit_padding=(left, right, top, bottom))
            ref = conv2d_ref(x, wt, None, 2, 0, 1, 1, phase, pads=(left, right, top, bottom))
            torch.testing.assert_close(out, ref)

    def test_bad_phase_raises(self) -> None:
        with pytest.raises(ValueError, match=r"phase \(2, 0\) out of range for factor \(2, 2\)"):
            conv2d_phase(torch.randn(1, 1, 8, 8), torch.randn(1, 1, 3, 3), stride=2, phase=(2, 0))

    def test_gradcheck(self) -> None:
        x = torch.randn(1, 2, 7, 6, dtype=torch.float64, requires_grad=True)
        wt = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a, b: conv2d_phase(a, b, None, 2, 1, phase=(1, 1)), (x, wt))

    def test_non_contiguous(self) -> None:
        x = torch.randn(1, 8, 9, 2).permute(0, 3, 1, 2)
        wt = torch.randn(3, 2, 3, 3)
        torch.testing.assert_close(conv2d_phase(x, wt, None, 2, 1, phase=(1, 0)),
                                   conv2d_ref(x.contiguous(), wt, None, 2, 1, 1, 1, (1, 0)))


@st.composite
def pool_configs(draw: st.DrawFn) -> dict:
    k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    s = (draw(st.sampled_from([2, 3, 4])), draw(st.sampled_from([2, 3, 4])))
    p = (draw(st.integers(0, k[0] // 2)), draw(st.integers(0, k[1] // 2)))
    d = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    h = draw(st.integers(max(d[0] * (k[0] - 1) + 1, k[0]), 16))
    w = draw(st.integers(max(d[1] * (k[1] - 1) + 1, k[1]), 16))
    return dict(k=k, s=s, p=p, d=d, h=h, w=w, ceil=draw(st.booleans()), cip=draw(st.booleans()),
                div=draw(st.sampled_from([None, None, 3])),
                phase=(draw(st.integers(0, s[0] - 1)), draw(st.integers(0, s[1] - 1))),
                dtype=draw(st.sampled_from(list(TOL))))


class TestMaxPool2dPhase:
    @SETTINGS
    @given(pool_configs())
    def test_matches_stride1_sliced(self, c: dict) -> None:
        x = torch.randn(2, 3, c["h"], c["w"], dtype=c["dtype"])
        out = max_pool2d_phase(x, c["k"], c["s"], c["p"], c["d"], c["ceil"], phase=c["phase"])
        ref = max_pool2d_ref(x, c["k"], c["s"], c["p"], c["d"], c["ceil"], c["phase"])
        torch.testing.assert_close(out, ref, **TOL[c["dtype"]])

    @SETTINGS
    @given(pool_configs())
    def test_phase0_is_default(self, c: dict) -> None:
        x = torch.randn(2, 3, c["h"], c["w"], dtype=c["dtype"])
        out = max_pool2d_phase(x, c["k"], c["s"], c["p"], c["d"], c["ceil"], phase=(0, 0))
        torch.testing.assert_close(out, F.max_pool2d(x, c["k"], c["s"], c["p"], c["d"], c["ceil"]))

    def test_three_dim_input(self) -> None:
        x = torch.randn(3, 9, 9)
        torch.testing.assert_close(max_pool2d_phase(x, 3, 2, 1, phase=(1, 1)),
                                   max_pool2d_phase(x[None], 3, 2, 1, phase=(1, 1))[0])


class TestAvgPool2dPhase:
    @SETTINGS
    @given(pool_configs())
    def test_matches_stride1_sliced(self, c: dict) -> None:
        x = torch.randn(2, 3, c["h"], c["w"], dtype=c["dtype"])
        out = avg_pool2d_phase(x, c["k"], c["s"], c["p"], c["ceil"], c["cip"], c["div"], phase=c["phase"])
        ref = avg_pool2d_ref(x, c["k"], c["s"], c["p"], c["ceil"], c["cip"], c["div"], c["phase"])
        torch.testing.assert_close(out, ref, **TOL[c["dtype"]])

    @SETTINGS
    @given(pool_configs())
    def test_phase0_is_default(self, c: dict) -> None:
        x = torch.randn(2, 3, c["h"], c["w"], dtype=c["dtype"])
        out = avg_pool2d_phase(x, c["k"], c["s"], c["p"], c["ceil"], c["cip"], c["div"], phase=(0, 0))
        ref = F.avg_pool2d(x, c["k"], c["s"], c["p"], c["ceil"], c["cip"], c["div"])
        torch.testing.assert_close(out, ref, **TOL[c["dtype"]])

    def test_gradcheck(self) -> None:
        x = torch.randn(1, 2, 7, 7, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a: avg_pool2d_phase(a, 3, 2, 1, True, False, phase=(1, 0)), (x,))


class TestSlicePhase:
    @SETTINGS
    @given(
        h=st.integers(1, 13), w=st.integers(1, 13), sh=st.sampled_from([2, 3, 4]), sw=st.sampled_from([2, 3, 4]),
        start=st.integers(0, 2), stop=st.sampled_from([None, -1, 9]), data=st.data(),
    )
    def test_matches_identity_sliced(self, h: int, w: int, sh: int, sw: int, start: int, stop: int | None,
                                     data: st.DataObject) -> None:
        x = torch.randn(2, 3, h, w)
        index = (slice(None), slice(None), slice(start, stop, sh), slice(None, None, sw))
        phase = (data.draw(st.integers(0, sh - 1)), data.draw(st.integers(0, sw - 1)))
        out = slice_phase(x, index, phase=phase)
        ref = slice_ref(x, (2, 3), (start, 0), (sh, sw), (stop, None), phase)
        assert out.shape == x[index].shape
        assert torch.equal(out, ref)

    def test_ellipsis_and_channels_last(self) -> None:
        x = torch.randn(2, 6, 6, 4)
        out = slice_phase(x, (Ellipsis, slice(1, None, 2), slice(0, None, 2), slice(None)), phase=(1, 1))
        assert out.shape == x[..., 1::2, 0::2, :].shape
        assert torch.equal(out[:, :2], x[:, 2::2, 1::2, :][:, :2])
        assert torch.equal(out[:, 2], torch.zeros_like(out[:, 2]))  # row 1 + 2*2 + 1 = 6 is past the input

    def test_phase0_is_default(self) -> None:
        x = torch.randn(1, 2, 9, 8)
        idx = (slice(None), slice(None), slice(None, None, 2), slice(None, None, 2))
        assert torch.equal(slice_phase(x, idx, phase=(0, 0)), x[idx])

    def test_bad_phase(self) -> None:
        with pytest.raises(ValueError, match="out of range"):
            slice_phase(torch.randn(1, 1, 4, 4), (Ellipsis, slice(None, None, 2), slice(None, None, 2)), phase=(0, 2))


def test_shift2d() -> None:
    x = torch.arange(12.0).reshape(1, 1, 3, 4)
    out = shift2d(x, (1, 2))
    assert torch.equal(out[0, 0], torch.tensor([[6.0, 7, 0, 0], [10, 11, 0, 0], [0, 0, 0, 0]]))
    assert torch.equal(shift2d(x, (0, 0)), x)


def test_phase_functional_reexports_the_op_kinds_functions() -> None:
    """One op at a phase lives in one place (its op-kind file); ``polyglean.phase.functional`` only re-exports."""
    assert phase_functional.conv2d_phase is conv2d_phase
    assert phase_functional.max_pool2d_phase is max_pool2d_phase
    assert phase_functional.avg_pool2d_phase is avg_pool2d_phase
    assert phase_functional.slice_phase is slice_phase
    assert phase_functional.shift2d is shift2d


def test_sites_never_import_phase() -> None:
    """The dependency is one-way: sites -> phase, never back (checked on the source, not the import cache)."""
    import pathlib

    import polyglean.sites

    root = pathlib.Path(polyglean.sites.__file__).parent
    offenders = [p.name for p in root.glob("*.py") if "polyglean.phase" in p.read_text()]
    assert offenders == []
