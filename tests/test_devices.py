"""Every tensor the library makes goes on its input's device; device and precision options; CUDA runs.

The CPU-side guard: the search, the aggregators and the metrics run on CPU inputs while torch's *default* device is
``meta``. A tensor created without an explicit device then lands on ``meta`` and the run fails (a meta tensor has
no values), so these tests fail for every CPU-only tensor that a CUDA run would trip over. The CUDA tests skip
without a GPU and run wherever one is present.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from polyglean import PhaseNet
from polyglean.aggregate import AttentionAggregator, alignment_factor
from polyglean.errors import ArgumentError
from polyglean.metrics import classification_metrics
from polyglean.runtime import Runtime, resolve_device, resolve_precision
from polyglean.search import PhaseSearch
from polyglean.tta.aggregators import TTA_AGGREGATORS
from tests.phase.test_net import lively

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def net() -> PhaseNet:
    torch.manual_seed(0)
    return PhaseNet(lively(torchvision.models.resnet18(num_classes=10)), input_size=(3, 64, 64))


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def learned_for(net: PhaseNet, search: PhaseSearch) -> AttentionAggregator:
    feats = search.run(torch.zeros(1, *net.input_size)).features
    factor = alignment_factor([s.factor for s in net.sites], search.search_space[0].index)
    module = AttentionAggregator(feats.shape[2], grid=factor, dim=16, heads=2)
    torch.nn.init.normal_(module.mlp[-1].weight, std=0.1)  # not plain averaging, so attention matters
    return module.eval()


def tensors(result) -> dict[str, torch.Tensor]:
    out = {k: getattr(result, k) for k in ("states", "scores", "shift", "candidate_logits", "features")}
    out.update({f"logits@{b}": v for b, v in result.logits.items()})
    return out


class TestNoTensorOffTheInputDevice:
    @pytest.mark.parametrize("criterion", ["entropy", "random", "delta"])
    @pytest.mark.parametrize("aggregate", ["mean", "entropy"])
    def test_search_under_a_meta_default_device(self, net: PhaseNet, x: torch.Tensor, criterion: str,
                                                aggregate: str) -> None:
        search = PhaseSearch(net, budget=6, criterion=criterion, aggregate=aggregate)
        expected = tensors(search.run(x, budgets=[1, 4, 6]))
        with torch.device("meta"):
            got = tensors(search.run(x, budgets=[1, 4, 6]))
        for name, value in got.items():
            assert value.device == x.device, name
            assert torch.equal(value, expected[name]), name

    def test_phase_net_per_image_phases(self, net: PhaseNet, x: torch.Tensor) -> None:
        phases = [{"layer2.0": (1, 0)}, {"layer3.0": (1, 1)}, {}]
        expected, every = net(x, phases=phases), net.all_phases(x, "layer3.0", phases)
        with torch.device("meta"):
            assert torch.equal(net(x, phases=phases), expected)
            assert torch.equal(net.all_phases(x, "layer3.0", phases), every)

    def test_learned_aggregator_and_criterion(self, net: PhaseNet, x: torch.Tensor) -> None:
        module = learned_for(net, PhaseSearch(net, budget=2))
        search = PhaseSearch(net, budget=5, criterion="learned", aggregate=module)
        expected = tensors(search.run(x, budgets=[1, 5]))
        with torch.device("meta"):
            got = tensors(search.run(x, budgets=[1, 5]))
            unaligned = search.combine(search.run(x, budgets=[5]), 5, align=False)
        assert unaligned.device == x.device
        for name, value in got.items():
            assert torch.equal(value, expected[name]), name

    def test_top1_breaks_ties_as_argmax(self) -> None:
        logits = torch.tensor([[1.0, 3.0, 1.0, 3.0]])  # a tie, as bf16 logits often hold
        labels = torch.tensor([3])
        assert classification_metrics(logits, labels)["top1"] == 0.0
        assert classification_metrics(logits, torch.tensor([1]))["top1"] == 100.0

    def test_metrics(self) -> None:
        logits = torch.randn(20, 10, generator=torch.Generator().manual_seed(2))
        labels = torch.arange(20) % 10
        expected = classification_metrics(logits, labels, logits.flip(0))
        with torch.device("meta"):
            assert classification_metrics(logits, labels, logits.flip(0)) == expected

    @pytest.mark.parametrize("name", ["mean", "max", "gps", "augtta", "classtta"])
    def test_tta_aggregators(self, name: str) -> None:
        g = torch.Generator().manual_seed(3)
        logits, labels = torch.randn(30, 4, 5, generator=g), torch.randint(0, 5, (30,), generator=g)
        expected = TTA_AGGREGATORS.get(name)().fit(logits, labels)(logits)
        with torch.device("meta"):
            got = TTA_AGGREGATORS.get(name)().fit(logits, labels)(logits)
        assert got.device == logits.device
        torch.testing.assert_close(got, expected)


class TestRuntime:
    def test_cpu(self) -> None:
        assert Runtime.resolve("cpu", "bf16") == Runtime(torch.device("cpu"), "bf16")
        assert resolve_device("CPU") == torch.device("cpu")

    @pytest.mark.parametrize("name", ["gpu", "cuda:x", "tpu", ""])
    def test_unknown_device(self, name: str) -> None:
        with pytest.raises(ArgumentError, match="device"):
            resolve_device(name)

    @pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
    @pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
    def test_unavailable_cuda(self, name: str) -> None:
        with pytest.raises(ArgumentError, match="CUDA is not available.*--device cpu"):
            resolve_device(name)

    def test_missing_gpu_index(self) -> None:
        if not torch.cuda.is_available():
            pytest.skip("needs CUDA")
        with pytest.raises(ArgumentError, match="GPU"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")

    def test_default(self) -> None:
        assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")

    def test_fp16_on_cpu_refused(self) -> None:
        with pytest.raises(ArgumentError, match="fp16.*CPU"):
            resolve_precision("fp16", torch.device("cpu"))

    def test_unknown_precision(self) -> None:
        with pytest.raises(ArgumentError, match="fp8"):
            resolve_precision("fp8", torch.device("cpu"))

    def test_bf16_budget_one_is_the_plain_model_run_the_same_way(self, net: PhaseNet, x: torch.Tensor) -> None:
        rt = Runtime.resolve("cpu", "bf16")
        with torch.no_grad(), rt.autocast():
            plain = net.model(x)
            searched = PhaseSearch(net, budget=4).run(x, budgets=[1, 4])
        assert plain.dtype == torch.bfloat16
        assert torch.equal(searched.logits[1], plain)
        with torch.no_grad():
            fp32 = net.model(x)
        assert not torch.equal(plain.float(), fp32)  # autocast did change the arithmetic
        torch.testing.assert_close(searched.logits[4].float(), PhaseSearch(net, budget=4)(x), atol=0.1, rtol=0.05)


@pytest.fixture()
def no_tf32():
    """CUDA convolutions in true float32 (cuDNN uses TF32 by default), so CPU and GPU agree to 1e-4."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


@cuda
@pytest.mark.usefixtures("no_tf32")
class TestCuda:
    def test_search_on_cuda(self, net: PhaseNet, x: torch.Tensor) -> None:
        import copy

        gpu = PhaseNet(copy.deepcopy(net.model).cuda(), input_size=net.input_size)
        xc = x.cuda()
        with torch.no_grad():
            plain = gpu.model(xc)
        for criterion in ("entropy", "random"):
            result = PhaseSearch(gpu, budget=6, criterion=criterion).run(xc, budgets=[1, 4, 6])
            for name, value in tensors(result).items():
                assert value.device.type == "cuda", name
            assert torch.equal(result.logits[1], plain)
            cpu = PhaseSearch(net, budget=6, criterion=criterion).run(x, budgets=[1, 4, 6])
            if criterion == "random":  # drawn on the CPU: the same states on both devices
                assert torch.equal(result.states.cpu(), cpu.states)
            if not torch.equal(result.states.cpu(), cpu.states):  # entropy: a near tie may order differently
                continue
            for b in (1, 4, 6):
                torch.testing.assert_close(result.logits[b].cpu(), cpu.logits[b], atol=1e-4, rtol=1e-4)

    @pytest.mark.parametrize("precision", ["bf16", "fp16"])
    def test_autocast_budget_one(self, net: PhaseNet, x: torch.Tensor, precision: str) -> None:
        import copy

        gpu = PhaseNet(copy.deepcopy(net.model).cuda(), input_size=net.input_size)
        rt = Runtime.resolve("cuda", precision)
        xc = x.cuda()
        with torch.no_grad(), rt.autocast():
            plain = gpu.model(xc)
            result = PhaseSearch(gpu, budget=6).run(xc, budgets=[1, 6])
        assert torch.equal(result.logits[1], plain)
        assert plain.dtype == rt.dtype

    def test_learned_on_cuda(self, net: PhaseNet, x: torch.Tensor) -> None:
        import copy

        module = learned_for(net, PhaseSearch(net, budget=2))
        cpu = PhaseSearch(net, budget=5, criterion="learned", aggregate=module).run(x, budgets=[5])
        gpu = PhaseNet(copy.deepcopy(net.model).cuda(), input_size=net.input_size)
        got = PhaseSearch(gpu, budget=5, criterion="learned", aggregate=copy.deepcopy(module).cuda()).run(
            x.cuda(), budgets=[5])
        torch.testing.assert_close(got.logits[5].cpu(), cpu.logits[5], atol=1e-4, rtol=1e-4)

    def test_metrics_on_cuda(self) -> None:
        logits = torch.randn(50, 10, generator=torch.Generator().manual_seed(2))
        labels = torch.arange(50) % 10
        expected = classification_metrics(logits, labels, logits.flip(0))
        got = classification_metrics(logits.cuda(), labels.cuda(), logits.flip(0).cuda())
        assert got == pytest.approx(expected, abs=1e-4)
