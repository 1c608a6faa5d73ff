"""Multi-scale TTA on a model whose skip connections need every view divisible by its largest reduction (ESPNet:
8): the views are rounded to that multiple, so every scale runs."""

from __future__ import annotations

import torch

from polyglean.experiments.dense import DenseEvalConfig, evaluate_segmentation
from polyglean.models.segmentation import espnet_camvid


def test_multi_scale_views_fit_espnet() -> None:
    torch.manual_seed(0)
    model = espnet_camvid().eval()
    # 40 x 56: 0.75 gives 30 x 42 unrounded (not divisible by 8: ESPNet's decoder cannot concatenate its skips)
    data = [(torch.randn(3, 40, 56), torch.randint(0, 12, (40, 56))) for _ in range(2)]
    config = DenseEvalConfig(budgets=(1, 2), aggregates=("entropy",), aligns=(True,), tta=("ms",), tta_budget=2,
                             batch_size=2)
    report = evaluate_segmentation(model, data, config, num_classes=11, ignore_index=11)
    rows = {(r["tta"], r["budget"]): r for r in report["results"]}
    assert set(rows) == {("none", 1), ("none", 2), ("ms", 1), ("ms", 2)}
    # pixels processed over the input's: 32x40 (0.75 rounded to 8), 40x56, 48x72, 64x80 (1.5: 60x84 rounded)
    assert abs(rows[("ms", 1)]["forward_equivalents"] - (32 * 40 + 40 * 56 + 48 * 72 + 64 * 80) / (40 * 56)) < 1e-6
