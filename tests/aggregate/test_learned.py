"""The learned attention aggregator: starts as averaging, any budget, the learned criterion, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from polyglean import PhaseNet
from polyglean.aggregate import (
    AggregatorCheckpointError,
    AttentionAggregator,
    align,
    alignment_factor,
    load_aggregator,
    model_fingerprint,
    save_aggregator,
)
from polyglean.training.aggregator import CandidateSet, accuracy_by_budget, collect_candidates, train_epoch
from polyglean.search import PhaseSearch
from polyglean.search.criteria import LearnedCriterion
from tests.phase.test_net import lively


@pytest.fixture(scope="module")
def net() -> PhaseNet:
    torch.manual_seed(0)
    return PhaseNet(lively(torchvision.models.resnet18(num_classes=10)), input_size=(3, 64, 64))


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def trained_like(module: AttentionAggregator, seed: int = 0) -> AttentionAggregator:
    """The module with every parameter random, as after training (the output layer no longer zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module.eval()


class TestModule:
    @pytest.mark.parametrize("b", [1, 2, 7, 30])
    def test_starts_as_the_plain_average(self, b: int) -> None:
        agg = AttentionAggregator(16, grid=(8, 8))
        f = torch.randn(3, b, 16, 5, 6)
        shift = torch.randint(0, 8, (3, b, 2))
        torch.testing.assert_close(agg(f, shift), f.mean(1), rtol=0, atol=1e-6)

    def test_channels_last(self) -> None:
        agg = trained_like(AttentionAggregator(16, grid=(4, 4), spatial_dims=(1, 2)))
        ref = AttentionAggregator(16, grid=(4, 4))
        ref.load_state_dict(agg.state_dict())
        f = torch.randn(2, 5, 16, 3, 4)
        shift = torch.randint(0, 4, (2, 5, 2))
        out = agg(f.permute(0, 1, 3, 4, 2), shift)
        torch.testing.assert_close(out, ref(f, shift).permute(0, 2, 3, 1))

    def test_candidate_order_does_not_matter(self) -> None:
        agg = trained_like(AttentionAggregator(16, grid=(4, 4)))
        f = torch.randn(2, 6, 16, 3, 3)
        shift = torch.randint(0, 4, (2, 6, 2))
        perm = torch.randperm(6)
        torch.testing.assert_close(agg(f[:, perm], shift[:, perm]), agg(f, shift), rtol=1e-5, atol=1e-5)

    def test_trained_module_differs_from_the_average_and_uses_displacement(self) -> None:
        agg = trained_like(AttentionAggregator(16, grid=(4, 4)))
        f = torch.randn(2, 4, 16, 3, 3)
        s0 = torch.zeros(2, 4, 2, dtype=torch.long)
        s1 = torch.randint(1, 4, (2, 4, 2))
        assert not torch.allclose(agg(f, s0), f.mean(1), atol=1e-3)
        assert not torch.allclose(agg(f, s0), agg(f, s1), atol=1e-3)

    def test_each_location_is_independent(self) -> None:
        agg = trained_like(AttentionAggregator(8, grid=(2, 2)))
        f = torch.randn(1, 3, 8, 4, 4)
        shift = torch.randint(0, 2, (1, 3, 2))
        whole = agg(f, shift)
        part = agg(f[..., 1:3, 2:3], shift)
        torch.testing.assert_close(whole[..., 1:3, 2:3], part, rtol=1e-5, atol=1e-6)

    def test_attention_received_sums_to_one(self) -> None:
        agg = trained_like(AttentionAggregator(8, grid=(2, 2)))
        _, received = agg.attend(torch.randn(2, 5, 8, 3, 3), torch.randint(0, 2, (2, 5, 2)))
        torch.testing.assert_close(received.sum(1), torch.ones(2))

    @pytest.mark.parametrize("kwargs, message", [
        ({"channels": 8, "grid": (2, 2), "dim": 10, "heads": 4}, "must divide"),
        ({"channels": 0, "grid": (2, 2)}, ">= 1"),
        ({"channels": 8, "grid": (0, 2)}, "grid"),
        ({"channels": 8, "grid": (2, 2), "spatial_dims": (0, 1)}, "spatial_dims"),
    ])
    def test_bad_arguments(self, kwargs: dict, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            AttentionAggregator(**kwargs)

    def test_bad_input(self) -> None:
        agg = AttentionAggregator(8, grid=(2, 2))
        with pytest.raises(ValueError, match="8 channels"):
            agg(torch.randn(1, 2, 7, 3, 3), torch.zeros(1, 2, 2, dtype=torch.long))
        with pytest.raises(ValueError, match="outside the grid"):
            agg(torch.randn(1, 2, 8, 3, 3), torch.full((1, 2, 2), 2))
        with pytest.raises(ValueError, match=r"\(N, B, 2\)"):
            agg(torch.randn(1, 2, 8, 3, 3), torch.zeros(1, 3, 2, dtype=torch.long))
        with pytest.raises(ValueError, match="features must be"):
            agg(torch.randn(2, 8, 3, 3), torch.zeros(1, 2, 2, dtype=torch.long))


class TestInSearch:
    def test_untrained_module_equals_mean_aggregation(self, net: PhaseNet, x: torch.Tensor) -> None:
        first = net.sites[1].index
        agg = AttentionAggregator(512, alignment_factor([s.factor for s in net.sites], first))
        mean = PhaseSearch(net, budget=10, criterion="entropy", aggregate="mean").run(x, [1, 4, 10])
        learned = PhaseSearch(net, budget=10, criterion="entropy", aggregate=agg).run(x, [1, 4, 10])
        assert torch.equal(mean.logits[1], learned.logits[1])
        for b in (4, 10):
            torch.testing.assert_close(learned.logits[b], mean.logits[b], rtol=1e-5, atol=1e-5)

    def test_learned_criterion_orders_by_current_attention(self, net: PhaseNet, x: torch.Tensor) -> None:
        grid = alignment_factor([s.factor for s in net.sites], 1)
        agg = trained_like(AttentionAggregator(512, grid))
        search = PhaseSearch(net, budget=12, criterion="learned", aggregate=agg)
        r = search.run(x)
        feats = align(r.features.flatten(0, 1), r.shift.reshape(-1, 2), grid).reshape(r.features.shape)
        for i in range(len(x)):  # the scores left on the candidates are those of the final candidate set
            _, received = agg.attend(feats[i:i + 1], r.shift[i:i + 1])
            torch.testing.assert_close(r.scores[i], 1.0 / received[0], rtol=1e-4, atol=1e-4)
        # and the order differs from that of other criteria: it does steer the search
        other = PhaseSearch(net, budget=12, criterion="entropy", aggregate="mean").run(x)
        assert not torch.equal(r.states, other.states)

    def test_learned_needs_a_module(self, net: PhaseNet) -> None:
        with pytest.raises(ValueError, match="trained module"):
            PhaseSearch(net, budget=4, aggregate="learned")
        with pytest.raises(ValueError, match="learned aggregator"):
            PhaseSearch(net, budget=4, criterion="learned", aggregate="mean")
        agg = AttentionAggregator(512, (16, 16))
        with pytest.raises(ValueError, match="aggregate_on"):
            PhaseSearch(net, budget=4, criterion=LearnedCriterion(agg), aggregate_on="logits")


class TestCheckpoint:
    def meta(self, **kw) -> dict:
        return {"model": "m", "model_sha256": "abc", "sites": ["a", "b"], "search_space": ["b"], "align": True, **kw}

    def test_round_trip_and_refusals(self, tmp_path: Path) -> None:
        agg = trained_like(AttentionAggregator(8, grid=(4, 4), dim=16, heads=2))
        path = tmp_path / "agg.pt"
        save_aggregator(path, agg, meta=self.meta())
        back = load_aggregator(path, model="m", fingerprint="abc", search_space=["b"], align=True)
        f, s = torch.randn(2, 3, 8, 2, 2), torch.randint(0, 4, (2, 3, 2))
        assert torch.equal(back(f, s), agg(f, s))
        with pytest.raises(AggregatorCheckpointError, match="trained for model 'm', not 'other'"):
            load_aggregator(path, model="other")
        with pytest.raises(AggregatorCheckpointError, match="other weights"):
            load_aggregator(path, model="m", fingerprint="def")
        with pytest.raises(AggregatorCheckpointError, match="search space"):
            load_aggregator(path, search_space=["a", "b"])
        with pytest.raises(AggregatorCheckpointError, match="aligned features"):
            load_aggregator(path, align=False)

    def test_bad_files(self, tmp_path: Path) -> None:
        with pytest.raises(AggregatorCheckpointError, match="does not exist"):
            load_aggregator(tmp_path / "missing.pt")
        (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
        with pytest.raises(AggregatorCheckpointError, match="cannot read"):
            load_aggregator(tmp_path / "junk.pt")
        torch.save({"state_dict": {}}, tmp_path / "other.pt")
        with pytest.raises(AggregatorCheckpointError, match="not a polyglean aggregator"):
            load_aggregator(tmp_path / "other.pt")
        with pytest.raises(ValueError, match="lacks"):
            save_aggregator(tmp_path / "x.pt", AttentionAggregator(8, (2, 2)), meta={"model": "m"})

    def test_fingerprint_follows_the_weights(self) -> None:
        a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
        assert model_fingerprint(a) != model_fingerprint(b)
        b.load_state_dict(a.state_dict())
        assert model_fingerprint(a) == model_fingerprint(b)


class TestTraining:
    def test_cached_prefix_is_the_random_search_at_that_budget(self, net: PhaseNet, x: torch.Tensor) -> None:
        search = PhaseSearch(net, budget=12, criterion="random", aggregate="mean", align=False, seed=3)
        data = collect_candidates(search, [(x, torch.tensor([0, 1, 2]))])
        small = PhaseSearch(net, budget=5, criterion="random", aggregate="mean", align=False, seed=3).run(x)
        assert torch.equal(data.shift[:, :5], small.shift)
        torch.testing.assert_close(data.features[:, :5].float(), small.features.half().float())

    def test_training_learns_a_separable_task(self, tmp_path: Path) -> None:
        # Only the candidate with displacement (1, 1) carries the class; averaging dilutes it, attention can find it.
        g = torch.Generator().manual_seed(0)
        n, b, c = 256, 4, 8
        y = torch.randint(0, 2, (n,), generator=g)
        f = torch.randn(n, b, c, 1, 1, generator=g) * 2
        shift = torch.stack([torch.randperm(4, generator=g) for _ in range(n)])  # each image: 4 distinct codes
        shift = torch.stack([shift // 2, shift % 2], -1)
        key = (shift == 1).all(-1)
        f[key] = 0.0
        f[key, 0, 0, 0] = (y * 2 - 1).float() * 3
        data = CandidateSet(f.half(), shift, y)
        head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(c, 2))
        with torch.no_grad():
            head[1].weight.zero_()
            head[1].weight[1, 0], head[1].weight[0, 0] = 1.0, -1.0
            head[1].bias.zero_()
        for p in head.parameters():
            p.requires_grad_(False)
        agg = AttentionAggregator(c, grid=(2, 2), dim=16, heads=2)
        before = accuracy_by_budget(agg, head, data, [4])[4]["nll"]
        opt = torch.optim.AdamW(agg.parameters(), lr=3e-3)
        for epoch in range(15):
            train_epoch(agg, head, data, opt, None, batch_size=32, generator=torch.Generator().manual_seed(epoch),
                        min_budget=4)
        after = accuracy_by_budget(agg, head, data, [4])[4]
        assert after["nll"] < 0.7 * before
        assert after["top1"] > accuracy_by_budget(None, head, data, [4])[4]["top1"]
