"""Factories for ``compress inspect package.module:factory --input-shape ...`` in tests/test_cli.py."""

from __future__ import annotations

import torch
from torch import nn

NOT_CALLABLE = 3


class SmallCNN(nn.Module):
    """[N, 3, H, W] -> conv(3→8)-bn-relu -> conv(8→16)-relu -> global average pool -> linear(16→10)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(x.mean(dim=(2, 3)))


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN()


def not_a_module():
    return {"conv": "not a module"}


def broken() -> nn.Module:
    raise ValueError("weights missing")
