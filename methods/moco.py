"""MoCo v2: momentum key encoder, FIFO queue of keys, InfoNCE (spec moco.md).

Presets (configs/method): ``mocov2`` (default; facebookresearch/moco), ``cld_base`` (CLD's
three-crop MoCo with λ = 0) and ``ascl_base`` (ASCL's ``--type normal``: weak key view, split BN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from methods import register_method
from methods.base import MethodConfigError, SSLMethod, check_choice, check_matrices, check_positive
from methods.blocks import (
    FeatureQueue,
    MomentumEncoder,
    NormLinear,
    convert_split_bn,
    gather,
    l2_normalize,
    projection_mlp,
    rank,
    world_size,
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
    check_matrices("moco_infonce_loss", query=query, key=key)
    # The queue may be empty (M = 0) but must hold keys of the query's dimension.
    check_matrices("moco_infonce_loss", same_rows=False, query=query, queue=queue)
    q = l2_normalize(query.float())
    k = l2_normalize(key.detach().float())
    positive = (q * k).sum(dim=1, keepdim=True)
    negative = q @ queue.detach().float().T
    logits = torch.cat([positive, negative], dim=1) / temperature
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target)


# --------------------------------------------------------------------------------------------
# Cross-process shuffle-BN (moco.md §4; official moco/builder.py _batch_shuffle_ddp and
# _batch_unshuffle_ddp). Used only when W > 1; on one process a shuffle cannot change BN statistics.
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def shuffle_bn_forward(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``encoder(images)`` where each process's BN statistics come from a random 1/W of the
    global batch instead of its own images; the outputs are returned in the input order.

    Every process draws the permutation from the global torch generator (so the generators stay
    aligned across processes, as the per-epoch seeding expects) and rank 0's draw is broadcast.
    No gradient flows (keys are detached). Identity on one process.
    """
    processes = world_size()
    if processes == 1:
        return encoder(images)
    local = images.shape[0]
    everything = gather(images, with_grad=False)
    perm = torch.randperm(everything.shape[0]).to(images.device)
    dist.broadcast(perm, src=0)
    mine = perm.view(processes, local)[rank()]
    out = gather(encoder(everything[mine]).contiguous(), with_grad=False)
    unshuffled = out[torch.argsort(perm)]
    return unshuffled[rank() * local : (rank() + 1) * local]


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
        # With W > 1 the key encoder runs under cross-process shuffle-BN and keeps per-process BN
        # (the engine leaves ``local_bn_modules`` out of SyncBN). False syncs it like the rest of
        # the network (the DDP equivalence test compares W = 2 with W = 1 that way). A subclass
        # whose config has its own ``shuffle_bn`` option (ASCL) sets it from there.
        self.shuffle_bn: bool = bool(getattr(config, "shuffle_bn", True))

    def view_kinds(self) -> list[str]:
        key_kind = "weak" if self.config.key_view == "weak" else "shared"
        return ["shared"] * (self.config.views - 1) + [key_kind]

    def check_batch(self, batch_size: int, dataset_size: int) -> None:
        super().check_batch(batch_size, dataset_size)
        pushed = batch_size * (2 if self.config.direction == "symmetric" else 1)
        self.queue.check_batch(pushed)
        if self.queue.size > dataset_size:
            # The queue's entries are negatives: once it is larger than the data set, every query
            # meets an older key of its own image among them, a false negative on every step
            # (NNCLR's and All4One's support sets are neighbours, not negatives, and allow it).
            fits = dataset_size // pushed * pushed
            raise MethodConfigError(
                f"method.queue_size={self.queue.size} exceeds the {dataset_size} pre-training "
                "images, so each query would meet stale keys of its own image as negatives; use "
                + (f"a queue_size <= {fits} (a multiple of {pushed})" if fits else
                   "a smaller batch or a larger data set")
            )
        if self.config.bn_splits > 1 and batch_size % self.config.bn_splits:
            raise MethodConfigError(
                f"method.bn_splits={self.config.bn_splits} needs a batch divisible by it, "
                f"got batch_size={batch_size}"
            )

    def local_bn_modules(self) -> list[nn.Module]:
        return [self.key_encoder] if self.shuffle_bn else []

    @torch.no_grad()
    def _keys(self, images: torch.Tensor) -> torch.Tensor:
        if self.shuffle_bn and world_size() > 1:
            return l2_normalize(shuffle_bn_forward(self.key_encoder, images).float())
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
