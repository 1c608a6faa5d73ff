"""Inputs that used to give a plausible wrong number or a traceback: link loops, csv headers and duplicates, wide
pixels, decompression bombs, errors inside loader workers, empty data sets."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from polyglean.data import DataError, ImageDataset, make_loader, read_rgb


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def _img(path: Path, color: tuple[int, int, int] = (255, 0, 0), size: int = 6) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


def _png16(path: Path, pixels: np.ndarray) -> Path:
    """A 16-bit PNG (grey for (H, W, 1), RGB for (H, W, 3)) written byte by byte, independent of Pillow."""
    h, w, c = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


class TestLinks:
    def test_a_link_loop_counts_every_image_once(self, tmp_path: Path) -> None:
        root = tmp_path / "data"
        for i in range(3):
            _img(root / "cat" / f"c{i}.png")
            _img(root / "dog" / f"d{i}.png")
        os.symlink("..", root / "cat" / "loop")  # cat/loop/cat/loop/... and cat/loop/dog
        ds = ImageDataset(root, to_tensor)
        assert len(ds) == 6 and ds.targets == [0, 0, 0, 1, 1, 1]
        assert sorted(p.name for p, _ in ds.samples) == ["c0.png", "c1.png", "c2.png", "d0.png", "d1.png", "d2.png"]

    def test_a_link_to_a_folder_outside_is_followed_once(self, tmp_path: Path) -> None:
        extra = tmp_path / "extra"
        _img(extra / "e.png")
        root = tmp_path / "data"
        _img(root / "cat" / "c.png")
        os.symlink(extra, root / "cat" / "more")
        os.symlink(extra, root / "cat" / "again")  # the same folder by a second link: not entered twice
        ds = ImageDataset(root, to_tensor)
        assert [p.name for p, _ in ds.samples] == ["c.png", "e.png"]

    def test_the_same_file_in_two_classes_is_an_error(self, tmp_path: Path) -> None:
        root = tmp_path / "data"
        real = _img(root / "cat" / "c.png")
        (root / "dog").mkdir()
        os.symlink(real, root / "dog" / "c.png")
        with pytest.raises(DataError, match="are the same file"):
            ImageDataset(root, to_tensor)


class TestCsv:
    @pytest.fixture
    def root(self, tmp_path: Path) -> Path:
        for name in ("a.png", "b.png"):
            _img(tmp_path / "images" / name)
        return tmp_path

    def test_a_first_row_with_a_bad_label_is_an_error_not_a_header(self, root: Path) -> None:
        (root / "labels.csv").write_text("a.png,cat\nb.png,1\n")
        with pytest.raises(DataError, match="line 1: class index 'cat' is not an integer"):
            ImageDataset(root, to_tensor)

    @pytest.mark.parametrize("header", ["file,class_index", "File,Class_Index", "path,label"])
    def test_headers(self, root: Path, header: str) -> None:
        (root / "labels.csv").write_text(f"{header}\na.png,1\nb.png,0\n")
        assert ImageDataset(root, to_tensor).targets == [1, 0]

    def test_first_data_row_is_kept(self, root: Path) -> None:
        (root / "labels.csv").write_text("a.png,1\nb.png,0\n")
        assert ImageDataset(root, to_tensor).targets == [1, 0]

    @pytest.mark.parametrize("second", ["a.png", "./a.png", "sub/../a.png"])
    def test_a_file_listed_twice_is_an_error(self, root: Path, second: str) -> None:
        (root / "images" / "sub").mkdir()
        (root / "labels.csv").write_text(f"file,class_index\na.png,1\nb.png,0\n{second},1\n")
        with pytest.raises(DataError, match="listed twice \\(first on line 2\\)"):
            ImageDataset(root, to_tensor)

    def test_a_file_listed_twice_through_a_link_is_an_error(self, root: Path) -> None:
        os.symlink(root / "images" / "a.png", root / "images" / "alias.png")
        (root / "labels.csv").write_text("a.png,1\nalias.png,1\n")
        with pytest.raises(DataError, match="are the same file"):
            ImageDataset(root, to_tensor)


class TestWidePixels:
    def test_16_bit_grey_png_is_scaled_not_clipped(self, tmp_path: Path) -> None:
        values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)[..., None]  # 0, 1, 128, 255 in 8 bits
        img = read_rgb(_png16(tmp_path / "g.png", values))
        assert img.mode == "RGB"
        assert np.asarray(img)[0, :, 0].tolist() == [0, 1, 128, 255]
        assert (np.asarray(img)[..., 0] == np.asarray(img)[..., 2]).all()

    def test_16_bit_rgb_png(self, tmp_path: Path) -> None:
        values = np.array([[[65535, 32896, 257]]], dtype=np.uint16)
        assert np.asarray(read_rgb(_png16(tmp_path / "c.png", values)))[0, 0].tolist() == [255, 128, 1]

    def test_16_bit_tiff(self, tmp_path: Path) -> None:
        Image.fromarray(np.array([[0, 65535, 514]], dtype=np.uint16)).save(tmp_path / "g.tif")
        assert np.asarray(read_rgb(tmp_path / "g.tif"))[0, :, 1].tolist() == [0, 255, 2]

    def test_float_tiff_in_unit_range(self, tmp_path: Path) -> None:
        Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
        assert np.asarray(read_rgb(tmp_path / "f.tif"))[0, :, 0].tolist() == [0, 128, 255]

    def test_float_tiff_out_of_range_is_refused(self, tmp_path: Path) -> None:
        Image.fromarray(np.array([[0.0, 200.0]], dtype=np.float32)).save(tmp_path / "f.tif")
        with pytest.raises(DataError, match=r"f.tif holds float pixels in \[0, 200\]"):
            read_rgb(tmp_path / "f.tif")

    def test_in_a_data_set(self, tmp_path: Path) -> None:
        (tmp_path / "cls").mkdir()
        _png16(tmp_path / "cls" / "g.png", np.full((2, 2, 1), 32896, dtype=np.uint16))
        x, y = ImageDataset(tmp_path, to_tensor)[0]
        assert y == 0 and x.unique().tolist() == [128]


def test_a_decompression_bomb_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _img(tmp_path / "cls" / "big.png", size=64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 = 4096 > 2 x 1000
    ds = ImageDataset(tmp_path, to_tensor)
    with pytest.raises(DataError, match="big.png is larger than Pillow's decompression-bomb limit") as caught:
        ds[0]
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_image_is_the_same_one_line_with_workers(tmp_path: Path, workers: int) -> None:
    for i in range(4):
        _img(tmp_path / "cls" / f"{i}.png")
    (tmp_path / "cls" / "2.png").write_bytes(b"\x89PNG not really")
    loader = make_loader(ImageDataset(tmp_path, to_tensor), batch_size=2, workers=workers)
    with pytest.raises(DataError) as caught:
        list(loader)
    assert type(caught.value) is DataError
    assert str(caught.value).startswith("cannot read image ") and "2.png" in str(caught.value)
    assert "\n" not in str(caught.value) and "Traceback" not in str(caught.value)


def test_loader_yields_what_a_dataloader_does(tmp_path: Path) -> None:
    for i in range(5):
        _img(tmp_path / "cls" / f"{i}.png", (i * 40, 0, 0))
    ds = ImageDataset(tmp_path, to_tensor)
    batches = list(make_loader(ds, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(3)))
    reference = list(torch.utils.data.DataLoader(ds, batch_size=2, shuffle=True,
                                                 generator=torch.Generator().manual_seed(3)))
    assert len(batches) == 3
    for (x, y), (rx, ry) in zip(batches, reference):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_an_empty_data_set_is_a_data_error() -> None:
    with pytest.raises(DataError, match="holds no images"):
        make_loader([], batch_size=4)
