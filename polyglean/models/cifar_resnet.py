"""ResNets for CIFAR-10 (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, section 4.2).

A 3x3 convolution with 16 filters, then three stages of ``n`` basic blocks with 16, 32 and 64 filters on feature
maps of 32, 16 and 8 pixels (the first block of stages 2 and 3 subsamples with stride 2), global average pooling
and a 10-way linear layer: ``6n + 2`` weighted layers (ResNet-20/32/44/56 for n = 3/5/7/9).

Shortcuts are the paper's "option A": identity, and where the shape changes, subsampling by taking every second
pixel and zero-padding the new channels — parameter-free, so a downsampling shortcut is a subsampling layer in its
own right (:class:`ShortcutA`, traceable by ``torch.fx``).

Module names follow the public checkpoints of Yerlan Idelbayev (``akamaster/pytorch_resnet_cifar10``) so those
load strictly once the ``module.`` prefix is stripped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "ShortcutA",
    "cifar_resnet",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "shortcut_a",
]


def shortcut_a(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Option-A shortcut: keep every second row and column, then zero-pad ``pad`` channels on each side.

    Args:
        x: the block input.
        pad: channels of zeros added before and after the existing ones.

    Returns:
        The subsampled, widened input.

    Shape:
        - x: :math:`(N, C, H, W)`
        - output: :math:`(N, C + 2 \\cdot pad, \\lceil H/2 \\rceil, \\lceil W/2 \\rceil)`

    Example:
        >>> shortcut_a(torch.ones(1, 16, 32, 32), 8).shape
        torch.Size([1, 32, 16, 16])
    """
    return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad), "constant", 0.0)


class ShortcutA(nn.Module):
    """Module form of :func:`shortcut_a` (no parameters, no state).

    Args:
        pad: channels of zeros added before and after the existing ones.
    """

    def __init__(self, pad: int) -> None:
        super().__init__()
        if pad < 0:
            raise ValueError(f"ShortcutA pad must be >= 0, got {pad}")
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Subsample and zero-pad ``x`` (see :func:`shortcut_a`)."""
        return shortcut_a(x, self.pad)

    def extra_repr(self) -> str:
        return f"pad={self.pad}, stride=2"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection.

    Args:
        in_planes: input channels.
        planes: output channels.
        stride: stride of the first convolution (1 or 2).
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            if stride != 2 or planes != 2 * in_planes:
                raise ValueError(
                    "option-A shortcut needs stride 2 and doubled channels, "
                    f"got stride {stride}, {in_planes} -> {planes}"
                )
            self.shortcut = ShortcutA(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` basic blocks, the first with ``stride`` and ``in_planes -> planes`` channels."""
    layers = [BasicBlock(in_planes, planes, stride)]
    layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs with three stages of basic blocks.

    Args:
        num_blocks: blocks in each of the three stages.
        num_classes: output classes.

    Shape:
        - input: :math:`(N, 3, H, W)`, 32x32 for the published weights
        - output: :math:`(N, num\\_classes)`
    """

    def __init__(self, num_blocks: tuple[int, int, int], *, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = _make_stage(16, 16, num_blocks[0], stride=1)
        self.layer2 = _make_stage(16, 32, num_blocks[1], stride=2)
        self.layer3 = _make_stage(32, 64, num_blocks[2], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(self.avgpool(out), 1)
        return self.linear(out)


def cifar_resnet(depth: int, *, num_classes: int = 10) -> CifarResNet:
    """A CIFAR ResNet of the given depth, randomly initialised.

    Args:
        depth: ``6n + 2`` weighted layers (20, 32, 44, 56, 110, ...).
        num_classes: output classes.

    Raises:
        ValueError: ``depth`` is not of the form ``6n + 2`` with n >= 1.
    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56, 110, ...), got {depth}")
    n = (depth - 2) // 6
    return CifarResNet((n, n, n), num_classes=num_classes)


def cifar_resnet20(*, num_classes: int = 10) -> CifarResNet:
    """ResNet-20 for CIFAR (3 blocks per stage, 0.27M parameters)."""
    return cifar_resnet(20, num_classes=num_classes)


def cifar_resnet32(*, num_classes: int = 10) -> CifarResNet:
    """ResNet-32 for CIFAR (5 blocks per stage, 0.46M parameters)."""
    return cifar_resnet(32, num_classes=num_classes)


def cifar_resnet44(*, num_classes: int = 10) -> CifarResNet:
    """ResNet-44 for CIFAR (7 blocks per stage, 0.66M parameters)."""
    return cifar_resnet(44, num_classes=num_classes)


def cifar_resnet56(*, num_classes: int = 10) -> CifarResNet:
    """ResNet-56 for CIFAR (9 blocks per stage, 0.85M parameters)."""
    return cifar_resnet(56, num_classes=num_classes)
