"""ImageDataset: both layouts, auto-detection, and every error it promises."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

from polyglean.data import DataError, ImageDataset, limit_dataset


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3).permute(2, 0, 1)


def _img(path: Path, color: tuple[int, int, int] = (255, 0, 0), mode: str = "RGB", size: int = 6) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (size, size), color).convert(mode)
    img.save(path)
    return path


@pytest.fixture
def class_folders(tmp_path: Path) -> Path:
    root = tmp_path / "cf"
    _img(root / "cat" / "b.png", (0, 255, 0))
    _img(root / "cat" / "a.jpg", (0, 0, 255))
    _img(root / "ant" / "x.png", mode="L")
    _img(root / "ant" / "sub" / "y.png")
    (root / "ant" / "notes.txt").write_text("not an image")
    _img(root / "dog" / "z.PNG", mode="RGBA")
    return root


@pytest.fixture
def csv_root(tmp_path: Path) -> Path:
    root = tmp_path / "csv"
    for name in ("one.png", "two.jpg", "three.png"):
        _img(root / "images" / name)
    (root / "labels.csv").write_text("file,class_index\none.png,3\ntwo.jpg,0\n\nthree.png,7\n")
    return root


class TestClassFolders:
    def test_layout_order_and_labels(self, class_folders: Path) -> None:
        ds = ImageDataset(class_folders, to_tensor)
        assert ds.layout == "class-folders"
        assert ds.classes == ["ant", "cat", "dog"]
        names = [p.relative_to(class_folders).as_posix() for p, _ in ds.samples]
        assert names == ["ant/x.png", "ant/sub/y.png", "cat/a.jpg", "cat/b.png", "dog/z.PNG"]
        assert ds.targets == [0, 0, 1, 1, 2]

    def test_items_are_rgb_tensors(self, class_folders: Path) -> None:
        ds = ImageDataset(class_folders, to_tensor)
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (3, 6, 6) and isinstance(y, int)
        assert ds[3][0][:, 0, 0].tolist() == [0, 255, 0]

    def test_too_many_folders_for_num_classes(self, class_folders: Path) -> None:
        with pytest.raises(DataError, match="3 class folders but num_classes=2"):
            ImageDataset(class_folders, to_tensor, num_classes=2)

    def test_empty_class_folder_keeps_index(self, class_folders: Path) -> None:
        (class_folders / "bee").mkdir()
        ds = ImageDataset(class_folders, to_tensor)
        assert ds.classes == ["ant", "bee", "cat", "dog"] and ds.targets == [0, 0, 2, 2, 3]


class TestLabelsCsv:
    def test_header_optional_and_blank_lines(self, csv_root: Path) -> None:
        ds = ImageDataset(csv_root, to_tensor, num_classes=10)
        assert ds.layout == "labels.csv" and ds.classes is None
        assert [p.name for p, _ in ds.samples] == ["one.png", "two.jpg", "three.png"]
        assert ds.targets == [3, 0, 7]
        (csv_root / "labels.csv").write_text("one.png,3\ntwo.jpg,0\n")
        assert ImageDataset(csv_root, to_tensor).targets == [3, 0]

    def test_files_beside_csv_without_images_folder(self, tmp_path: Path) -> None:
        _img(tmp_path / "p.png")
        (tmp_path / "labels.csv").write_text("p.png,1\n")
        assert ImageDataset(tmp_path, to_tensor).samples[0][0] == tmp_path / "p.png"

    def test_label_out_of_range(self, csv_root: Path) -> None:
        with pytest.raises(DataError, match=r"out of range \[0, 5\).*7 for three.png"):
            ImageDataset(csv_root, to_tensor, num_classes=5)

    def test_missing_file(self, csv_root: Path) -> None:
        (csv_root / "labels.csv").write_text("one.png,1\nghost.png,2\n")
        with pytest.raises(DataError, match="1 file\\(s\\) that do not exist.*ghost.png"):
            ImageDataset(csv_root, to_tensor)

    @pytest.mark.parametrize(
        ("text", "pattern"),
        [
            ("one.png,1\ntwo.jpg\n", "line 2: expected 'file,class_index'"),
            ("one.png,1\ntwo.jpg,1,2\n", "line 2: expected"),
            ("file,class\none.png,x\n", "line 2: class index 'x' is not an integer"),
            ("one.png,1\ntwo.jpg,dog\n", "line 2: class index 'dog'"),
            ("one.png,-1\n", "line 1: class index -1 is negative"),
            ("one.png,1\n,2\n", "line 2: empty file name"),
        ],
    )
    def test_malformed_lines(self, csv_root: Path, text: str, pattern: str) -> None:
        (csv_root / "labels.csv").write_text(text)
        with pytest.raises(DataError, match=pattern):
            ImageDataset(csv_root, to_tensor)


class TestErrors:
    def test_root_missing(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match="data set folder not found.*nothing"):
            ImageDataset(tmp_path / "nothing", to_tensor)

    def test_empty_root_lists_layouts(self, tmp_path: Path) -> None:
        (tmp_path / "cls").mkdir()
        with pytest.raises(DataError, match="no images found.*class folders.*labels.csv"):
            ImageDataset(tmp_path, to_tensor)

    def test_empty_csv(self, tmp_path: Path) -> None:
        (tmp_path / "labels.csv").write_text("file,class_index\n")
        with pytest.raises(DataError, match="no images found"):
            ImageDataset(tmp_path, to_tensor)

    def test_corrupt_image_raised_on_read(self, class_folders: Path) -> None:
        bad = class_folders / "cat" / "c.jpg"
        bad.write_bytes(os.urandom(300))
        ds = ImageDataset(class_folders, to_tensor)  # listing does not open images
        index = [p for p, _ in ds.samples].index(bad)
        ds[index - 1]
        with pytest.raises(DataError, match="cannot read image .*c.jpg"):
            ds[index]

    def test_truncated_image(self, class_folders: Path) -> None:
        good = _img(class_folders / "cat" / "big.jpg", size=64)
        good.write_bytes(good.read_bytes()[:200])
        ds = ImageDataset(class_folders, to_tensor)
        with pytest.raises(DataError, match="big.jpg"):
            ds[[p for p, _ in ds.samples].index(good)]


class TestLimit:
    def test_first_and_spread(self, csv_root: Path) -> None:
        ds = ImageDataset(csv_root, to_tensor)
        assert limit_dataset(ds, None) is ds and limit_dataset(ds, 10) is ds
        first = limit_dataset(ds, 2)
        assert isinstance(first, Subset) and list(first.indices) == [0, 1]
        assert list(limit_dataset(ds, 2, spread=True).indices) == [0, 1]  # type: ignore[attr-defined]

    def test_spread_indices(self) -> None:
        ds = list(range(10))
        assert list(limit_dataset(ds, 4, spread=True).indices) == [0, 2, 5, 7]  # type: ignore[arg-type, attr-defined]

    def test_negative(self) -> None:
        with pytest.raises(ValueError, match="limit must be >= 0"):
            limit_dataset([1, 2], -1)  # type: ignore[arg-type]


@pytest.mark.data
def test_real_layouts(shared_data: Path) -> None:
    cifar = ImageDataset(shared_data / "cifar10-jpeg" / "test", to_tensor, num_classes=10)
    assert cifar.layout == "class-folders" and len(cifar) == 5000
    assert cifar.classes is not None and cifar.classes[0] == "airplane" and cifar.classes[-1] == "truck"
    val = ImageDataset(shared_data / "imagenet-val1300", to_tensor, num_classes=1000)
    assert val.layout == "labels.csv" and len(val) == 1300
    assert val.samples[0] == (shared_data / "imagenet-val1300" / "images" / "ILSVRC2012_val_00000347.JPEG", 472)
    assert val[0][0].shape[0] == 3
