"""PhaseEnsemble against PhaseNet and the search, greedy selection, and the exported graphs against eager."""

from __future__ import annotations

import json

import pytest
import torch

from polyglean.aggregate import AGGREGATORS, align, alignment_factor, displacement
from polyglean.errors import ArgumentError, DataError
from polyglean.export import PhaseEnsemble
from polyglean.export.formats import export_module, format_from_path, onnx_outputs
from polyglean.export.select import select_states, space_states
from polyglean.models.cifar_resnet import cifar_resnet20
from polyglean.phase.net import PhaseNet
from polyglean.search import PhaseSearch


@pytest.fixture(scope="module")
def net() -> PhaseNet:
    torch.manual_seed(0)
    model = cifar_resnet20().eval()
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return PhaseNet(model, (3, 32, 32))


def reference(net: PhaseNet, states: list[tuple[int, ...]], x: torch.Tensor, aggregate: str, aligned: bool):
    """Each state run alone through PhaseNet, aligned with the tensor `align`, aggregated by the registry's class."""
    n = x.shape[0]
    feats = []
    for st in states:
        out, _ = net.run_from(0, (x,), net.encode_phases(torch.tensor([st] * n), n), stop=net.head_segment)
        feats.append(out[0])
    factors = [s.factor for s in net.sites]
    moved = [i for i in range(len(factors)) if any(st[i] for st in states)]
    first = moved[0] if moved else 0
    shifts = displacement(torch.tensor(states), factors, first)
    logits = torch.stack([net.head(f) for f in feats], 1)
    if aligned:
        feats = [align(f, shifts[k:k + 1].expand(n, 2), alignment_factor(factors, first))
                 for k, f in enumerate(feats)]
    combined = AGGREGATORS.get(aggregate)().combine(torch.stack(feats, 1), logits, shifts.expand(n, -1, -1))
    return net.head(combined)


STATES = [(0, 0), (1, 0), (3, 2), (0, 3), (2, 2)]


@pytest.mark.parametrize("aggregate", ["mean", "entropy"])
@pytest.mark.parametrize("aligned", [True, False])
def test_equals_phasenet_states(net: PhaseNet, aggregate: str, aligned: bool) -> None:
    x = torch.randn(3, 3, 32, 32)
    ens = PhaseEnsemble(net, STATES, aggregate=aggregate, align=aligned)
    with torch.no_grad():
        torch.testing.assert_close(ens(x), reference(net, STATES, x, aggregate, aligned), rtol=0, atol=1e-6)


def test_default_alone_is_the_model_bit_for_bit(net: PhaseNet) -> None:
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(PhaseEnsemble(net, [(0, 0)])(x), net.model(x))


def test_shares_the_prefix(net: PhaseNet) -> None:
    # States differing only at layer3.0 share everything before it: segments before layer3.0's entry run once.
    ens = PhaseEnsemble(net, [(0, 0), (0, 1), (0, 2), (0, 3)])
    entry = net.entry_segment("layer3.0")
    assert ens.segment_runs[:entry] == [1] * entry
    assert ens.segment_runs[entry:] == [4] * (len(ens.segment_runs) - entry)


def test_matches_the_search_at_the_same_states(net: PhaseNet) -> None:
    # Up to B = 4 on a two-site model every criterion picks the default state's children at the first site.
    x = torch.randn(6, 3, 32, 32)
    search = PhaseSearch(net, budget=4, criterion="entropy", aggregate="mean", align=True)
    result = search.run(x, budgets=[4])
    states = [tuple(s) for s in result.states[0].tolist()]
    assert all([tuple(s) for s in row.tolist()] == states for row in result.states)
    with torch.no_grad():
        torch.testing.assert_close(PhaseEnsemble(net, states, aggregate="mean")(x), result.logits[4],
                                   rtol=0, atol=1e-5)


def test_states_by_site_dict(net: PhaseNet) -> None:
    ens = PhaseEnsemble(net, [{}, {"layer2.0": (1, 1)}, {"layer3.0": (0, 1), "layer2.0": (1, 0)}])
    assert ens.states == [(0, 0), (3, 0), (2, 1)]


@pytest.mark.parametrize("states, match", [
    ([], "at least one"),
    ([(0, 0), (0, 0)], "given twice"),
    ([(0, 4)], "out of range"),
    ([(0, 0, 0)], "one phase per site"),
])
def test_bad_states(net: PhaseNet, states: list, match: str) -> None:
    with pytest.raises(ArgumentError, match=match):
        PhaseEnsemble(net, states)


def test_bad_aggregate(net: PhaseNet) -> None:
    with pytest.raises(ArgumentError, match="mean or entropy"):
        PhaseEnsemble(net, [(0, 0)], aggregate="learned")


# ---------------------------------------------------------------------------------------------------- selection
def _pool_data(net: PhaseNet, n: int = 24):
    x = torch.randn(n, 3, 32, 32)
    y = torch.randint(0, 10, (n,))
    pool = space_states(net, ["layer2.0", "layer3.0"])
    runner = PhaseEnsemble(net, pool)
    with torch.no_grad():
        feats = runner.state_features(x)
        logits = torch.stack([net.head(f) for f in feats], 1)
        aligned = torch.stack([f if d == (0, 0) else align(f, torch.tensor([d] * n), runner.factor)
                               for f, d in zip(feats, runner.shifts)], 1)
    return aligned, logits, y, pool, x


def test_space_states_default_first(net: PhaseNet) -> None:
    pool = space_states(net, ["layer2.0", "layer3.0"])
    assert pool[0] == (0, 0) and len(pool) == 16 and len(set(pool)) == 16


def test_greedy_selection_takes_the_best_state_each_step(net: PhaseNet) -> None:
    feats, logits, y, pool, x = _pool_data(net)
    sel = select_states(net, feats, logits, y, pool, 3, metric="nll")
    assert sel.states[0] == (0, 0) and len(sel.states) == 3 and len(set(sel.states)) == 3
    # brute force the second state: the one whose mean with the default has the lowest NLL
    nlls = {}
    for j in range(1, len(pool)):
        z = net.head((feats[:, 0] + feats[:, j]) / 2)
        nlls[pool[j]] = float(torch.nn.functional.cross_entropy(z, y))
    assert sel.states[1] == min(nlls, key=nlls.get)
    assert sel.nll[1] == pytest.approx(min(nlls.values()), rel=1e-5)
    # and the ensemble of the chosen states reproduces the fit score
    with torch.no_grad():
        z = PhaseEnsemble(net, sel.states)(x)
    assert float(torch.nn.functional.cross_entropy(z, y)) == pytest.approx(sel.nll[-1], rel=1e-4)


def test_selection_k_out_of_range(net: PhaseNet) -> None:
    feats, logits, y, pool, _ = _pool_data(net, 4)
    with pytest.raises(ArgumentError, match="out of range"):
        select_states(net, feats, logits, y, pool, 17)


# ------------------------------------------------------------------------------------------------------ export
@pytest.mark.parametrize("fmt", ["onnx", "pt2", "torchscript"])
def test_export_matches_eager_with_a_dynamic_batch(net: PhaseNet, tmp_path, fmt: str) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    ens = PhaseEnsemble(net, STATES, aggregate="entropy").eval()
    path = tmp_path / f"ens.{ {'onnx': 'onnx', 'pt2': 'pt2', 'torchscript': 'ts'}[fmt] }"
    checks = export_module(ens, torch.randn(3, 3, 32, 32), path, fmt)
    assert path.is_file() and all(v <= 1e-4 for v in checks.values())
    for n in (1, 7):  # batch sizes never seen by the exporter
        x = torch.randn(n, 3, 32, 32)
        with torch.no_grad():
            want = ens(x)
            if fmt == "onnx":
                got = onnx_outputs(path.read_bytes(), x)
            elif fmt == "pt2":
                got = torch.export.load(path).module()(x)
            else:
                got = torch.jit.load(path)(x)
        assert (got - want).abs().max() <= 1e-4


def test_format_from_path() -> None:
    assert format_from_path("a.onnx", None) == "onnx"
    assert format_from_path("a.bin", "pt2") == "pt2"
    with pytest.raises(ArgumentError, match="cannot tell"):
        format_from_path("a.bin", None)
    with pytest.raises(ArgumentError, match="make them agree"):
        format_from_path("a.onnx", "pt2")


# ------------------------------------------------------------------------------------------------------ the CLI
@pytest.mark.data
@pytest.mark.slow
def test_cli_export_on_real_images(shared_data, tmp_path, capsys) -> None:
    pytest.importorskip("onnxruntime")
    from polyglean.cli.main import main

    out, js = tmp_path / "r20.onnx", tmp_path / "r20.json"
    code = main(["export", "--model", "cifar10-resnet20", "--states", "3", "--fit-data",
                 str(shared_data / "cifar10" / "test"), "--limit", "40", "--out", str(out), "--json", str(js),
                 "--no-progress"])
    assert code == 0 and out.is_file()
    summary = json.loads(js.read_text())
    assert summary["states"][0] == [0, 0] and len(summary["states"]) == 3
    assert summary["fit"]["images"] == 40 and len(summary["fit"]["nll"]) == 3
    assert summary["export_check_max_abs_diff"] and max(summary["export_check_max_abs_diff"].values()) <= 1e-4


def test_cli_refuses_before_work(tmp_path, capsys) -> None:
    from polyglean.cli.main import main

    assert main(["export", "--model", "cifar10-resnet20", "--states", "2", "--fit-data", str(tmp_path),
                 "--out", str(tmp_path / "x.bin")]) == 2
    assert "cannot tell the export format" in capsys.readouterr().err
    assert main(["export", "--model", "cifar10-resnet20", "--states", "0", "--fit-data", str(tmp_path),
                 "--out", str(tmp_path / "x.onnx")]) == 2
    assert "--states" in capsys.readouterr().err
