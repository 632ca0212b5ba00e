"""Tiny float models shared by the SQAKD core tests (teachers of a few thousand parameters)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TinyCNN(nn.Module):
    """conv-relu-conv-relu-conv, residual add (signed), average pool, linear."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv1(x))
        h = h + self.conv3(torch.relu(self.conv2(h)))
        return self.fc(self.pool(h).flatten(1))


class MixedNet(nn.Module):
    """Plain, depthwise, grouped (no bias) and nested convolutions, a PReLU, two linears."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 8, 1, groups=2, bias=False)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 1), nn.PReLU())
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv1(x))
        h = self.block(self.grouped(torch.relu(self.dw(h))))
        return self.fc2(torch.relu(self.fc1(h.mean(dim=(2, 3)))))


MIXED_LAYERS = ["conv1", "dw", "grouped", "block.0", "fc1", "fc2"]


def normalised_images(count: int, size: int = 16) -> Tensor:
    """Stand-ins for normalised images: a colour per image plus pixel noise, so that (unlike
    white noise, which global pooling averages away) the logits depend on the image."""
    return torch.randn(count, 3, 1, 1) + 0.5 * torch.randn(count, 3, size, size)
