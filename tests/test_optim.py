"""Learning-rate rules, schedules and optimiser groups (docs/recipes.md §5)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from engine.optim import OptimConfigError, OptimizerSettings, build_optimizer, lr_factor


def test_peak_lr_rules():
    assert OptimizerSettings(lr=0.4, lr_scaling="linear").peak_lr(512) == pytest.approx(0.8)
    assert OptimizerSettings(lr=0.075, lr_scaling="sqrt").peak_lr(1024) == pytest.approx(2.4)
    assert OptimizerSettings(lr=0.03, lr_scaling="none").peak_lr(999) == pytest.approx(0.03)
    assert OptimizerSettings(lr=0.03, lr_reference_batch=128).peak_lr(256) == pytest.approx(0.06)


def test_warmup_cosine_shape():
    # 10 steps per epoch, 10 epochs, 2 warm-up epochs, peak 0.3
    f = [lr_factor("warmup_cosine", s, 10, 10, 2, 0.3) for s in range(100)]
    assert f[0] == pytest.approx(1e-4)  # 3e-5 absolute
    assert f[10] == pytest.approx(1e-4 + (1 - 1e-4) * 0.5)
    assert f[20] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.5 * (1 + math.cos(math.pi * 40 / 80)))
    assert all(a >= b for a, b in zip(f[20:], f[21:], strict=False))
    assert lr_factor("warmup0_cosine", 0, 10, 10, 2, 0.3) == 0.0


def test_epoch_cosine_and_cld():
    assert lr_factor("epoch_cosine", 5, 10, 4, 0, 0.1) == 1.0  # constant within epoch 0
    assert lr_factor("epoch_cosine", 25, 10, 4, 0, 0.1) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_factor("cld", 0, 10, 10, 5, 0.06) == pytest.approx(0.01)
    last = lr_factor("cld", 10**6, 10, 10, 5, 0.06)
    assert last == pytest.approx(1e-6 / 0.06)


def test_lars_excludes_1d_parameters_from_decay():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    groups = [
        {"params": [p for p in model.parameters() if p.ndim > 1]},
        {"params": [p for p in model.parameters() if p.ndim <= 1], "is_1d": True},
    ]
    opt = build_optimizer(groups, OptimizerSettings(name="lars", weight_decay=1e-4), 0.4)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    larc = build_optimizer(groups, OptimizerSettings(name="larc", weight_decay=1e-6), 2.4)
    assert [g["weight_decay"] for g in larc.param_groups] == [1e-6, 1e-6]


def test_bad_optimizer_settings():
    with pytest.raises(OptimConfigError, match="adam2.*valid: sgd, lars, larc, adamw"):
        OptimizerSettings.from_dict({"name": "adam2"})
    with pytest.raises(OptimConfigError, match="unknown optimizer option.*lrr"):
        OptimizerSettings.from_dict({"lrr": 0.1})


def test_sgd_step_uses_scheduled_lr():
    p = nn.Parameter(torch.ones(2, 2))
    opt = build_optimizer([{"params": [p]}], OptimizerSettings(name="sgd", momentum=0.0), 0.5)
    p.grad = torch.ones(2, 2)
    opt.step()
    assert torch.allclose(p, torch.full((2, 2), 0.5))
