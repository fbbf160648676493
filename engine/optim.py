"""Optimisers and learning-rate schedules of each method's official code (docs/recipes.md §5).

Optimisers: ``sgd`` (momentum), ``lars`` (solo-learn: trust η, clip, 1-D params excluded from
adaptation and decay), ``larc`` (GroCo/apex: trust 0.001, scaling mode, every parameter),
``adamw``. LARS and LARC are ``timm.optim.Lars``.

Schedules, all as a factor of the peak lr, stepped per optimiser step:
``warmup_cosine`` (linear from 3e-5 to lr, then cosine to 0), ``warmup0_cosine`` (the same from 0),
``cld`` (linear from lr/100 over the warm-up, then cosine to 1e-6), ``epoch_cosine`` (MoCo v2:
lr·½(1 + cos(π·epoch/epochs)), constant within an epoch), ``constant``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from timm.optim import Lars

OPTIMIZERS = ("sgd", "lars", "larc", "adamw")
SCHEDULES = ("warmup_cosine", "warmup0_cosine", "cld", "epoch_cosine", "constant")
LR_SCALINGS = ("linear", "sqrt", "none")


class OptimConfigError(ValueError):
    """An optimiser or schedule setting that is not valid; the message lists what is."""


@dataclass
class OptimizerSettings:
    name: str = "sgd"
    lr: float = 0.1
    lr_scaling: str = "linear"
    lr_reference_batch: int = 256
    weight_decay: float = 0.0
    momentum: float = 0.9
    trust_coefficient: float = 0.02
    trust_clip: bool = True
    exclude_1d: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "warmup_cosine"
    warmup_epochs: float = 0.0

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> OptimizerSettings:
        valid = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - valid)
        if unknown:
            raise OptimConfigError(
                f"unknown optimizer option(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}"
            )
        settings = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
        settings.validate()
        return settings

    def validate(self) -> None:
        for field, value, choices in (
            ("name", self.name, OPTIMIZERS),
            ("schedule", self.schedule, SCHEDULES),
            ("lr_scaling", self.lr_scaling, LR_SCALINGS),
        ):
            if value not in choices:
                raise OptimConfigError(
                    f"invalid method.optimizer.{field}={value!r}; valid: {', '.join(choices)}"
                )
        if not self.lr > 0:
            raise OptimConfigError(f"invalid method.optimizer.lr={self.lr}; it must be > 0")

    def peak_lr(self, batch_size: int) -> float:
        """lr × B/ref ("linear"), lr × √B ("sqrt", SimCLR's rule), or lr ("none")."""
        if self.lr_scaling == "linear":
            return self.lr * batch_size / self.lr_reference_batch
        if self.lr_scaling == "sqrt":
            return self.lr * math.sqrt(batch_size)
        return self.lr


def build_optimizer(
    groups: list[dict[str, Any]], settings: OptimizerSettings, peak_lr: float
) -> torch.optim.Optimizer:
    """Optimiser over the method's parameter groups.

    Weight decay applies to every parameter, as ``torch.optim`` over ``model.parameters()`` does
    in MoCo's, CLD's, ASCL's and GroCo's code. With ``exclude_1d`` (solo-learn's
    ``exclude_bias_n_norm``) a group flagged ``is_1d`` (biases, norm weights) gets no weight decay
    and, for ``lars``, no trust-ratio adaptation; ``larc`` ignores it. A group with ``lr_scale``
    runs at that multiple of the peak lr; one with ``fixed_lr`` at that lr (both follow the
    schedule).
    """
    param_groups = []
    for group in groups:
        params = [p for p in group["params"] if p.requires_grad]
        if not params:
            continue
        lr = group.get("fixed_lr", peak_lr * group.get("lr_scale", 1.0))
        exclude = group.get("is_1d", False) and settings.exclude_1d and settings.name != "larc"
        param_groups.append(
            {
                "params": params,
                "lr": lr,
                "initial_lr": lr,
                "weight_decay": 0.0 if exclude else settings.weight_decay,
                "name": group.get("name", "params"),
            }
        )
    if settings.name == "sgd":
        return torch.optim.SGD(param_groups, lr=peak_lr, momentum=settings.momentum)
    if settings.name == "adamw":
        return torch.optim.AdamW(param_groups, lr=peak_lr, betas=settings.betas)
    if settings.name == "lars":
        # timm's Lars adapts only groups with weight decay (or always_adapt), which is exactly
        # solo-learn's exclude_bias_n_norm once 1-D groups carry weight_decay 0.
        return Lars(
            param_groups,
            lr=peak_lr,
            momentum=settings.momentum,
            trust_coeff=settings.trust_coefficient,
            trust_clip=settings.trust_clip,
        )
    return Lars(
        param_groups,
        lr=peak_lr,
        momentum=settings.momentum,
        trust_coeff=0.001,
        trust_clip=False,
        always_adapt=True,
    )


def lr_factor(
    schedule: str,
    step: int,
    steps_per_epoch: int,
    epochs: int,
    warmup_epochs: float,
    peak_lr: float,
) -> float:
    """Multiplier of the peak lr at optimiser step ``step`` (0-based).

    The warm-up starts at 3e-5 absolute (``warmup_cosine``, solo-learn's warmup_start_lr), 0
    (``warmup0_cosine``) or lr/100 (``cld``); ``cld`` decays to 1e-6 absolute, the others to 0.
    """
    total = max(1, steps_per_epoch * epochs)
    warmup = int(round(warmup_epochs * steps_per_epoch))
    if schedule == "constant":
        return 1.0
    if schedule == "epoch_cosine":
        epoch = step // steps_per_epoch
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if schedule == "warmup_cosine":
        start, floor = min(1.0, 3e-5 / peak_lr), 0.0
    elif schedule == "warmup0_cosine":
        start, floor = 0.0, 0.0
    else:
        start, floor = 0.01, min(1.0, 1e-6 / peak_lr)
    if step < warmup:
        return start + (1.0 - start) * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    step: int,
    steps_per_epoch: int,
    epochs: int,
    warmup_epochs: float,
) -> None:
    """Each group's lr at optimiser step ``step``: its own peak (``initial_lr``) times
    ``lr_factor`` taken against that peak, so that the absolute warm-up start (3e-5) and floor
    (``cld``: 1e-6) hold in every group, as solo-learn's scheduler does for a group with its own lr
    (All4One's transformer)."""
    for group in optimizer.param_groups:
        peak = group["initial_lr"]
        factor = lr_factor(schedule, step, steps_per_epoch, epochs, warmup_epochs, peak)
        group["lr"] = peak * factor
