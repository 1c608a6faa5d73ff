"""The finer-output-stride evaluation: rows against direct computations, phase == atrous without global ops, masks
that cover everything equal full stitching, the registration shift, and refusals before any image is read."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polyglean.errors import ArgumentError, ModelError
from polyglean.experiments.stitch import StitchEvalConfig, StitchRunner, evaluate_stitch, translate
from polyglean.metrics_dense import confusion_matrix, segmentation_scores
from polyglean.models.segmentation import CGNet, ESPNet
from polyglean.phase.net import PhaseNet
from tests.phase.test_net import lively


def seg_model() -> nn.Module:
    """Three classes at output stride 4 (two stride-2 sites), no global op."""
    torch.manual_seed(0)
    return lively(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8),
        nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 3, 1)))


def dataset(n: int = 3, size: tuple[int, int] = (32, 48)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    items = []
    for _ in range(n):
        x = torch.randn(3, *size, generator=g)
        y = torch.randint(0, 4, size, generator=g)  # 3 = ignored
        items.append((x, y))
    return items


def direct_miou(preds: list[torch.Tensor], data: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    conf = sum(confusion_matrix(p, y, 3, 3) for p, (_, y) in zip(preds, data))
    return float(segmentation_scores(conf)["miou"])


class TestRows:
    def test_full_row_is_the_stitched_map_resized_and_registered(self) -> None:
        model, data = seg_model(), dataset()
        cfg = StitchEvalConfig(sites=("5",), mode="phase")
        report = evaluate_stitch(model, data, cfg, num_classes=3, ignore_index=3)
        net = PhaseNet(model, (3, 32, 48))
        preds, natives = [], []
        with torch.no_grad():
            for x, _ in data:
                fine = net.stitch(x[None], ["5"])  # (1, 3, 16, 24): stride 2
                up = F.interpolate(fine, size=(32, 48), mode="bilinear", align_corners=False)
                preds.append(translate(up, (1.0, 1.0)).argmax(1)[0])  # (4 - 2) / 2 = 1 pixel
                natives.append(F.interpolate(model(x[None]), size=(32, 48), mode="bilinear",
                                             align_corners=False).argmax(1)[0])
        rows = {r["stitch"]: r for r in report["results"]}
        assert report["registration_shift"] == [1.0, 1.0]
        assert rows["full"]["output_stride"] == [2.0, 2.0] and rows["none"]["output_stride"] == [4, 4]
        assert rows["full"]["miou"] == pytest.approx(direct_miou(preds, data), abs=1e-9)
        assert rows["none"]["miou"] == pytest.approx(direct_miou(natives, data), abs=1e-9)
        assert rows["none"]["forward_equivalents"] == 1.0 and rows["full"]["forward_equivalents"] > 1.5
        d = rows["full"]["miou_delta"]
        assert d["delta"] == pytest.approx(rows["full"]["miou"] - rows["none"]["miou"], abs=1e-6)
        assert "boundary_miou_k3_delta" in rows["full"] and "miou_delta" not in rows["none"]
        for key in ("budget", "aggregate", "align", "tta", "per_class_iou", "seconds_per_image", "gflops_per_image"):
            assert key in rows["full"]

    def test_phase_and_atrous_agree_without_global_ops(self) -> None:
        model, data = seg_model(), dataset(2)
        phase = evaluate_stitch(model, data, StitchEvalConfig(sites=("2", "5")), num_classes=3, ignore_index=3)
        atr = evaluate_stitch(model, data, StitchEvalConfig(sites=("2", "5"), mode="atrous"), num_classes=3,
                              ignore_index=3)
        for a, b in zip(phase["results"], atr["results"]):
            assert a["miou"] == pytest.approx(b["miou"], abs=1e-9)
        assert phase["registration_shift"] == [1.5, 1.5]  # stride 4 made 1: (4 - 1) / 2

    @pytest.mark.parametrize("mode", ["phase", "atrous"])
    def test_masks_covering_everything_equal_full(self, mode: str) -> None:
        model, data = seg_model(), dataset(2)
        cfg = StitchEvalConfig(sites=("5",), mode=mode, widths=(100,), thresholds=(1.0,))
        rows = {(r["stitch"], r["mask_param"]): r for r in
                evaluate_stitch(model, data, cfg, num_classes=3, ignore_index=3)["results"]}
        full = rows[("full", None)]
        for key in (("edges", 100), ("uncertain", 1.0)):
            assert rows[key]["mask_area"] == 1.0
            assert rows[key]["miou"] == pytest.approx(full["miou"], abs=1e-9)

    def test_narrow_mask_lies_between(self) -> None:
        model, data = seg_model(), dataset(2)
        cfg = StitchEvalConfig(sites=("5",), widths=(0,), thresholds=(0.5,))
        rows = evaluate_stitch(model, data, cfg, num_classes=3, ignore_index=3)["results"]
        masked = [r for r in rows if r["stitch"] in ("edges", "uncertain")]
        assert all(0.0 < r["mask_area"] < 1.0 for r in masked)
        assert all(r["gflops_per_image"] > rows[0]["gflops_per_image"] for r in masked)


class TestRegistration:
    def test_cgnet_shifts(self) -> None:
        model = lively(CGNet(11, 2, 3))
        x = torch.zeros(1, 3, 64, 96)
        last = StitchRunner(model, StitchEvalConfig(sites=("level3_0.conv1x1.conv",), mode="atrous"), (3, 64, 96))
        two = StitchRunner(model, StitchEvalConfig(sites=("level2_0.conv1x1.conv", "level3_0.conv1x1.conv"),
                                                   mode="atrous"), (3, 64, 96))
        assert last.native_stride == (8, 8) and last.stride == (4.0, 4.0)
        assert last.registration(x, (64, 96)) == (2.0, 2.0)
        assert two.registration(x, (64, 96)) == (3.0, 3.0)

    def test_translate(self) -> None:
        m = torch.arange(5.0).view(1, 1, 1, 5).expand(1, 1, 2, 5)
        assert translate(m, (0, 2))[0, 0, 0].tolist() == [0, 0, 0, 1, 2]
        assert translate(m, (0, -1))[0, 0, 0].tolist() == [1, 2, 3, 4, 4]
        assert translate(m, (0, 0.5))[0, 0, 0].tolist() == [0, 0.5, 1.5, 2.5, 3.5]
        assert torch.equal(translate(m, (1, 0)), m)  # rows equal: moving down changes nothing


class TestRefusals:
    def test_phase_mode_names_the_global_op_and_offers_atrous(self) -> None:
        with pytest.raises(ModelError, match=r"'mean'.*--stitch-mode atrous"):
            StitchRunner(lively(CGNet(11, 2, 3)), StitchEvalConfig(sites=("level3_0.conv1x1.conv",)), (3, 64, 96))

    def test_espnet_phase_mode_names_the_transposed_conv_and_offers_atrous(self) -> None:
        with pytest.raises(ModelError, match=r"up_l3\.0.*--stitch-mode atrous"):
            StitchRunner(ESPNet(12, 1, 1).eval(), StitchEvalConfig(sites=("encoder.level3_0.c1.conv",)), (3, 64, 64))


class TestRegistration:
    def test_decoder_that_takes_the_factor_back_is_not_moved(self) -> None:
        runner = StitchRunner(ESPNet(12, 1, 1).eval(), StitchEvalConfig(sites=("encoder.level3_0.c1.conv",),
                                                                        mode="atrous"), (3, 64, 64))
        x = torch.zeros(1, 3, 64, 64)
        assert runner.output_factor == (1, 1) and runner.stride == (4.0, 4.0)
        assert runner.registration(x, (64, 64)) == (0.0, 0.0)

    def test_resized_finer_map_is_moved(self) -> None:
        runner = StitchRunner(lively(CGNet(11, 2, 3)), StitchEvalConfig(sites=("level3_0.conv1x1.conv",),
                                                                        mode="atrous"), (3, 64, 96))
        assert runner.output_factor == (2, 2)
        assert runner.registration(torch.zeros(1, 3, 64, 96), (64, 96)) == (2.0, 2.0)

    def test_unknown_site_lists_them(self) -> None:
        with pytest.raises(ArgumentError, match="unknown site 'nope'; sites are: 0:2, 1:5"):
            StitchRunner(seg_model(), StitchEvalConfig(sites=("nope",)), (3, 32, 48))

    @pytest.mark.parametrize("kwargs, message", [
        (dict(sites=()), "at least one site"),
        (dict(sites=("5",), mode="zoom"), "unknown stitch mode 'zoom'"),
        (dict(sites=("5",), widths=(-1,)), "widths must be integers >= 0"),
        (dict(sites=("5",), thresholds=(0.0,)), r"thresholds must be in \(0, 1\]"),
        (dict(sites=("5",), widths=(2, 2)), "repeated mask setting"),
        (dict(sites=("5",), chunk=0), "chunk must be >= 1"),
    ])
    def test_config(self, kwargs: dict, message: str) -> None:
        with pytest.raises(ArgumentError, match=message):
            StitchEvalConfig(**kwargs).check()
