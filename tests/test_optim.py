"""Learning-rate rules, schedules and optimiser groups (docs/recipes.md §5)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from engine.config import method_options, resolve_run_config
from engine.optim import (
    OptimConfigError,
    OptimizerSettings,
    build_optimizer,
    lr_factor,
    set_lr,
)
from methods import build_method, default_grid_presets, get_method_class
from tests.conftest import compose_config
from tests.tiny import TinyBackbone


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
    lars = OptimizerSettings(name="lars", weight_decay=1e-4, exclude_1d=True)
    opt = build_optimizer(groups, lars, 0.4)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    for name in ("sgd", "lars"):  # by default every parameter decays, as in torch.optim
        plain = build_optimizer(groups, OptimizerSettings(name=name, weight_decay=1e-4), 0.4)
        assert [g["weight_decay"] for g in plain.param_groups] == [1e-4, 1e-4]
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


# Whether biases and norm weights decay in each official code: torch.optim.SGD over
# model.parameters() (MoCo, CLD, ASCL, GroCo), apex LARC over every parameter (GroCo's SimCLR),
# solo-learn's LARS with exclude_bias_n_norm (SimCLR solo, NNCLR, All4One).
DECAYS_1D = {
    "moco": True, "moco_cld_base": True, "moco_ascl_base": True, "cld": True, "ascl": True,
    "groco": True, "simclr_groco_baseline": True,
    "simclr": False, "nnclr": False, "all4one": False,
}


def test_each_preset_decays_1d_parameters_as_its_official_code(tmp_path):
    trained = [p for p in default_grid_presets()
               if get_method_class(compose_config([f"method={p}"]).method.name).trains]
    assert sorted(DECAYS_1D) == sorted(trained)
    for preset, decays in DECAYS_1D.items():
        config = resolve_run_config(
            compose_config([f"method={preset}", f"results_dir={tmp_path}"]))["method"]
        method = build_method(config["name"], TinyBackbone(), **method_options(config))
        settings = OptimizerSettings.from_dict(config["optimizer"])
        opt = build_optimizer(method.parameter_groups(), settings, settings.peak_lr(256))
        decay = {p.ndim <= 1: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
        assert decay[False] == settings.weight_decay > 0, preset
        assert decay[True] == (settings.weight_decay if decays else 0.0), preset


def test_every_group_warms_up_from_the_absolute_start():
    # All4One's transformer group runs at a fixed 0.1 beside the main peak (1.0 here): solo-learn's
    # scheduler starts every group at 3e-5 and ends every group at its floor.
    main, fixed = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2, 2))
    groups = [{"params": [main]}, {"params": [fixed], "fixed_lr": 0.1}]
    for schedule, first, last in (("warmup_cosine", 3e-5, 0.0), ("cld", None, 1e-6)):
        opt = build_optimizer(groups, OptimizerSettings(name="sgd", schedule=schedule), 1.0)
        set_lr(opt, schedule, 0, 10, 10, 2)
        if first is not None:
            assert [g["lr"] for g in opt.param_groups] == pytest.approx([first, first])
        else:
            assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.001])
        set_lr(opt, schedule, 10, 10, 10, 2)  # half way through the warm-up
        assert [g["lr"] for g in opt.param_groups] == pytest.approx(
            [(first or 0.01) + (1 - (first or 0.01)) / 2,
             (first or 0.001) + (0.1 - (first or 0.001)) / 2])
        set_lr(opt, schedule, 100, 10, 10, 2)  # the end of the 100 steps
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([last, last], abs=1e-12)
