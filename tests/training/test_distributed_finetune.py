"""``polyglean train`` (fine-tuning) with DistributedDataParallel on 2 gloo processes equals one process with the
same global batch and seed, to float tolerance: ResNet-20 (BatchNorm normalising with the global batch's
statistics) on 9 real CIFAR-10 images in batches of 4, so the last batch holds one image and one rank none."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from polyglean.training.finetune import FinetuneSettings, finetune, read_checkpoint
from tests.distributed_utils import spawn

pytestmark = [pytest.mark.data, pytest.mark.slow]


def _settings(data: Path) -> FinetuneSettings:
    return FinetuneSettings(model="cifar10-resnet20", data=str(data), epochs=2, batch_size=4, lr=0.05, seed=0)


def _rank(rank: int, data: str, out: str) -> list[dict]:
    from polyglean.distributed import init_distributed

    torch.set_num_threads(1)
    ctx = init_distributed("cpu", timeout_s=120)
    return finetune(_settings(Path(data)), out, dist=ctx)


def test_two_processes_fine_tune_what_one_does(shared_data: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLYGLEAN_DATA", str(shared_data))
    data = tmp_path / "data"
    for cls in sorted(p for p in (shared_data / "cifar10-jpeg" / "train").iterdir() if p.is_dir())[:9]:
        (data / cls.name).mkdir(parents=True)
        image = sorted(cls.iterdir())[0]
        (data / cls.name / image.name).symlink_to(image)
    torch.set_num_threads(1)
    one = finetune(_settings(data), tmp_path / "one.pt")
    records = spawn(_rank, 2, tmp_path / "ranks", str(data), str(tmp_path / "two.pt"))
    assert all(r["ok"] for r in records), records
    for record in records:  # every rank returns the history rank 0 wrote
        for a, b in zip(one, record["value"], strict=True):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
            assert b["top1"] == a["top1"] and b["images"] == a["images"] == 9
    a = read_checkpoint(tmp_path / "one.pt")["state_dict"]
    b = read_checkpoint(tmp_path / "two.pt")["state_dict"]
    assert a.keys() == b.keys()
    for k, v in a.items():
        if v.is_floating_point():
            torch.testing.assert_close(b[k], v, atol=1e-4, rtol=1e-3, msg=k)
        else:
            assert torch.equal(b[k], v), k
    from polyglean.models import load_model

    start, _ = load_model("cifar10-resnet20")
    assert not torch.allclose(start.state_dict()["conv1.weight"], a["conv1.weight"])  # it did train
