"""ASCL: adaptive soft contrastive learning on MoCo (docs/methods/ascl.md).

MoCo's one-hot instance target becomes a soft one: the teacher's sharpened similarity
distribution over the queue, scaled by its confidence (one minus its normalised entropy), is added
as extra positive mass. Confident teachers bring in neighbours as soft positives; uncertain ones
fall back to plain MoCo. The student sees a strong view, the teacher (the EMA encoder) a weak one
(crop and flip), with split BN in both encoders and the teacher batch shuffled.

The default preset is the renamed official repository's ``main.py`` (``--model moco --type
ascl``): τ₁ 0.1, τ₂ 0.05, K 1, queue 4,096, m 0.99, 8 BN splits. ``target`` selects the other
``--type`` values (``ahcl``, ``hard``, ``normal``), ``model=byol`` the BYOL path. The matched base
is ``moco`` preset ``ascl_base``, i.e. ``target=normal``.

Defects of the published code that only crash or misreport are fixed, not options: the undefined
``K`` at construction (first repository), the hard-coded ``.cuda()``, the BYOL path's vector loss
(now its mean), NaN confidences when the teacher distribution has a single entry (log 1 = 0), and
``topk`` failures when K exceeds the queue (a config error naming both numbers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods import register_method
from methods.base import MethodConfigError, check_choice, check_matrices, check_positive
from methods.blocks import gather, l2_normalize, projection_mlp, world_size
from methods.moco import MoCo, MoCoConfig, shuffle_bn_forward

TARGETS = ("ascl", "ahcl", "hard", "normal")
MODELS = ("moco", "byol")


# --------------------------------------------------------------------------------------------
# pure losses
# --------------------------------------------------------------------------------------------
def teacher_confidence(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """p_i = softmax_j(s_i) and c_i = 1 − H(p_i)/log M, with H(p) = −Σ_j p_j log p_j.

    ``logits`` (B, M) are the teacher's sharpened relations s_ij. With a single candidate
    (M = 1) the distribution is certain: c_i = 1 (the official code divides 0 by log 1 = 0).
    """
    log_p = F.log_softmax(logits, dim=1)
    p = log_p.exp()
    n = logits.shape[1]
    if n <= 1:
        return p, torch.ones(logits.shape[0], device=logits.device, dtype=logits.dtype)
    entropy = -(p * log_p).sum(dim=1)
    return p, 1.0 - entropy / math.log(n)


def soft_weights(
    logits: torch.Tensor, target: str = "ascl", nn_num: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Extra positive weights w_ij on the M candidates, and the confidence c_i.

    - ``ascl``: w_ij = min(K·c_i·p_ij, 1) (so Σ_j w_ij ≤ K·c_i);
    - ``ahcl``: w_ij = c_i on the K largest s_ij, 0 elsewhere;
    - ``hard``: w_ij = 1 on the K largest s_ij (NNCLR-like multi-positive);
    - ``normal``: w = 0 (plain MoCo).

    K = ``nn_num``; p, c as in ``teacher_confidence``.
    """
    check_choice("target", target, TARGETS)
    n = logits.shape[1]
    if target in ("ahcl", "hard") and not 1 <= nn_num <= n:
        raise MethodConfigError(
            f"target={target} keeps the top nn_num={nn_num} of {n} candidates; "
            f"nn_num must be in [1, {n}]"
        )
    p, confidence = teacher_confidence(logits)
    if target == "normal":
        return torch.zeros_like(logits), confidence
    if target == "ascl":
        return (nn_num * confidence[:, None] * p).clamp_max(1.0), confidence
    top = torch.zeros_like(logits).scatter_(1, logits.topk(nn_num, dim=1).indices, 1.0)
    return (top * confidence[:, None] if target == "ahcl" else top), confidence


@torch.no_grad()
def ascl_targets(
    key: torch.Tensor,
    queue: torch.Tensor,
    teacher_temperature: float = 0.05,
    target: str = "ascl",
    nn_num: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft targets y_i = [1, w_i1, …, w_iM] / (1 + Σ_j w_ij) over [key, queue], and c_i.

    s_ij = k̂_i·Q_j / τ₂ (teacher relation to the queue), w from ``soft_weights``. No gradient.
    """
    check_positive("teacher_temperature", teacher_temperature)
    check_matrices("ascl_targets", key=key)
    check_matrices("ascl_targets", same_rows=False, key=key, queue=queue)
    with torch.autocast(device_type=key.device.type, enabled=False):
        k = l2_normalize(key.float())
        logits = k @ queue.float().T / teacher_temperature
        weights, confidence = soft_weights(logits, target, nn_num)
        # new_ones, not ones_like(weights[:, :1]): with an empty queue that slice has no column
        targets = torch.cat([weights.new_ones(weights.shape[0], 1), weights], dim=1)
        return targets / targets.sum(dim=1, keepdim=True), confidence


def soft_contrastive_loss(
    query: torch.Tensor,
    key: torch.Tensor,
    queue: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 0.1,
) -> torch.Tensor:
    """L = −(1/B)·Σ_i Σ_j y_ij · log softmax(ℓ_i)_j, ℓ_i = [q̂_i·k̂_i, q̂_i·Q_1, …, q̂_i·Q_M] / τ₁.

    ``query`` (B, D) carries the gradient; ``key``, ``queue`` and ``targets`` (B, 1+M) are
    detached. With one-hot targets this is MoCo's InfoNCE. Float32 with autocast off.
    """
    check_positive("temperature", temperature)
    batch, _ = check_matrices("soft_contrastive_loss", query=query, key=key)
    check_matrices("soft_contrastive_loss", same_rows=False, query=query, queue=queue)
    if targets.shape != (batch, 1 + queue.shape[0]):
        raise ValueError(
            f"soft_contrastive_loss: targets must be (B, 1 + M) = ({batch}, {1 + queue.shape[0]}) "
            f"for the key and the {queue.shape[0]} queue entries, got {tuple(targets.shape)}"
        )
    with torch.autocast(device_type=query.device.type, enabled=False):
        q = l2_normalize(query.float())
        k = l2_normalize(key.detach().float())
        positive = (q * k).sum(dim=1, keepdim=True)
        logits = torch.cat([positive, q @ queue.detach().float().T], dim=1) / temperature
        return -(targets.detach().float() * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def ascl_loss(
    query: torch.Tensor,
    key: torch.Tensor,
    queue: torch.Tensor,
    temperature: float = 0.1,
    teacher_temperature: float = 0.05,
    target: str = "ascl",
    nn_num: int = 1,
) -> torch.Tensor:
    """MoCo-ASCL (``--model moco``), all target construction without gradient:

    1. s_ij = k̂_i·Q_j / τ₂,  p_i = softmax_j(s_i);
    2. c_i = 1 − H(p_i)/log M;
    3. w_ij = min(K·c_i·p_ij, 1)   (``target``: ascl; ahcl / hard / normal see ``soft_weights``);
    4. y_i = [1, w_i1, …, w_iM] / (1 + Σ_j w_ij);
    5. ℓ_i = [q̂_i·k̂_i, q̂_i·Q_1, …, q̂_i·Q_M] / τ₁;
    6. L = −(1/B)·Σ_i Σ_j y_ij log softmax(ℓ_i)_j.

    As c → 0 this is MoCo's loss. ``query``, ``key`` (B, D); ``queue`` (M, D) unit rows.
    """
    targets, _ = ascl_targets(key, queue, teacher_temperature, target, nn_num)
    return soft_contrastive_loss(query, key, queue, targets, temperature)


def byol_ascl_loss(
    prediction: torch.Tensor,
    key: torch.Tensor,
    teacher_temperature: float = 0.05,
    target: str = "ascl",
    nn_num: int = 1,
) -> torch.Tensor:
    """BYOL-ASCL (``--model byol``): L = mean_i [2 − 2·Σ_j Y_ij·⟨ĥ_i, k̂_j⟩].

    ``prediction`` ĥ (B, D): the student predictor's output; ``key`` k (B, D): the teacher's, of
    the same B images (detached). For ``target=ascl`` the relations are the teacher's in-batch
    off-diagonal similarities s_ij = k̂_i·k̂_j/τ₂ (j ≠ i, B−1 per row), c and w as in
    ``soft_weights`` (max entropy log(B−1)), and Y has 1 on the diagonal and w_ij off it, rows
    normalised. ``target=normal`` is plain BYOL, Y = I. The official code returns the per-sample
    vector and cannot back-propagate it; this is its mean.
    """
    check_choice("target", target, ("ascl", "normal"))
    check_positive("teacher_temperature", teacher_temperature)
    check_matrices("byol_ascl_loss", prediction=prediction, key=key)
    with torch.autocast(device_type=prediction.device.type, enabled=False):
        h = l2_normalize(prediction.float())
        k = l2_normalize(key.detach().float())
        n = k.shape[0]
        if target == "normal":
            return (2 - 2 * (h * k).sum(dim=1)).mean()
        with torch.no_grad():
            off = ~torch.eye(n, dtype=torch.bool, device=k.device)
            relations = (k @ k.T)[off].view(n, n - 1) / teacher_temperature
            weights, _ = soft_weights(relations, "ascl", nn_num)
            y = torch.eye(n, device=k.device, dtype=k.dtype)
            y[off] = weights.reshape(-1)
            y = y / y.sum(dim=1, keepdim=True)
        return (2 - 2 * (y * (h @ k.T)).sum(dim=1)).mean()


# --------------------------------------------------------------------------------------------
# batch shuffle for split BN on one process
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def shuffled_forward(
    module: nn.Module, images: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``module`` on a random permutation of the batch, returned in the original order.

    With split BN the permutation decides which samples share BN statistics (split s holds the
    shuffled positions j ≡ s mod splits), as ASCL's ``_batch_shuffle_single_gpu``. The
    permutation is drawn on the CPU from ``generator`` (torch's global generator when None, which
    the engine seeds per epoch).
    """
    perm = torch.randperm(images.shape[0], generator=generator).to(images.device)
    return module(images[perm])[torch.argsort(perm)]


# --------------------------------------------------------------------------------------------
# method
# --------------------------------------------------------------------------------------------
@dataclass
class ASCLConfig(MoCoConfig):
    """Defaults: ASCL ``main.py`` (CIFAR) with ``--model moco --type ascl --K 1``; the MoCo
    options not restated here keep MoCo's defaults (queue M = 4,096 (--mem_size), one-way
    direction, EMA before the keys; ``direction=symmetric`` needs ``key_view=same``)."""

    preset: str = "ascl"
    temperature: float = 0.1  # τ₁, student (--t1)
    momentum: float = 0.99  # m (--m), constant; ImageNet-100: 0.999
    head_hidden_dim: int | None = 2048  # Linear(d→2048)→ReLU→Linear(2048→128), no BN
    key_view: str = "weak"  # weak (official --aug weak_augment) | same (strong_augment)
    bn_splits: int = 8  # split BN in both encoders; ImageNet-100: 1
    teacher_temperature: float = 0.05  # τ₂ (--t2)
    target: str = "ascl"  # ascl | ahcl | hard | normal (--type)
    nn_num: int = 1  # K (--K), "number of neighbours"
    model: str = "moco"  # moco | byol (--model)
    shuffle_bn: bool = True  # shuffle the teacher batch (matters with split BN or W > 1)
    predictor_hidden_dim: int = 512  # BYOL predictor Linear(D→512)→BN→ReLU→Linear(512→D)


@register_method("ascl")
class ASCL(MoCo):
    """MoCo (``ascl_base``) with soft targets; ``model=byol`` adds a predictor, uses no queue."""

    Config = ASCLConfig
    default_preset = "ascl"
    base_presets = ("moco_ascl_base",)  # the same code path with target=normal
    paper_aliases = ("ascl",)
    optimizer_defaults = {
        "name": "sgd", "lr": 0.03, "lr_scaling": "none", "lr_reference_batch": 256,
        "weight_decay": 5.0e-4, "momentum": 0.9, "exclude_1d": False,
        "schedule": "warmup0_cosine", "warmup_epochs": 5,
    }
    dataset_defaults = {
        "digits": {"queue_size": 1024},
        "imagenet100": {
            "queue_size": 65536, "momentum": 0.999, "bn_splits": 1,
            "optimizer": {"lr_scaling": "linear", "weight_decay": 1.0e-4, "schedule": "epoch_cosine"},
        },
    }

    @classmethod
    def validate_config(cls, config: ASCLConfig) -> None:
        super().validate_config(config)
        check_choice("method.target", config.target, TARGETS)
        check_choice("method.model", config.model, MODELS)
        check_positive("method.teacher_temperature", config.teacher_temperature)
        if (
            isinstance(config.nn_num, bool)
            or not isinstance(config.nn_num, int)
            or config.nn_num < 1
        ):
            raise MethodConfigError(
                f"invalid method.nn_num={config.nn_num!r}; it must be an integer >= 1"
            )
        if config.views != 2:
            raise MethodConfigError(
                f"ASCL uses two views (student, teacher); got method.views={config.views}"
            )
        if config.target in ("ahcl", "hard") and config.nn_num > config.queue_size:
            raise MethodConfigError(
                f"method.target={config.target} takes the top method.nn_num={config.nn_num} queue "
                f"entries, more than method.queue_size={config.queue_size}"
            )
        if config.direction == "symmetric" and config.key_view != "same":
            raise MethodConfigError(
                "method.direction=symmetric makes both views students in turn, both from the "
                f"shared family; set method.key_view=same (got {config.key_view!r})"
            )
        if config.model == "byol" and config.target in ("ahcl", "hard"):
            raise MethodConfigError(
                f"method.target={config.target} is not defined on the BYOL path (the official code "
                "silently trains plain BYOL there); use method.target=ascl or normal"
            )
        if config.model == "byol" and config.direction == "symmetric":
            raise MethodConfigError("method.model=byol is one-way; use method.direction=one_way")

    def __init__(self, backbone: nn.Module, config: ASCLConfig) -> None:
        super().__init__(backbone, config)
        self.shuffle_bn = config.shuffle_bn
        if config.model == "byol":
            self.predictor = projection_mlp(
                [config.dim, config.predictor_hidden_dim, config.dim], hidden_bn=True
            )

    def check_batch(self, batch_size: int, dataset_size: int) -> None:
        if self.config.model == "moco":
            super().check_batch(batch_size, dataset_size)
            return
        # BYOL keeps no queue (the official one is filled but never read), so only BN limits.
        if batch_size < 2:
            raise MethodConfigError(
                f"ascl needs a batch of at least 2 images, got batch_size={batch_size}"
            )
        if self.config.bn_splits > 1 and batch_size % self.config.bn_splits:
            raise MethodConfigError(
                f"method.bn_splits={self.config.bn_splits} needs a batch divisible by it, "
                f"got batch_size={batch_size}"
            )

    @torch.no_grad()
    def _keys(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised teacher keys of a shuffled teacher batch.

        The shuffle is one permutation of the global batch drawn from torch's global generator,
        whatever W: on one process ``shuffled_forward`` (it only matters with split BN, so it
        runs only then), on W > 1 MoCo's cross-process shuffle-BN, where each process encodes
        its slice of the permuted batch and split BN splits that slice. Both draw the same
        permutation, so W processes group samples for BN exactly as one process with split BN
        applied per slice.
        """
        cfg = self.config
        if not cfg.shuffle_bn:
            return l2_normalize(self.key_encoder(images).float())
        if world_size() > 1:
            return l2_normalize(shuffle_bn_forward(self.key_encoder, images).float())
        if cfg.bn_splits > 1:
            return l2_normalize(shuffled_forward(self.key_encoder, images).float())
        return l2_normalize(self.key_encoder(images).float())

    def _moco_term(
        self, student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, teacher keys, soft targets, confidence) of one student/teacher view pair."""
        cfg = self.config
        key = self._keys(teacher)
        query = self.online(student)
        targets, confidence = ascl_targets(
            key, queue, cfg.teacher_temperature, cfg.target, cfg.nn_num
        )
        loss = soft_contrastive_loss(query, key, queue, targets, cfg.temperature)
        return loss, key, targets, confidence

    def training_step(
        self, views: list[torch.Tensor], indices: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        cfg = self.config
        if cfg.ema_timing == "before_keys":
            self.key_encoder.update(self.online, cfg.momentum)
        if cfg.model == "byol":
            return self._byol_step(views)
        queue = self.queue.features().clone()
        if cfg.direction == "symmetric":
            terms = [
                self._moco_term(views[0], views[1], queue),
                self._moco_term(views[1], views[0], queue),
            ]
            new_keys = torch.cat([terms[1][1], terms[0][1]])  # k1 then k2, as MoCo symmetric
        else:
            terms = [self._moco_term(views[0], views[1], queue)]
            new_keys = terms[0][1]
        loss = torch.stack([t[0] for t in terms]).mean()
        self.queue.push(new_keys)
        targets = torch.cat([t[2] for t in terms])
        return {
            "loss": loss,
            "confidence": torch.cat([t[3] for t in terms]).mean(),
            # target mass on the queue, i.e. how much the soft positives take from the own key
            "soft_mass": targets[:, 1:].sum(dim=1).mean(),
        }

    def _byol_step(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        cfg = self.config
        prediction = self.predictor(self.online(views[0]))
        with torch.no_grad():
            # the BYOL path does not shuffle the teacher batch
            key = l2_normalize(self.key_encoder(views[1]).float())
        # in-batch relations span the global batch: every process computes the same global
        # loss, and the gathered prediction's summed backward makes W processes match one
        prediction = gather(prediction.float(), with_grad=True)
        key = gather(key, with_grad=False)
        return {
            "loss": byol_ascl_loss(prediction, key, cfg.teacher_temperature, cfg.target, cfg.nn_num)
        }
