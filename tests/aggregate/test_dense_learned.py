"""The learned aggregator for maps: attention over the candidates of each pixel, masked by the border rule."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from polyglean import PhaseNet
from polyglean.aggregate.dense import MapAttentionAggregator, displacement_grid, load_map_aggregator
from polyglean.aggregate.learned import AggregatorCheckpointError, AttentionAggregator, save_aggregator
from polyglean.errors import ArgumentError
from polyglean.models.segmentation import espnet_camvid
from polyglean.search.dense import DenseSearch, MapMeanAggregator, align_maps


def _trained_like(k: int = 5, grid: tuple[int, int] = (7, 7), seed: int = 0) -> AttentionAggregator:
    """A module whose output layer is not zero (as after training), so it is not the plain mean."""
    torch.manual_seed(seed)
    m = AttentionAggregator(k, grid, dim=8, heads=2)
    nn.init.normal_(m.mlp[-1].weight, std=0.5)
    nn.init.normal_(m.mlp[-1].bias, std=0.5)
    return m.eval()


def _candidates(n: int = 2, b: int = 4, k: int = 5, h: int = 6, w: int = 7) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    maps = torch.randn(n, b, k, h, w, generator=g)
    shift = torch.randint(0, 4, (n, b, 2), generator=g)
    shift[:, 0] = 0  # the default candidate covers everything
    flat, valid = align_maps(maps.flatten(0, 1), shift.reshape(-1, 2))
    return flat.reshape(maps.shape), valid.reshape(n, b, h, w), shift


def test_untrained_is_the_mean_of_the_covering_candidates() -> None:
    maps, valid, shift = _candidates()
    assert not bool(valid.all())  # some border pixels are uncovered by some candidates
    agg = MapAttentionAggregator(AttentionAggregator(5, (7, 7), dim=8, heads=2))
    expected = MapMeanAggregator().combine(maps, valid)
    assert torch.allclose(agg.combine(maps, valid, shift=shift), expected, atol=1e-5)


def test_uncovered_values_are_ignored_and_chunks_are_exact() -> None:
    maps, valid, shift = _candidates()
    agg = MapAttentionAggregator(_trained_like(), chunk=5)
    out = agg.combine(maps, valid, shift=shift)
    garbage = torch.where(valid[:, :, None], maps, torch.full_like(maps, 1e3))
    assert torch.allclose(agg.combine(garbage, valid, shift=shift), out, atol=1e-5)
    whole = MapAttentionAggregator(agg.module, chunk=10_000)
    assert torch.allclose(whole.combine(maps, valid, shift=shift), out, atol=1e-6)
    assert not torch.allclose(out, MapMeanAggregator().combine(maps, valid), atol=1e-3)


@pytest.mark.parametrize("b", [1, 2, 3, 4])
def test_permutation_invariant_at_any_budget(b: int) -> None:
    maps, valid, shift = _candidates(b=4)
    maps, valid, shift = maps[:, :b], valid[:, :b], shift[:, :b]
    agg = MapAttentionAggregator(_trained_like())
    out = agg.combine(maps, valid, shift=shift)
    assert out.shape == (2, 5, 6, 7)
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(b))
    assert torch.allclose(agg.combine(maps[:, perm], valid[:, perm], shift=shift[:, perm]), out, atol=1e-5)


def test_a_pixel_depends_on_its_own_candidates_only() -> None:
    maps, valid, shift = _candidates()
    agg = MapAttentionAggregator(_trained_like())
    out = agg.combine(maps, valid, shift=shift)
    other = maps.clone()
    other[..., 0, 0] += 5.0
    moved = agg.combine(other, valid, shift=shift)
    assert torch.allclose(moved[..., 1:, :], out[..., 1:, :], atol=1e-6)
    assert torch.allclose(moved[..., 0, 1:], out[..., 0, 1:], atol=1e-6)


def test_search_combine_passes_the_displacements() -> None:
    net = PhaseNet(espnet_camvid().eval(), (3, 32, 48))
    search = DenseSearch(net, budget=4, criterion="random", aggregate="mean")
    assert displacement_grid(search.search_space, net.sites) == (7, 7)  # 1/4 site: 0 or 2 px, 1/8 site: 0 or 4
    x = torch.randn(2, 3, 32, 48)
    result = search.run(x)
    agg = MapAttentionAggregator(_trained_like(12))
    got = search.combine(result, 4, aggregate=agg, align=True)
    maps, shift = result.candidate_logits[:, :4], result.shift[:, :4]
    flat, valid = align_maps(maps.flatten(0, 1), shift.reshape(-1, 2))
    expected = agg.combine(flat.reshape(maps.shape), valid.reshape(2, 4, 32, 48), shift=shift)
    assert torch.equal(got, expected)


def test_mask_shape_and_missing_shift_are_errors() -> None:
    maps, valid, shift = _candidates()
    agg = MapAttentionAggregator(_trained_like())
    with pytest.raises(ArgumentError, match="displacements"):
        agg.combine(maps, valid)
    with pytest.raises(ArgumentError, match="mask must be"):
        agg.module.attend(maps[..., :3, 0][..., None], shift, mask=torch.ones(2, 4, 2, dtype=torch.bool))
    with pytest.raises(ArgumentError, match="chunk"):
        MapAttentionAggregator(agg.module, chunk=0)


def test_checkpoint_task_is_checked(tmp_path: Path) -> None:
    module = _trained_like(12)
    meta = {"model": "camvid-espnet", "model_sha256": "x", "sites": [], "search_space": ["a"], "align": True}
    save_aggregator(tmp_path / "cls.pt", module, meta=meta)
    with pytest.raises(AggregatorCheckpointError, match="task 'classification'"):
        load_map_aggregator(tmp_path / "cls.pt", model="camvid-espnet")
    save_aggregator(tmp_path / "seg.pt", module, meta={**meta, "task": "segmentation"})
    agg = load_map_aggregator(tmp_path / "seg.pt", model="camvid-espnet")
    maps, valid, shift = _candidates(k=12)
    assert torch.allclose(agg.combine(maps, valid, shift=shift),
                          MapAttentionAggregator(module).combine(maps, valid, shift=shift))
    with pytest.raises(AggregatorCheckpointError, match="camvid-cgnet"):
        load_map_aggregator(tmp_path / "seg.pt", model="camvid-cgnet")


@pytest.mark.data
@pytest.mark.slow
def test_train_then_eval_on_camvid(shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two CamVid training images (budget 3, 256 pixels each) through `train-aggregator --labels`, then `eval
    --aggregate mean,learned` on one val image: a segmentation checkpoint, and learned + learned@default rows."""
    import json

    from polyglean.cli.main import main

    monkeypatch.setenv("POLYGLEAN_DATA", str(shared_data))
    cam = shared_data / "camvid"
    for split in ("train", "trainannot", "val", "valannot"):
        (tmp_path / split).mkdir()
        for f in sorted((cam / split).iterdir())[:2]:
            shutil.copy(f, tmp_path / split / f.name)
    out = tmp_path / "agg.pt"
    rc = main(["train-aggregator", "--model", "camvid-espnet", "--data", str(tmp_path / "train"), "--labels",
               str(tmp_path / "trainannot"), "--budget", "3", "--epochs", "2", "--pixels-per-image", "256",
               "--batch-size", "128", "--out", str(out), "--no-progress"])
    assert rc == 0
    agg = load_map_aggregator(out, model="camvid-espnet")
    assert agg.meta["task"] == "segmentation" and agg.meta["training"]["train"]["pixels"] == 512
    assert len(agg.meta["history"]) == 2
    rc = main(["eval", "--model", "camvid-espnet", "--data", str(tmp_path / "val"), "--labels",
               str(tmp_path / "valannot"), "--budgets", "1,2", "--aggregate", "mean,learned", "--aggregator", str(out),
               "--limit", "1", "--json", str(tmp_path / "r.json"), "--no-progress"])
    assert rc == 0
    rows = json.loads((tmp_path / "r.json").read_text())["results"]
    kinds = {(r["aggregate"], r["budget"]) for r in rows}
    assert {("none", 1), ("mean", 2), ("learned", 2), ("learned@default", 1)} <= kinds
    assert all(0.0 < r["miou"] <= 100.0 for r in rows)


def test_cli_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from polyglean.cli.main import main

    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    cases = [
        (["eval", "--model", "camvid-espnet", "--data", str(tmp_path / "img"), "--labels", str(tmp_path / "lab"),
          "--aggregate", "learned", "--random-weights", "0", "--no-progress"], "--aggregator PATH"),
        (["eval", "--model", "camvid-espnet", "--data", str(tmp_path / "img"), "--labels", str(tmp_path / "lab"),
          "--aggregator", str(tmp_path / "a.pt"), "--random-weights", "0", "--no-progress"], "only by --aggregate"),
        (["train-aggregator", "--model", "camvid-espnet", "--data", str(tmp_path / "img"), "--out",
          str(tmp_path / "a.pt"), "--random-weights", "0"], "give its label maps with --labels"),
        (["train-aggregator", "--model", "camvid-espnet", "--data", str(tmp_path / "img"), "--labels",
          str(tmp_path / "lab"), "--val-data", str(tmp_path / "img"), "--out", str(tmp_path / "a.pt"),
          "--random-weights", "0"], "--val-data: not supported"),
        (["train-aggregator", "--model", "cifar10-resnet20", "--data", str(tmp_path / "img"), "--labels",
          str(tmp_path / "lab"), "--out", str(tmp_path / "a.pt"), "--random-weights", "0"], "not a segmentation model"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "a.pt").exists()


def test_flops_count_the_attention() -> None:
    agg = MapAttentionAggregator(AttentionAggregator(12, (7, 7), dim=32, heads=4))  # hidden 64
    per_token = 2 * (12 * 96 + 32 * 64 + 64 * 12)
    assert agg.flops(2, 4, 100) == 2 * 100 * (4 * per_token + 4 * 16 * 32)
