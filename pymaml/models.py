"""Reference models shared by the tests, benchmarks and examples.

* :class:`MLP` — the sinusoid-regression network of Finn et al. (2017): ``1-40-40-1`` with ReLU.
* :class:`ConvNet` — the 4-block convolutional net of the MAML paper: ``blocks`` × [3×3 conv
  (padding 1), BatchNorm, ReLU, 2×2 max-pool], flattened, then a linear head. Omniglot size is
  ``ConvNet(1, 5, 64, 28)``; MiniImageNet size is ``ConvNet(3, 5, 32, 84)``.
* :class:`OmniglotNet` — the MAML paper's Omniglot network as the authors ran it: strided
  convolutions instead of max-pooling (what ``pymaml train omniglot`` meta-trains).

Both expose ``features(x)`` (everything but the last layer, flattened) and ``head`` (the last
``nn.Linear``), with ``forward(x) == head(features(x))``; head-only algorithms (ANIL) and the
closed-form head HVPs rely on that split.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["MLP", "ConvNet", "OmniglotNet"]


class MLP(nn.Module):
    """Fully connected net ``sizes[0] → … → sizes[-1]`` with ReLU between layers."""

    def __init__(self, sizes: Sequence[int] = (1, 40, 40, 1)):
        super().__init__()
        sizes = tuple(int(s) for s in sizes)
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"MLP: sizes must hold at least two positive ints, got {sizes}")
        self.sizes = sizes
        layers = []
        for a, b in zip(sizes[:-2], sizes[1:-1]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(sizes[-2], sizes[-1])

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class ConvNet(nn.Module):
    """``blocks`` × [conv3×3(hidden), BatchNorm, ReLU, max-pool 2×2] → flatten → ``head``."""

    def __init__(self, in_channels: int = 1, ways: int = 5, hidden: int = 64, image_size: int = 28,
                 blocks: int = 4, batch_norm: bool = True):
        super().__init__()
        if blocks < 1 or hidden < 1 or ways < 1 or in_channels < 1:
            raise ValueError(f"ConvNet: in_channels, ways, hidden and blocks must be positive, got "
                             f"{in_channels}, {ways}, {hidden}, {blocks}")
        layers, side, c = [], int(image_size), in_channels
        for _ in range(blocks):
            layers.append(nn.Conv2d(c, hidden, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(hidden))
            layers += [nn.ReLU(), nn.MaxPool2d(2)]
            side, c = side // 2, hidden
        if side < 1:
            raise ValueError(f"ConvNet: image_size {image_size} is too small for {blocks} pooling blocks")
        self.body = nn.Sequential(*layers)
        self.feature_dim = hidden * side * side
        self.head = nn.Linear(self.feature_dim, ways)

    def features(self, x: Tensor) -> Tensor:
        return torch.flatten(self.body(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class OmniglotNet(nn.Module):
    """The MAML paper's Omniglot network: 4 × [3×3 conv, stride 2, 64 filters, BatchNorm, ReLU]
    (strided convolutions instead of max-pooling, as the paper states for Omniglot), spatial mean,
    linear ``head``. 28×28 → 14 → 7 → 4 → 2."""

    def __init__(self, ways: int = 5, hidden: int = 64, in_channels: int = 1, blocks: int = 4):
        super().__init__()
        layers, c = [], in_channels
        for _ in range(blocks):
            layers += [nn.Conv2d(c, hidden, 3, stride=2, padding=1), nn.BatchNorm2d(hidden), nn.ReLU()]
            c = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, ways)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x).mean((2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
