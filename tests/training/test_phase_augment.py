"""Phase states as a training augmentation: the draws, train mode in the phase graph, gradients, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polyglean.errors import ArgumentError, ModelError
from polyglean.models import cifar_resnet20
from polyglean.training.phase_augment import PhaseAugmented, check_probability, resolve_sites
from tests.reference import reference_forward


def _resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cifar_resnet20()


class _Tiny(nn.Module):
    """conv (stride 2) -> BN -> ReLU -> conv (stride 2) -> BN -> dropout -> pool -> linear."""

    def __init__(self, norm: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(4) if norm else nn.Identity()
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(6) if norm else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.drop(F.relu(self.bn2(self.conv2(x))))
        return self.fc(x.mean((-2, -1)))


def test_probability_is_checked() -> None:
    assert check_probability(0) == 0.0 and check_probability("0.25") == 0.25
    for bad in (-0.1, 1.5, "half", True, None):
        with pytest.raises(ArgumentError, match="probability in \\[0, 1\\]"):
            check_probability(bad)


def test_draws_follow_p_and_the_sites() -> None:
    model = _resnet()
    never = PhaseAugmented(model, (3, 32, 32), p=0.0, seed=3)
    assert not never.draw(256).any()
    always = PhaseAugmented(model, (3, 32, 32), p=1.0, seed=3)
    states = always.draw(4000)
    assert states.shape == (4000, 2)
    for site in always.sites:  # uniform over the R^2 = 4 phases of each site
        counts = torch.bincount(states[:, site.index], minlength=4).double() / 4000
        assert counts.sub(0.25).abs().max() < 0.04
    half = PhaseAugmented(model, (3, 32, 32), p=0.5, seed=3)
    drawn = half.draw(4000)
    share = (drawn.any(1)).double().mean()  # augmented images draw the default state too, 1 time in 16
    assert abs(share - 0.5 * 15 / 16) < 0.04
    half.reseed(3)
    assert torch.equal(half.draw(4000), drawn)  # reproducible from the seed
    # the same random numbers for any p: the augmented images of p = 0.5 are drawn as for p = 1
    keep = drawn.any(1)
    assert torch.equal(drawn[keep], states[keep])


def test_sites_choice() -> None:
    torch.manual_seed(0)
    import torchvision

    model = torchvision.models.resnet18(num_classes=4).eval()
    aug = PhaseAugmented(model, (3, 64, 64), p=1.0)
    assert aug.site_names == ["maxpool", "layer2.0", "layer3.0"]  # the search's default space
    assert [s.name for s in resolve_sites(aug.net, "all")] == ["conv1", "maxpool", "layer2.0", "layer3.0",
                                                                 "layer4.0"]
    assert [s.name for s in resolve_sites(aug.net, "layer4.0, conv1")] == ["conv1", "layer4.0"]
    states = PhaseAugmented(model, (3, 64, 64), p=1.0, sites=["layer4.0"]).draw(64)
    assert states[:, :4].eq(0).all() and states[:, 4].ne(0).any()
    with pytest.raises(ArgumentError, match="unknown site 'layer9'"):
        resolve_sites(aug.net, "layer9")
    with pytest.raises(ArgumentError, match="names no site"):
        resolve_sites(aug.net, ",")


def test_default_state_is_ordinary_training_bit_for_bit() -> None:
    """Training through the phase graph at the default state gives the weights ordinary training gives."""
    plain = _resnet()
    traced = copy.deepcopy(plain)
    augmented = PhaseAugmented(traced, (3, 32, 32), p=1.0)
    augmented.train()
    plain.train()
    opt_a = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(traced.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        for model, opt, kwargs in ((plain, opt_a, {}), (augmented, opt_b, {"states": torch.zeros(8, 2).long()})):
            loss = F.cross_entropy(model(x, **kwargs), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for (name, a), b in zip(plain.state_dict().items(), traced.state_dict().values()):
        assert torch.equal(a, b), name  # parameters and BatchNorm's running statistics


def test_train_mode_state_equals_the_reference_executor() -> None:
    """A uniform phase state in training mode (batch statistics) equals the independent reference executor run on
    the model in training mode; per-image states equal it image by image (no BatchNorm to couple the images)."""
    model = _resnet(2)
    reference_model = copy.deepcopy(model)
    augmented = PhaseAugmented(model, (3, 32, 32), p=1.0).train()
    reference_net = PhaseAugmented(reference_model, (3, 32, 32), p=1.0).net
    reference_model.train()
    x = torch.randn(6, 3, 32, 32)
    states = torch.tensor([[1, 3]] * 6)
    with torch.no_grad():
        out = augmented(x, states)
    expected = reference_forward(reference_net, x, {0: (0, 1), 1: (1, 1)})
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(model.layer3[0].bn1.running_mean, reference_model.layer3[0].bn1.running_mean)

    torch.manual_seed(0)
    tiny = _Tiny(norm=False)
    augmented = PhaseAugmented(tiny, (3, 16, 16), p=1.0, sites="all").train()
    states = torch.tensor([[0, 1], [2, 3], [3, 0]])
    torch.manual_seed(4)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        out = augmented(x, states)
    for i, (a, b) in enumerate(states.tolist()):
        expected = reference_forward(augmented.net, x[i:i + 1], {0: divmod(a, 2), 1: divmod(b, 2)})
        torch.testing.assert_close(out[i:i + 1], expected, rtol=1e-5, atol=1e-6)


def test_gradcheck_of_a_phase_state_training_step() -> None:
    """The gradient of a training step's loss at per-image phase states (BatchNorm in training mode) with respect
    to the input and to the weights of both subsampling convs, checked against finite differences."""
    torch.manual_seed(0)
    model = _Tiny().double()
    augmented = PhaseAugmented(model, (3, 10, 10), p=1.0, sites="all").train()
    states = torch.tensor([[1, 2], [3, 0], [0, 3], [2, 1]])
    y = torch.tensor([0, 2, 1, 2])
    names = ["conv1.weight", "conv2.weight", "conv2.bias"]

    def step_loss(x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        params = dict(zip(names, weights))
        logits = torch.func.functional_call(augmented, {f"net.model.{k}": v for k, v in params.items()},
                                            (x, states))
        return F.cross_entropy(logits, y)

    x = torch.randn(4, 3, 10, 10, dtype=torch.double, requires_grad=True)
    weights = [model.get_parameter(n).detach().clone().requires_grad_(True) for n in names]
    assert torch.autograd.gradcheck(step_loss, (x, *weights), eps=1e-6, atol=1e-5)
    # and the phase states do change the gradient (a check that can fail)
    loss = step_loss(x, *weights)
    grad = torch.autograd.grad(loss, weights[0])[0]
    default = F.cross_entropy(augmented(x, torch.zeros_like(states)), y)
    grad0 = torch.autograd.grad(default, model.conv1.weight)[0]
    assert not torch.allclose(grad, grad0)


def test_eval_mode_is_the_model() -> None:
    model = _resnet().eval()
    augmented = PhaseAugmented(model, (3, 32, 32), p=1.0).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(augmented(x), model(x))
    assert augmented.model is model and not any(m.training for m in model.modules())


def test_mode_dependent_functions_are_refused() -> None:
    class FunctionalNorm(_Tiny):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv1(x)
            x = F.batch_norm(x, self.bn1.running_mean, self.bn1.running_var, self.bn1.weight, self.bn1.bias,
                             training=self.training)
            return self.fc(self.conv2(F.relu(x)).mean((-2, -1)))

    with pytest.raises(ModelError, match="calls batch_norm\\(\\) in its forward"):
        PhaseAugmented(FunctionalNorm(), (3, 16, 16), p=0.5)

    class FunctionalDropout(_Tiny):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.dropout(self.conv2(F.relu(self.conv1(x))), p=0.3, training=self.training)
            return self.fc(x.mean((-2, -1)))

    with pytest.raises(ModelError, match="calls dropout\\(\\)"):
        PhaseAugmented(FunctionalDropout(), (3, 16, 16), p=0.5)
    PhaseAugmented(_Tiny(dropout=0.3), (3, 16, 16), p=0.5)  # a dropout module follows the mode: accepted


def test_a_model_without_sites_is_refused() -> None:
    with pytest.raises(ArgumentError, match="no subsampling sites"):
        PhaseAugmented(nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten()), (3, 8, 8), p=0.5)


def test_modes_are_restored_after_tracing() -> None:
    model = _Tiny(dropout=0.5).train()
    PhaseAugmented(model, (3, 16, 16), p=0.5, sites="all")
    assert all(m.training for m in model.modules())


def test_a_dropout_probability_read_by_forward_is_refused() -> None:
    class ReadsP(_Tiny):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv2(F.relu(self.conv1(x)))
            p = self.drop.p if self.training else 0.0  # as attention reads its dropout for SDPA
            return self.fc(F.dropout(x, p=p).mean((-2, -1)) if p else x.mean((-2, -1)))

    with pytest.raises(ModelError, match="dropout module 'drop' \\(p=0.3\\)"):
        PhaseAugmented(ReadsP(dropout=0.3), (3, 16, 16), p=0.5)
    PhaseAugmented(ReadsP(dropout=0.0), (3, 16, 16), p=0.5)  # p = 0: nothing was traced away
