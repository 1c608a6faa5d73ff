"""A phase sub-grid for sites with large factors: a ViT's 16x16 patch embedding searched at 16 of its 256 phases."""

from __future__ import annotations

import pytest
import timm
import torch

from polyglean import PhaseNet, PhaseSearch
from tests.zoo import lively


@pytest.fixture(scope="module")
def vit() -> tuple[torch.nn.Module, PhaseNet]:
    torch.manual_seed(0)
    model = lively(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64))
    return model, PhaseNet(model, (3, 64, 64))


def test_sub_grid_of_a_16x16_site(vit: tuple) -> None:
    _, net = vit
    search = PhaseSearch(net, budget=16, phase_stride=4, aggregate_on="logits")
    assert search.num_states == 16
    assert search._sub_grid(net.sites[0]) == [dy * 16 + dx for dy in (0, 4, 8, 12) for dx in (0, 4, 8, 12)]
    with pytest.raises(ValueError, match="budget 17 out of range.*16 states"):
        PhaseSearch(net, budget=17, phase_stride=4, aggregate_on="logits")
    assert PhaseSearch(net, budget=17, aggregate_on="logits").num_states == 256


def test_vit_search_runs_and_b1_is_exact(vit: tuple) -> None:
    model, net = vit
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(x)
        assert torch.equal(PhaseSearch(net, budget=1, phase_stride=4, aggregate_on="logits")(x), plain)
        result = PhaseSearch(net, budget=6, phase_stride=4, aggregate_on="logits").run(x, budgets=[1, 6])
    assert torch.equal(result.logits[1], plain)
    states = result.states[..., 0]
    assert states.shape == (2, 6) and bool((states // 16 % 4 == 0).all()) and bool((states % 16 % 4 == 0).all())
    assert all(len(set(s)) == 6 for s in states.tolist())  # six distinct states per image
    # each candidate is the model at that phase (checked against PhaseNet directly)
    with torch.no_grad():
        direct = net(x[:1], phases={"patch_embed.proj": divmod(int(states[0, 3]), 16)})
    torch.testing.assert_close(result.candidate_logits[0, 3], direct[0])
    assert not torch.equal(result.logits[6], plain)


def test_small_factors_keep_all_their_phases(vit: tuple) -> None:
    _, net = vit
    search = PhaseSearch(net, budget=2, phase_stride=32, aggregate_on="logits")
    assert search.num_states == 256  # 16 <= 32: the whole 16x16 grid
    with pytest.raises(ValueError, match="phase_stride must be an int >= 1"):
        PhaseSearch(net, phase_stride=0, aggregate_on="logits")
