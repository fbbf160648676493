"""Tiny stand-ins shared by the tests: a backbone, seeded random views of 3×4×4 images and a
synthetic run record with known metrics."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from eval.records import pack_bits


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


def make_record(method: str, preset: str, seed: int, knn20: float, linear: float, *,
                base: str | None = None, protocol: str = "groupbench-v1", epochs: int = 30,
                extra_method: dict | None = None, n_test: int = 40,
                history: list[dict] | None = None) -> dict:
    """A finished run record of digits with the given k-NN (k=20) and linear top-1; its
    per-image k-NN correctness has round(knn20% × n_test) hits."""
    method_cfg = {"name": method, "preset": preset, "base": base, "temperature": 0.2}
    method_cfg.update(extra_method or {})
    config = {
        "seed": seed, "results_dir": "results",
        "dataset": {"name": "digits", "root": None},
        "backbone": {"name": "test_resnet", "stem": "lowres_pool"},
        "trainer": {"epochs": epochs, "batch_size": 256, "device": "cpu"},
        "method": method_cfg,
    }
    correct = np.zeros(n_test, dtype=bool)
    correct[: int(round(knn20 / 100 * n_test))] = True
    return {
        "status": "finished", "protocol": protocol, "seed": seed, "config": config,
        "method": method, "preset": preset, "dataset": "digits", "backbone": "test_resnet",
        "epochs": epochs, "batch_size": 256, "train_seconds": 10.0, "images_per_second": 100.0,
        "metrics": {
            "knn20_top1": knn20, "knn200_top1": knn20 - 5, "linear_top1": linear,
            "linear_top5": 99.0, "n_test": n_test,
            "neighbour_agreement": {"1": knn20, "5": 80.0, "20": 70.0, "50": 60.0, "200": 40.0},
            "knn_curve": {"1": knn20 - 1, "20": knn20, "200": knn20 - 5},
        },
        "correct": {"knn20": pack_bits(correct), "linear": pack_bits(correct)},
        "history": history or [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5}],
    }
