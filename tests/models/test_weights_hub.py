"""Finding and downloading preset weights, without ever touching the network."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch.hub

from polyglean.models import CheckpointError, WeightsUnavailableError, hub
from polyglean.models.hub import check_hash_prefix, default_search_dirs, download_weights, find_weights, hash_prefix
from polyglean.models.presets import CIFAR_RESNET_URL, cifar_resnet_weights


def test_search_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("POLYGLEAN_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.chdir(tmp_path)
    dirs = default_search_dirs("cifar10-resnet")
    assert dirs[0] == tmp_path / "data" / "weights" / "cifar10-resnet"
    assert dirs[-1].name == "checkpoints"
    # only the documented places: never relative to the working directory
    assert dirs == [tmp_path / "data" / "weights" / "cifar10-resnet", tmp_path / "th" / "hub" / "checkpoints"]
    monkeypatch.delenv("POLYGLEAN_DATA")
    assert default_search_dirs("cifar10-resnet") == [tmp_path / "th" / "hub" / "checkpoints"]


def test_a_planted_file_in_the_working_directory_is_never_used(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    planted = tmp_path / "shared" / "data" / "weights" / "cifar10-resnet"
    planted.mkdir(parents=True)
    torch.save({"state_dict": {}}, planted / "resnet20-12fca82f.th")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.delenv("POLYGLEAN_DATA", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert find_weights("resnet20-12fca82f.th", default_search_dirs("cifar10-resnet")) is None


def test_hash_in_the_name_is_checked(tmp_path: Path) -> None:
    good = tmp_path / f"w-{hashlib.sha256(b'published').hexdigest()[:8]}.th"
    good.write_bytes(b"published")
    assert find_weights(good.name, [tmp_path]) == good
    bad = tmp_path / "resnet20-12fca82f.th"
    torch.save({"state_dict": {"w": torch.full((2,), float("nan"))}}, bad)
    digest = hashlib.sha256(bad.read_bytes()).hexdigest()[:8]
    with pytest.raises(CheckpointError, match=f"resnet20-12fca82f.th' is not the published one.*beginning "
                                              f"12fca82f, the file's begins {digest}"):
        find_weights(bad.name, [tmp_path / "missing", tmp_path])
    assert hash_prefix("efficientnet-lite0-57934424.pth") == "57934424" and hash_prefix("plain.pt") is None


@pytest.mark.data
def test_the_published_files_satisfy_their_names(shared_data: Path) -> None:
    for path in sorted((shared_data / "weights" / "cifar10-resnet").glob("*.th")):
        assert check_hash_prefix(path) == path
        assert hashlib.sha256(path.read_bytes()).hexdigest().startswith(hash_prefix(path.name))


def test_find_first_hit(tmp_path: Path) -> None:  # names without a hash: nothing to check
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
    monkeypatch.setattr(hub, "_sha256", lambda path: "014dd654" + "0" * 56)  # the fake download is not the file
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    path = cifar_resnet_weights(44, search_dirs=[tmp_path / "none"])
    assert path == tmp_path / "th" / "hub" / "checkpoints" / "resnet44-014dd654.th"
    assert calls == [(CIFAR_RESNET_URL.format(file="resnet44-014dd654.th"), str(path), "014dd654")]
    assert cifar_resnet_weights(44, search_dirs=[tmp_path / "none"]) == path  # cached: no second call
    assert len(calls) == 1
    monkeypatch.undo()  # the real hash: a cached file that is not the published one is refused
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(CheckpointError, match="resnet44-014dd654.th' is not the published one"):
        cifar_resnet_weights(44, search_dirs=[tmp_path / "none"])


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
