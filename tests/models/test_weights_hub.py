"""Finding and downloading preset weights, without ever touching the network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.hub

from polyglean.models import WeightsUnavailableError
from polyglean.models.hub import default_search_dirs, download_weights, find_weights
from polyglean.models.presets import CIFAR_RESNET_URL, cifar_resnet_weights


def test_search_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("POLYGLEAN_DATA", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    dirs = default_search_dirs("cifar10-resnet")
    assert dirs[0] == tmp_path / "data" / "weights" / "cifar10-resnet"
    assert dirs[1] == tmp_path.parent / "shared" / "data" / "weights" / "cifar10-resnet"
    assert dirs[-1].name == "checkpoints"


def test_find_first_hit(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    (tmp_path / "b" / "w.th").write_bytes(b"1")
    (tmp_path / "c" / "w.th").write_bytes(b"2")
    assert find_weights("w.th", [tmp_path / "a", tmp_path / "b", tmp_path / "c"]) == tmp_path / "b" / "w.th"
    assert find_weights("x.th", [tmp_path / "b"]) is None


def test_download_goes_to_cache_with_hash(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[tuple[str, str, str | None]] = []

    def fake(url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
        assert progress is False
        calls.append((url, dst, hash_prefix))
        Path(dst).write_bytes(b"weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    path = cifar_resnet_weights(44, search_dirs=[tmp_path / "none"])
    assert path == tmp_path / "th" / "hub" / "checkpoints" / "resnet44-014dd654.th"
    assert calls == [(CIFAR_RESNET_URL.format(file="resnet44-014dd654.th"), str(path), "014dd654")]
    assert cifar_resnet_weights(44, search_dirs=[tmp_path / "none"]) == path  # cached: no second call
    assert len(calls) == 1


def test_offline_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("Network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsUnavailableError, match="resnet56-4bfd9763.th.*offline.*weights=PATH.*--weights"):
        download_weights(
            CIFAR_RESNET_URL.format(file="resnet56-4bfd9763.th"), tmp_path
        )


def test_unknown_depth() -> None:
    with pytest.raises(ValueError, match="no published CIFAR-10 ResNet weights for depth 110"):
        cifar_resnet_weights(110)
