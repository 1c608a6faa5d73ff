"""The paired image / label-map dataset: layouts, the ignore index, and its clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from polyglean.data.segmentation import SegmentationDataset
from polyglean.errors import DataError


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _pair(root: Path, stem: str, label: np.ndarray, size: tuple[int, int] = (4, 6)) -> None:
    _write(root / "img" / f"{stem}.png", np.zeros((*size, 3), dtype=np.uint8))
    _write(root / "lab" / f"{stem}.png", label.astype(np.uint8))


def test_shared_stems_and_ignore_index(tmp_path: Path) -> None:
    label = np.full((4, 6), 2, dtype=np.uint8)
    label[0, 0] = 11
    _pair(tmp_path, "b", label)
    _pair(tmp_path, "a", np.zeros((4, 6), dtype=np.uint8))
    ds = SegmentationDataset(tmp_path / "img", tmp_path / "lab", _to_tensor, num_classes=11, ignore_index=11)
    assert [p.name for p, _ in ds.samples] == ["a.png", "b.png"] and ds.layout == "stems"
    x, y = ds[1]
    assert x.shape == (3, 4, 6) and y.dtype == torch.int64 and y[0, 0] == 11 and y[1, 1] == 2


def test_cityscapes_layout(tmp_path: Path) -> None:
    img = tmp_path / "leftImg8bit" / "val" / "lindau"
    lab = tmp_path / "gtFine" / "val" / "lindau"
    _write(img / "lindau_000000_000019_leftImg8bit.png", np.zeros((4, 6, 3), dtype=np.uint8))
    _write(lab / "lindau_000000_000019_gtFine_labelTrainIds.png", np.full((4, 6), 255, dtype=np.uint8))
    _write(lab / "lindau_000000_000019_gtFine_labelIds.png", np.full((4, 6), 40, dtype=np.uint8))
    ds = SegmentationDataset(img.parent, lab.parent, _to_tensor, num_classes=19, ignore_index=255)
    assert ds.layout == "cityscapes" and len(ds) == 1
    assert bool((ds[0][1] == 255).all())


def test_missing_label_map(tmp_path: Path) -> None:
    _pair(tmp_path, "a", np.zeros((4, 6)))
    _write(tmp_path / "img" / "orphan.png", np.zeros((4, 6, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="have no label map.*orphan"):
        SegmentationDataset(tmp_path / "img", tmp_path / "lab", _to_tensor, num_classes=3)


def test_size_mismatch(tmp_path: Path) -> None:
    _write(tmp_path / "img" / "a.png", np.zeros((4, 6, 3), dtype=np.uint8))
    _write(tmp_path / "lab" / "a.png", np.zeros((5, 6), dtype=np.uint8))
    ds = SegmentationDataset(tmp_path / "img", tmp_path / "lab", _to_tensor, num_classes=3)
    with pytest.raises(DataError, match=r"is 6x5 but its image a.png is 6x4"):
        ds[0]


def test_out_of_range_label(tmp_path: Path) -> None:
    label = np.zeros((4, 6), dtype=np.uint8)
    label[2, 2] = 7
    _pair(tmp_path, "a", label)
    ds = SegmentationDataset(tmp_path / "img", tmp_path / "lab", _to_tensor, num_classes=3, ignore_index=255)
    with pytest.raises(DataError, match=r"value\(s\) \[7\] outside the classes 0..2 and not the ignore index 255"):
        ds[0]


def test_colour_label_map_and_missing_folder(tmp_path: Path) -> None:
    _write(tmp_path / "img" / "a.png", np.zeros((4, 6, 3), dtype=np.uint8))
    _write(tmp_path / "lab" / "a.png", np.zeros((4, 6, 3), dtype=np.uint8))
    ds = SegmentationDataset(tmp_path / "img", tmp_path / "lab", _to_tensor, num_classes=3)
    with pytest.raises(DataError, match="mode RGB"):
        ds[0]
    with pytest.raises(DataError, match="labels folder"):
        SegmentationDataset(tmp_path / "img", tmp_path / "nope", _to_tensor, num_classes=3)


@pytest.mark.data
@pytest.mark.slow
def test_camvid_val_with_espnet(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three real CamVid val images through the ESPNet preset: the plain model's pixel accuracy is high, and the dense
    search at B=1 is the model bit for bit."""
    from polyglean import PhaseNet
    from polyglean.metrics_dense import DenseMeter
    from polyglean.models import get_preset, load_model
    from polyglean.search.dense import DenseSearch

    monkeypatch.setenv("POLYGLEAN_DATA", str(shared_data))
    model, pre = load_model("camvid-espnet")
    preset = get_preset("camvid-espnet")
    ds = SegmentationDataset(shared_data / "camvid" / "val", shared_data / "camvid" / "valannot", pre,
                             num_classes=preset.num_classes, ignore_index=preset.ignore_index)
    assert len(ds) == 101
    x = torch.stack([ds[i][0] for i in range(2)])
    y = torch.stack([ds[i][1] for i in range(2)])
    search = DenseSearch(PhaseNet(model, pre.input_size), budget=2)
    result = search.run(x, budgets=[1, 2])
    with torch.no_grad():
        assert torch.equal(result.logits[1], model(x))
    meter = DenseMeter(preset.num_classes, preset.ignore_index)
    meter.update(result.logits[1].argmax(1), y)
    assert meter.scores()["pixel_acc"] > 85.0
