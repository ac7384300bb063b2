"""The two CIFAR-10 architectures that ``train`` and ``eval`` know, by name.

* ``net``: the seed's LeNet-style CNN (62k parameters), exactly as the seed wrote it, initialisation included.
* ``resnet``: a small ResNet with BatchNorm (three stages of one basic block, 16/32/64 channels, 78k
  parameters), so that runs have buffers (running statistics, an integer batch counter) to average and recalibrate.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ckpt_ema.cifar import ARCH_NAMES
from ckpt_ema.errors import CkptEmaError


class Net(nn.Module):
    """The seed's network: two 5x5 conv + max-pool stages, then three linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)
        self._init_()

    def _init_(self) -> None:
        for layer in self.modules():
            if isinstance(layer, nn.Linear):
                nn.init.xavier_normal_(layer.weight)
                nn.init.constant_(layer.bias, 0)
            # The seed tests for Conv1d, so its Conv2d layers keep PyTorch's default init. Kept as written: the
            # point is to reproduce the seed's run, quirks included.
            elif isinstance(layer, nn.Conv1d):
                nn.init.xavier_normal_(layer.weight)
                if layer.bias is not None:
                    nn.init.constant_(layer.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers with a residual connection (a 1x1 conv + BN when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A small CIFAR ResNet: a 3x3 stem, one basic block per stage (strides 1, 2, 2), global pooling, a linear head."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, in_channels = [], widths[0]
        for i, width in enumerate(widths):
            stages.append(BasicBlock(in_channels, width, stride=1 if i == 0 else 2))
            in_channels = width
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


ARCHS: dict[str, Callable[[], nn.Module]] = {"net": Net, "resnet": ResNet}
assert tuple(ARCHS) == ARCH_NAMES


def build_model(arch: str) -> nn.Module:
    """A freshly initialised model of the named architecture (initialised from torch's global RNG)."""
    if arch not in ARCHS:
        raise CkptEmaError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    return ARCHS[arch]()
