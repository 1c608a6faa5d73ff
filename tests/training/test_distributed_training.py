"""The aggregator trained with DistributedDataParallel on 2 gloo processes equals one process with the same global
batch and seed (to float tolerance), including a last batch smaller than the number of processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from polyglean.aggregate import AttentionAggregator
from polyglean.training.aggregator import CandidateSet, train_epoch
from tests.distributed_utils import spawn

N, BUDGET, CHANNELS, CLASSES = 17, 4, 8, 5  # 17 images in batches of 8: the last batch holds one image


def _data() -> CandidateSet:
    g = torch.Generator().manual_seed(5)
    return CandidateSet(torch.randn(N, BUDGET, CHANNELS, 4, 4, generator=g).half(),
                        torch.randint(0, 4, (N, BUDGET, 2), generator=g), torch.randint(0, CLASSES, (N,), generator=g))


def _head() -> torch.nn.Module:
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(CHANNELS, CLASSES))


def _train(dist=None) -> tuple[dict[str, torch.Tensor], list[float]]:
    torch.manual_seed(3)
    module = AttentionAggregator(CHANNELS, (4, 4), dim=8, heads=2)
    torch.nn.init.normal_(module.mlp[-1].weight, std=0.1)
    head = _head()
    for p in head.parameters():
        p.requires_grad_(False)
    model = module
    if dist is not None:
        model = torch.nn.parallel.DistributedDataParallel(module)
    # SGD: Adam would blow float noise up to full steps where the true gradient is zero (the attention's key
    # bias, which softmax ignores), so the comparison would test Adam, not the gradients.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    losses = []
    for epoch in range(2):
        losses.append(train_epoch(model, head, _data(), optimizer, None, batch_size=8,
                                  generator=torch.Generator().manual_seed(epoch), dist=dist))
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, losses


def _rank(rank: int, out: str) -> list[float]:
    from polyglean.distributed import init_distributed

    ctx = init_distributed("cpu", timeout_s=60)
    state, losses = _train(ctx)
    torch.save(state, Path(out) / f"state{rank}.pt")
    return losses


@pytest.mark.slow
def test_ddp_matches_one_process(tmp_path: Path) -> None:
    expected, losses = _train()
    records = spawn(_rank, 2, tmp_path, str(tmp_path))
    assert all(r["ok"] for r in records), records
    for rank in range(2):
        assert records[rank]["value"] == pytest.approx(losses, rel=1e-5)
        state = torch.load(tmp_path / f"state{rank}.pt", weights_only=True)
        for k, v in expected.items():
            torch.testing.assert_close(state[k], v, atol=1e-5, rtol=1e-4, msg=k)
    changed = AttentionAggregator(CHANNELS, (4, 4), dim=8, heads=2).state_dict()
    assert not torch.allclose(changed["qkv.weight"], expected["qkv.weight"])  # it did train
