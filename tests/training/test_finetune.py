"""polyglean.training.finetune: pretrained initialisation through the swap, atomic checkpoints, strict reloading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from polyglean.training.finetune import (
    CHECKPOINT_FORMAT,
    DOWNSAMPLES,
    build_model,
    load_finetuned,
    make_optimizer,
    read_checkpoint,
    save_checkpoint,
    train_transform,
)
from polyglean.layers import swap_key_map
from polyglean.models import CheckpointError, Preprocess, load_model


def test_save_checkpoint_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"epoch": 1, "state_dict": {"w": torch.ones(2)}})
    assert read_checkpoint(path)["epoch"] == 1 and read_checkpoint(path)["format"] == CHECKPOINT_FORMAT

    def broken_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"epoch": 2, "state_dict": {"w": torch.zeros(2)}})
    assert read_checkpoint(path)["epoch"] == 1  # the previous checkpoint survives
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # and no temporary file is left


def test_read_checkpoint_rejects_other_files(tmp_path: Path) -> None:
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(1)}, plain)
    with pytest.raises(CheckpointError, match="not a polyglean fine-tuning checkpoint"):
        read_checkpoint(plain)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "missing.pt")


def test_registries_list_known_names() -> None:
    assert DOWNSAMPLES.names() == ["adapool", "aps", "blurpool", "pasa", "softpool"]
    with pytest.raises(ValueError, match="unknown downsample layer 'maxblur'"):
        DOWNSAMPLES.get("maxblur")
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'; choose one of: adamw, sgd"):
        make_optimizer("lamb", [torch.nn.Parameter(torch.ones(1))], lr=0.1)


def test_train_transform_crops_and_flips() -> None:
    pre = Preprocess.resize_crop(resize=32, crop=32)
    image = Image.fromarray((torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy())
    outs = []
    for seed in range(8):
        torch.manual_seed(seed)
        outs.append(train_transform(pre)(image))
    assert all(o.shape == (3, 32, 32) for o in outs)
    assert len({o.sum().item() for o in outs}) > 1  # random crops/flips differ


@pytest.mark.data
@pytest.mark.parametrize("downsample", DOWNSAMPLES.names())
def test_build_model_starts_from_the_pretrained_weights(shared_data: Path, monkeypatch: pytest.MonkeyPatch,
                                                        downsample: str) -> None:
    monkeypatch.setenv("POLYGLEAN_DATA", str(shared_data))
    pretrained, _ = load_model("cifar10-resnet20")
    model, pre = build_model("cifar10-resnet20", downsample)
    assert pre.input_size == (3, 32, 32)
    key_map, state = swap_key_map(model), model.state_dict()
    for key, value in pretrained.state_dict().items():
        assert torch.equal(state[key_map.get(key, key)], value), key


@pytest.mark.data
def test_load_finetuned_checks_the_recorded_architecture(shared_data: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLYGLEAN_DATA", str(shared_data))
    model, _ = build_model("cifar10-resnet20", "blurpool")
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    path = tmp_path / "b.pt"
    save_checkpoint(path, {"model": "cifar10-resnet20", "downsample": "blurpool", "state_dict": model.state_dict()})
    loaded, _ = load_finetuned("cifar10-resnet20", "blurpool", path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    with pytest.raises(CheckpointError, match="with downsample 'blurpool', not 'cifar10-resnet20' with 'pasa'"):
        load_finetuned("cifar10-resnet20", "pasa", path)
