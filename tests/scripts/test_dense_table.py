"""scripts/dense_table.py: every figure of a row comes from the eval JSON; a Δ whose interval excludes 0 is bold."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from dense_table import table  # noqa: E402


def _row(**kw: object) -> dict[str, object]:
    base = {"tta": "none", "budget": 1, "aggregate": "none", "align": False, "miou": 70.1, "pixel_acc": 92.68,
            "mean_class_acc": 79.71, "boundary_miou_k3": 52.61, "pixels_fixed": 0, "pixels_broken": 0,
            "forward_equivalents": 1.0}
    return {**base, **kw}


def test_rows_and_bold_intervals() -> None:
    payload = {"model": "camvid-espnet", "num_images": 101, "data": "/x/camvid/val",
               "config": {"criterion": "entropy", "search_space": ["a", "b"]},
               "results": [_row(),
                           _row(budget=4, aggregate="learned", align=True, miou=69.5, forward_equivalents=6.5,
                                miou_delta={"delta": -0.6, "low": -0.9, "high": -0.3}),
                           _row(aggregate="learned@default", align=True, miou=70.2,
                                miou_delta={"delta": 0.1, "low": -0.2, "high": 0.4})]}
    lines = table(payload).splitlines()
    assert lines[0].startswith("camvid-espnet on 101 images of val; criterion entropy; search space a, b")
    assert lines[4] == "| none | 1 | none | no | 70.10 | — | 92.68 | 79.71 | 52.61 | 0 / 0 | 1.00 |"
    assert "| 69.50 | **-0.60 [-0.90, -0.30]** |" in lines[5] and lines[5].endswith("| 6.50 |")
    assert "learned@default (control)" in lines[6] and "| +0.10 [-0.20, +0.40] |" in lines[6]
