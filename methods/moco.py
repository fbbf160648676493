"""MoCo v2: momentum key encoder, FIFO queue of keys, InfoNCE (docs/methods/moco.md).

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
    with torch.autocast(device_type=q.device.type, enabled=False):  # float32 logits
        negative = q @ queue.detach().float().T
    logits = torch.cat([positive, negative], dim=1) / temperature
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target)


# --------------------------------------------------------------------------------------------
# Cross-process shuffle-BN (docs/methods/moco.md §4; official moco/builder.py _batch_shuffle_ddp and
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
    """Defaults: preset ``mocov2`` (facebookresearch/moco)."""

    preset: str = "mocov2"
    temperature: float = 0.2
    queue_size: int = 4096  # digits: 1024; ImageNet-100: 65,536 (the official ImageNet value)
    momentum: float = 0.999
    dim: int = 128
    head: str = "mlp"  # mlp: Linear(d→h)→ReLU→Linear(h→128) | linear | normlinear
    head_hidden_dim: int | None = None  # None: d
    views: int = 2  # 3: CLD's three crops (two queries, one key)
    direction: str = "one_way"  # one_way (official) | symmetric
    key_view: str = "same"  # same | weak (ASCL's crop+flip teacher view)
    ema_timing: str = "before_keys"  # before_keys (official MoCo) | after_step (CLD's CIFAR code)
    bn_splits: int = 1  # split BN in both encoders; 1 = plain BN
    queue_init: str = "random_unit"  # random_unit | uniform (CLD's MemoryMoCo)


def build_head(kind: str, in_dim: int, hidden: int | None, out: int) -> nn.Module:
    """``mlp``: Linear(d→h)→ReLU→Linear(h→D), h = d unless given; ``linear``/``normlinear``: one
    (unit-row) Linear d→D."""
    if kind == "mlp":
        return projection_mlp([in_dim, hidden or in_dim, out])
    if kind == "linear":
        return nn.Linear(in_dim, out)
    return NormLinear(in_dim, out)


# --------------------------------------------------------------------------------------------
# The momentum-contrast pieces, shared with CLD's MoCo instance branch
# --------------------------------------------------------------------------------------------
def check_moco_options(config: MoCoConfig, heads: tuple[str, ...] = HEADS) -> None:
    """Raise MethodConfigError for MoCo option values that cannot be used (``heads``: the valid
    ``method.head`` values, which CLD extends)."""
    check_choice("method.head", config.head, heads)
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


def check_moco_batch(
    config: MoCoConfig, queue: FeatureQueue, batch_size: int, dataset_size: int
) -> None:
    """Raise MethodConfigError when the queue does not take whole global batches of keys, holds
    more keys than the data set has images, or split BN does not divide the batch."""
    pushed = batch_size * (2 if config.direction == "symmetric" else 1)
    queue.check_batch(pushed)
    if queue.size > dataset_size:
        # The queue's entries are negatives: once it is larger than the data set, every query
        # meets an older key of its own image among them, a false negative on every step
        # (NNCLR's and All4One's support sets are neighbours, not negatives, and allow it).
        fits = dataset_size // pushed * pushed
        raise MethodConfigError(
            f"method.queue_size={queue.size} exceeds the {dataset_size} pre-training "
            "images, so each query would meet stale keys of its own image as negatives; use "
            + (f"a queue_size <= {fits} (a multiple of {pushed})" if fits else
               "a smaller batch or a larger data set")
        )
    if config.bn_splits > 1 and batch_size % config.bn_splits:
        raise MethodConfigError(
            f"method.bn_splits={config.bn_splits} needs a batch divisible by it, "
            f"got batch_size={batch_size}"
        )


def moco_view_kinds(config: MoCoConfig, strong: str = "shared") -> list[str]:
    """The online views (``strong``) and, last, the key view (``weak`` or ``strong``)."""
    key_kind = "weak" if config.key_view == "weak" else strong
    return [strong] * (config.views - 1) + [key_kind]


def cld_official_kind(dataset: str) -> str:
    """CLD's published views per dataset (its dataloader): MoCo v2's ``aug_plus`` then random
    erasing on CIFAR-10 (and, chosen, STL-10 and Tiny-ImageNet, which take CIFAR-10's script
    values), its ``basic`` pipeline on CIFAR-100, MoCo v2's ``aug_plus`` on ImageNet sizes."""
    if dataset == "cifar100":
        return "cld_basic"
    if dataset in ("imagenet100", "imagefolder"):
        return "mocov2"
    return "mocov2_erase"


@torch.no_grad()
def momentum_keys(key_encoder: nn.Module, images: torch.Tensor, shuffle_bn: bool) -> torch.Tensor:
    """Normalised keys; with ``shuffle_bn`` and W > 1 under cross-process shuffle-BN."""
    if shuffle_bn and world_size() > 1:
        return l2_normalize(shuffle_bn_forward(key_encoder, images).float())
    return l2_normalize(key_encoder(images).float())


@register_method("moco")
class MoCo(SSLMethod):
    Config = MoCoConfig
    paper_aliases = ("moco", "mocov2", "mocov2plus")
    optimizer_defaults = {
        "name": "sgd", "lr": 0.03, "lr_scaling": "linear", "lr_reference_batch": 256,
        "weight_decay": 1.0e-4, "momentum": 0.9, "exclude_1d": False, "schedule": "epoch_cosine",
        "warmup_epochs": 0,
    }
    dataset_defaults = {"digits": {"queue_size": 1024}, "imagenet100": {"queue_size": 65536}}

    @classmethod
    def validate_config(cls, config: MoCoConfig) -> None:
        check_moco_options(config)

    def __init__(self, backbone: nn.Module, config: MoCoConfig) -> None:
        convert_split_bn(backbone, config.bn_splits)
        super().__init__(backbone, config)
        self.head = build_head(config.head, self.feature_dim, config.head_hidden_dim, config.dim)
        self.online = nn.Sequential(self.backbone, self.head)
        self.key_encoder = MomentumEncoder(self.online)
        self.queue = FeatureQueue(config.queue_size, config.dim, init=config.queue_init)
        # With W > 1 the key encoder runs under cross-process shuffle-BN and keeps per-process BN
        # (the engine leaves ``local_bn_modules`` out of SyncBN). False syncs it like the rest of
        # the network (the DDP equivalence test compares W = 2 with W = 1 that way). ASCL sets it
        # from its ``shuffle_bn`` option.
        self.shuffle_bn: bool = True

    def view_kinds(self) -> list[str]:
        return moco_view_kinds(self.config)

    def official_view_kinds(self, dataset: str) -> list[str]:
        # the cld_base preset is CLD's scripts with λ = 0, so it takes CLD's views; MoCo v2 and
        # ASCL's base (its strong view; the weak key view stays) take MoCo v2's aug_plus
        strong = cld_official_kind(dataset) if self.config.preset == "cld_base" else "mocov2"
        return moco_view_kinds(self.config, strong)

    def check_batch(self, batch_size: int, dataset_size: int) -> None:
        super().check_batch(batch_size, dataset_size)
        check_moco_batch(self.config, self.queue, batch_size, dataset_size)

    def local_bn_modules(self) -> list[nn.Module]:
        return [self.key_encoder] if self.shuffle_bn else []

    def uses_shuffle_bn(self) -> bool:
        return self.shuffle_bn

    def updates_ema_in_training_step(self) -> bool:
        return self.config.ema_timing == "before_keys"

    @torch.no_grad()
    def _keys(self, images: torch.Tensor) -> torch.Tensor:
        return momentum_keys(self.key_encoder, images, self.shuffle_bn)

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
