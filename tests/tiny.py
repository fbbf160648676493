"""Tiny stand-ins shared by the method tests: a backbone and seeded random views of 3×4×4 images."""

from __future__ import annotations

import torch
from torch import nn


class TinyBackbone(nn.Module):
    """A linear 'backbone' with BN: enough to exercise heads, EMA, queues, clustering and
    gradients without a convolution."""

    num_features = 8

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8), nn.BatchNorm1d(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def tiny_views(n: int, views: int = 2, seed: int = 0) -> list[torch.Tensor]:
    """``views`` batches of n random 3×4×4 images, drawn in order from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 4, 4, generator=generator) for _ in range(views)]


def tiny_batch(n: int, seed: int, views: int = 2) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Views and dataset indices; batches of different seeds hold different images (ids)."""
    return tiny_views(n, views, seed), torch.arange(n) + 100 * seed
