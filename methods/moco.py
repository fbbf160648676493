"""MoCo v2: momentum key encoder, FIFO queue of keys, InfoNCE (spec moco.md).

Presets (configs/method): ``mocov2`` (default; facebookresearch/moco), ``cld_base`` (CLD's
three-crop MoCo with λ = 0) and ``ascl_base`` (ASCL's ``--type normal``: weak key view, split BN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods import register_method
from methods.base import MethodConfigError, SSLMethod, check_choice, check_positive
from methods.blocks import (
    FeatureQueue,
    MomentumEncoder,
    NormLinear,
    convert_split_bn,
    l2_normalize,
    projection_mlp,
)

HEADS = ("mlp", "linear", "normlinear")
DIRECTIONS = ("one_way", "symmetric")
EMA_TIMINGS = ("before_keys", "after_step")


def moco_infonce_loss(
    query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2
) -> torch.Tensor:
    """InfoNCE of MoCo: L = −mean_i log( e^{q_i·k_i/τ} / (e^{q_i·k_i/τ} + Σ_j e^{q_i·Q_j/τ}) ).

    ``query`` (B, D) and ``key`` (B, D) are normalised inside (ẑ = z / max(‖z‖, 1e-8)); the key is
    detached; ``queue`` (M, D) holds earlier keys (unit rows) and is detached. The current batch's
    other keys are not negatives.
    """
    check_positive("temperature", temperature)
    if query.shape != key.shape or query.ndim != 2:
        raise ValueError(f"query and key must both be (B, D), got {tuple(query.shape)}, {tuple(key.shape)}")
    q = l2_normalize(query.float())
    k = l2_normalize(key.detach().float())
    positive = (q * k).sum(dim=1, keepdim=True)
    negative = q @ queue.detach().float().T
    logits = torch.cat([positive, negative], dim=1) / temperature
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target)


@dataclass
class MoCoConfig:
    preset: str = "mocov2"
    temperature: float = 0.2
    queue_size: int = 65536
    momentum: float = 0.999
    dim: int = 128
    head: str = "mlp"
    head_hidden_dim: int | None = None
    views: int = 2
    direction: str = "one_way"
    key_view: str = "same"
    ema_timing: str = "before_keys"
    bn_splits: int = 1
    queue_init: str = "random_unit"


def build_head(kind: str, in_dim: int, hidden: int | None, out: int) -> nn.Module:
    """``mlp``: Linear(d→h)→ReLU→Linear(h→D), h = d unless given; ``linear``/``normlinear``: one
    (unit-row) Linear d→D."""
    if kind == "mlp":
        return projection_mlp([in_dim, hidden or in_dim, out])
    if kind == "linear":
        return nn.Linear(in_dim, out)
    return NormLinear(in_dim, out)


@register_method("moco")
class MoCo(SSLMethod):
    Config = MoCoConfig

    @classmethod
    def validate_config(cls, config: MoCoConfig) -> None:
        check_choice("method.head", config.head, HEADS)
        check_choice("method.direction", config.direction, DIRECTIONS)
        check_choice("method.ema_timing", config.ema_timing, EMA_TIMINGS)
        check_choice("method.views", config.views, (2, 3))
        check_choice("method.key_view", config.key_view, ("same", "weak"))
        check_choice("method.queue_init", config.queue_init, FeatureQueue.INITS)
        check_positive("method.temperature", config.temperature)
        check_positive("method.queue_size", config.queue_size)
        if not 0.0 <= config.momentum <= 1.0:
            raise MethodConfigError(f"invalid method.momentum={config.momentum}; valid: [0, 1]")
        if config.views == 3 and config.direction == "symmetric":
            raise MethodConfigError("method.views=3 (three_crop) is one-way; use direction=one_way")

    def __init__(self, backbone: nn.Module, config: MoCoConfig) -> None:
        convert_split_bn(backbone, config.bn_splits)
        super().__init__(backbone, config)
        self.head = build_head(config.head, self.feature_dim, config.head_hidden_dim, config.dim)
        self.online = nn.Sequential(self.backbone, self.head)
        self.key_encoder = MomentumEncoder(self.online)
        self.queue = FeatureQueue(config.queue_size, config.dim, init=config.queue_init)

    def view_kinds(self) -> list[str]:
        key_kind = "weak" if self.config.key_view == "weak" else "shared"
        return ["shared"] * (self.config.views - 1) + [key_kind]

    def check_batch(self, batch_size: int, dataset_size: int) -> None:
        super().check_batch(batch_size, dataset_size)
        self.queue.check_batch(batch_size * (2 if self.config.direction == "symmetric" else 1))
        if self.config.bn_splits > 1 and batch_size % self.config.bn_splits:
            raise MethodConfigError(
                f"method.bn_splits={self.config.bn_splits} needs a batch divisible by it, "
                f"got batch_size={batch_size}"
            )

    @torch.no_grad()
    def _keys(self, images: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.key_encoder(images).float())

    def training_step(self, views: list[torch.Tensor], indices: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.config
        if cfg.ema_timing == "before_keys":
            self.key_encoder.update(self.online, cfg.momentum)
        queue = self.queue.features().clone()
        if cfg.direction == "symmetric":
            k1, k2 = self._keys(views[0]), self._keys(views[1])
            loss = 0.5 * (
                moco_infonce_loss(self.online(views[0]), k2, queue, cfg.temperature)
                + moco_infonce_loss(self.online(views[1]), k1, queue, cfg.temperature)
            )
            new_keys = torch.cat([k1, k2])
        else:
            key = self._keys(views[-1])
            losses = [moco_infonce_loss(self.online(v), key, queue, cfg.temperature) for v in views[:-1]]
            loss = torch.stack(losses).mean()
            new_keys = key
        self.queue.push(new_keys)
        return {"loss": loss}

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        if self.config.ema_timing == "after_step":
            self.key_encoder.update(self.online, self.config.momentum)
