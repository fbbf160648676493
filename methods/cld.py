"""CLD: cross-level instance-group discrimination on top of MoCo or SimCLR (spec cld.md).

Next to the unchanged instance branch (MoCo's queue InfoNCE, or SimCLR's NT-Xent with
``base_loss=simclr``), a group head embeds the two online views; each view's batch is clustered by
k-means, and every sample's group embedding in one view must pick out, among the *other* view's
centroids, the one its other view fell into:

    L = L_inst + λ·L_CLD,   L_CLD = ½·[ CE(ĝ_1·M⁽²⁾ᵀ/τ_G, Γ₂) + CE(ĝ_2·M⁽¹⁾ᵀ/τ_G, Γ₁) ].

The default preset reproduces the official CIFAR MoCo+CLD script (three crops, NormLinear heads,
k = 200, λ = 0.8, τ_G = 0.2, 5 k-means iterations, EMA after the optimiser step), including its
quirks: centroids are neither re-normalised nor detached and empty clusters give zero centroids.
Each quirk has a named clean option (``centroids``, ``centroid_grad``, ``kmeans_init``,
``kmeans_scope``, ``views``). The matched base is ``moco`` preset ``cld_base`` (the same code path
with λ = 0); with ``base_loss=simclr`` the matched base is this method with ``cld_lambda=0``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from methods import register_method
from methods.base import (
    MethodConfigError,
    SSLMethod,
    check_choice,
    check_matrices,
    check_positive,
)
from methods.blocks import (
    KMEANS_INITS,
    MomentumEncoder,
    NormLinear,
    gather,
    generator_from_global_rng,
    l2_normalize,
    spherical_kmeans,
    world_size,
)
from methods.moco import HEADS as MOCO_HEADS
from methods.moco import MoCo, MoCoConfig, moco_infonce_loss
from methods.simclr import nt_xent_loss

CLD_HEADS = (*MOCO_HEADS, "normmlp")
BASE_LOSSES = ("moco", "simclr")
CENTROIDS = ("raw", "normalized")
KMEANS_SCOPES = ("global", "local")


# --------------------------------------------------------------------------------------------
# pure losses
# --------------------------------------------------------------------------------------------
def cross_level_cross_entropy(
    anchors: torch.Tensor,
    centroids: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    centroid_mode: str = "raw",
) -> torch.Tensor:
    """One direction of CLD: mean_i CE(ĝ_i·Mᵀ/τ_G, Γ(i)) = −mean_i log softmax_j(ĝ_i·M_j/τ_G)_Γ(i).

    ``anchors`` (N, D) are normalised inside (ĝ = g / max(‖g‖, 1e-8)); ``centroids`` (k, D) and
    ``labels`` (N,) come from clustering the *other* view, so Γ(i) is the cluster of sample i's
    other view. ``centroid_mode``:

    - ``raw`` (CLD): M as k-means returns it, norm ≤ 1, an empty cluster's zero centroid giving a
      constant logit 0 to every row;
    - ``normalized``: M̂_j = M_j / max(‖M_j‖, 1e-8) for non-empty clusters, and empty clusters
      masked out of the softmax (logit −∞). A target cluster is never empty (it holds its sample).

    Float32 with autocast off; gradients reach ``anchors`` and, unless detached by the caller,
    ``centroids``.
    """
    check_choice("centroid_mode", centroid_mode, CENTROIDS)
    check_positive("cld temperature", temperature)
    n, _ = check_matrices("cross_level_cross_entropy", anchors=anchors)
    check_matrices("cross_level_cross_entropy", same_rows=False, anchors=anchors, centroids=centroids)
    k = centroids.shape[0]
    if labels.shape != (n,) or labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"cross_level_cross_entropy: labels must be integer cluster indices of shape ({n},), "
            f"got {labels.dtype} {tuple(labels.shape)}"
        )
    if n and not 0 <= int(labels.min()) <= int(labels.max()) < k:
        raise ValueError(
            f"cross_level_cross_entropy: labels must lie in [0, {k}) for {k} centroids, got "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    with torch.autocast(device_type=anchors.device.type, enabled=False):
        g = l2_normalize(_at_least_fp32(anchors))
        m = _at_least_fp32(centroids)
        if centroid_mode == "normalized":
            m = l2_normalize(m)
        logits = g @ m.T / temperature
        if centroid_mode == "normalized":
            empty = torch.bincount(labels, minlength=m.shape[0]) == 0
            logits = logits.masked_fill(empty[None, :], float("-inf"))
        return F.cross_entropy(logits, labels)


class CLDTerms(NamedTuple):
    """L_CLD and what the official script logs next to it."""

    loss: torch.Tensor
    accuracy: torch.Tensor  # fraction of rows of view 1 whose nearest centroid of view 2 is Γ₂(i)
    clusters_used: torch.Tensor  # non-empty clusters per view, averaged over the two views


def cross_level_discrimination(
    group1: torch.Tensor,
    group2: torch.Tensor,
    clusters: int,
    temperature: float = 0.2,
    num_iters: int = 5,
    *,
    centroid_mode: str = "raw",
    centroid_grad: bool = True,
    kmeans_init: str = "first_k",
    generator: torch.Generator | None = None,
) -> CLDTerms:
    """L_CLD = ½·[ CE(ĝ_1·M⁽²⁾ᵀ/τ_G, Γ₂) + CE(ĝ_2·M⁽¹⁾ᵀ/τ_G, Γ₁) ], each CE a mean over the N rows.

    ``group1``/``group2`` (N, D): group-head outputs of the two online views of the same N images
    (normalised inside). (M⁽ᵛ⁾, Γ_v) = ``spherical_kmeans(ĝ_v, clusters, num_iters)``, view 1 first
    (so a ``random`` initialisation draws view 1's rows, then view 2's, from ``generator``).
    ``centroid_grad=False`` detaches M (gradient only through the anchors).
    """
    check_matrices("cross_level_discrimination", group1=group1, group2=group2)
    g1 = l2_normalize(_at_least_fp32(group1))
    g2 = l2_normalize(_at_least_fp32(group2))
    m1, labels1 = spherical_kmeans(g1, clusters, num_iters, generator, kmeans_init)
    m2, labels2 = spherical_kmeans(g2, clusters, num_iters, generator, kmeans_init)
    if not centroid_grad:
        m1, m2 = m1.detach(), m2.detach()
    loss = 0.5 * (
        cross_level_cross_entropy(g1, m2, labels2, temperature, centroid_mode)
        + cross_level_cross_entropy(g2, m1, labels1, temperature, centroid_mode)
    )
    with torch.no_grad():
        # the official "Top-1 acc": argmax over view 2's centroids, the raw affinities
        accuracy = ((g1 @ m2.T).argmax(dim=1) == labels2).float().mean()
        used = (
            0.5
            * (
                torch.bincount(labels1, minlength=clusters).gt(0).sum()
                + torch.bincount(labels2, minlength=clusters).gt(0).sum()
            ).float()
        )
    return CLDTerms(loss, accuracy, used)


def cld_loss(
    group1: torch.Tensor,
    group2: torch.Tensor,
    clusters: int,
    temperature: float = 0.2,
    num_iters: int = 5,
    **options: Any,
) -> torch.Tensor:
    """L_CLD alone; see ``cross_level_discrimination`` for the formula and the options."""
    return cross_level_discrimination(
        group1, group2, clusters, temperature, num_iters, **options
    ).loss


# --------------------------------------------------------------------------------------------
# method
# --------------------------------------------------------------------------------------------
@dataclass
class CLDConfig(MoCoConfig):
    """Defaults: the CIFAR-10 MoCo+CLD script (cld.md §6), harness clustering scope ``global``."""

    preset: str = "cld"
    temperature: float = 0.07  # instance τ (MoCo) or NT-Xent τ (base_loss=simclr)
    queue_size: int = 12288
    momentum: float = 0.999
    dim: int = 128
    head: str = "normlinear"  # linear | normlinear | mlp | normmlp (ImageNet NormMLP)
    head_hidden_dim: int | None = None
    views: int = 3
    direction: str = "one_way"
    key_view: str = "same"
    ema_timing: str = "after_step"
    bn_splits: int = 1
    queue_init: str = "uniform"
    base_loss: str = "moco"  # moco (official) | simclr (NT-Xent on the two online views)
    clusters: int = 200  # k (--clusters)
    cld_t: float = 0.2  # τ_G (--cld_t)
    cld_lambda: float = 0.8  # λ (--Lambda)
    num_iters: int = 5  # T (--num-iters)
    kmeans_init: str = "first_k"  # first_k (official) | random (seeded)
    kmeans_scope: str = "global"  # global (harness default) | local (official: per-process batch)
    centroids: str = "raw"  # raw (official) | normalized
    centroid_grad: bool = True  # true (official) | false: detach the centroids


@register_method("cld")
class CLD(MoCo):
    """MoCo (or SimCLR) plus the CLD group branch on the same pooled backbone features.

    Heads: the instance head is MoCo's (``linear``/``normlinear``: one (unit-row) Linear d→D on
    the pooled features; ``mlp``: Linear(d→h)→ReLU→Linear(h→D); ``normmlp``: the same with a
    unit-row last layer). The group head is a second last layer of the same kind (Linear or
    NormLinear, D outputs) on the same input as the instance head's last layer: the pooled
    features, or the shared Linear→ReLU trunk of the MLP heads (CLD's NormMLP). Both outputs are
    L2-normalised in the losses, which makes NormLinear equal to CLD's NormedLinear (whose input
    normalisation cancels under the output normalisation).

    The momentum encoder copies backbone + instance head only: CLD's EMA model also carries a
    group head, but its output is never used.
    """

    Config = CLDConfig

    @classmethod
    def validate_config(cls, config: CLDConfig) -> None:
        check_choice("method.head", config.head, CLD_HEADS)
        check_choice("method.base_loss", config.base_loss, BASE_LOSSES)
        check_choice("method.kmeans_init", config.kmeans_init, KMEANS_INITS)
        check_choice("method.kmeans_scope", config.kmeans_scope, KMEANS_SCOPES)
        check_choice("method.centroids", config.centroids, CENTROIDS)
        check_positive("method.cld_t", config.cld_t)
        check_positive("method.cld_lambda", config.cld_lambda, allow_zero=True)
        for key in ("clusters", "num_iters"):
            value = getattr(config, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MethodConfigError(
                    f"invalid method.{key}={value!r}; it must be an integer >= 1"
                )
        super().validate_config(dataclasses.replace(config, head=_moco_head(config.head)))
        if config.base_loss == "simclr" and config.views != 2:
            raise MethodConfigError(
                f"method.base_loss=simclr uses two views, got method.views={config.views}; "
                "set method.views=2"
            )
        if config.base_loss == "moco" and config.views == 2 and config.direction != "symmetric":
            raise MethodConfigError(
                "method.views=2 with the MoCo base needs two online views, i.e. the symmetric "
                f"instance term; set method.direction=symmetric (got {config.direction!r})"
            )

    def __init__(self, backbone: nn.Module, config: CLDConfig) -> None:
        # MoCo builds backbone, instance head, momentum encoder and queue in the same order as
        # moco/cld_base, so matched seeds give CLD the base's initial instance branch and queue.
        super().__init__(backbone, dataclasses.replace(config, head=_moco_head(config.head)))
        self.config = config
        if config.head == "normmlp":
            self.head[-1] = NormLinear(self.head[-1].in_features, config.dim)
            self.key_encoder = MomentumEncoder(self.online)
        last = self.head[-1] if isinstance(self.head, nn.Sequential) else self.head
        in_dim = last.weight.shape[1]
        self.group_head = (
            NormLinear(in_dim, config.dim)
            if config.head in ("normlinear", "normmlp")
            else nn.Linear(in_dim, config.dim)
        )
        if config.base_loss == "simclr":
            # SimCLR has neither momentum encoder nor queue; keep the attributes, drop the state.
            self.key_encoder = None
            self.queue = None

    # -- data ------------------------------------------------------------------------------
    def view_kinds(self) -> list[str]:
        if self.config.base_loss == "simclr":
            return ["shared", "shared"]
        return super().view_kinds()

    def local_bn_modules(self) -> list[nn.Module]:
        # the SimCLR base has no key encoder to keep out of SyncBN
        return super().local_bn_modules() if self.config.base_loss == "moco" else []

    def clustering_batch(self, batch_size: int) -> int:
        """Rows k-means sees per view: the global batch, or the per-process one (scope local)."""
        if self.config.kmeans_scope == "local":
            return batch_size // world_size()
        return batch_size

    def check_batch(self, batch_size: int, dataset_size: int) -> None:
        if self.config.base_loss == "moco":
            super().check_batch(batch_size, dataset_size)
        else:
            SSLMethod.check_batch(self, batch_size, dataset_size)
        rows = self.clustering_batch(batch_size)
        if self.config.clusters > rows:
            raise MethodConfigError(
                f"method.clusters={self.config.clusters} exceeds the {rows} images k-means "
                f"clusters per view (batch_size={batch_size}, kmeans_scope="
                f"{self.config.kmeans_scope}); use at most {rows} clusters or a larger batch"
            )

    # -- training --------------------------------------------------------------------------
    def _project(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(instance output, group output) of one view, sharing backbone and MLP trunk."""
        features = self.backbone(images)
        if isinstance(self.head, nn.Sequential):
            features = self.head[:-1](features)
            return self.head[-1](features), self.group_head(features)
        return self.head(features), self.group_head(features)

    def _instance_loss(
        self, views: list[torch.Tensor], outputs: list[torch.Tensor]
    ) -> torch.Tensor:
        cfg = self.config
        device_type = outputs[0].device.type
        if cfg.base_loss == "simclr":
            with torch.autocast(device_type=device_type, enabled=False):
                return nt_xent_loss(
                    [gather(o.float(), with_grad=True) for o in outputs], cfg.temperature
                )
        # keys come from the momentum encoder under the caller's precision; the losses in float32
        if cfg.views == 3:
            keys = [self._keys(views[2])] * 2
        else:
            keys = [self._keys(views[1]), self._keys(views[0])]
        queue = self.queue.features().clone()
        with torch.autocast(device_type=device_type, enabled=False):
            loss = torch.stack(
                [
                    moco_infonce_loss(o.float(), k, queue, cfg.temperature)
                    for o, k in zip(outputs, keys, strict=True)
                ]
            ).mean()
        # three crops enqueue the one key batch once; two views enqueue both (k1 then k2)
        self.queue.push(keys[0] if cfg.views == 3 else torch.cat([keys[1], keys[0]]))
        return loss

    def training_step(
        self, views: list[torch.Tensor], indices: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        cfg = self.config
        if cfg.base_loss == "moco" and cfg.ema_timing == "before_keys":
            self.key_encoder.update(self.online, cfg.momentum)
        # CLD runs between the two online views, never on the key view.
        projected = [self._project(v) for v in views[:2]]
        instance = self._instance_loss(views, [p[0] for p in projected])
        out = {"loss_instance": instance.detach()}
        if cfg.cld_lambda == 0:
            out["loss"] = instance
            return out
        group = [p[1].float() for p in projected]
        if cfg.kmeans_scope == "global":
            # Every process clusters the same global batch and computes the same L_CLD; the
            # gather's summed backward then gives each process the gradient of its own rows,
            # so W processes match one (the instance term is a per-process mean, averaged).
            group = [gather(g, with_grad=True) for g in group]
        generator = (
            generator_from_global_rng(group[0].device) if cfg.kmeans_init == "random" else None
        )
        terms = cross_level_discrimination(
            group[0],
            group[1],
            cfg.clusters,
            cfg.cld_t,
            cfg.num_iters,
            centroid_mode=cfg.centroids,
            centroid_grad=cfg.centroid_grad,
            kmeans_init=cfg.kmeans_init,
            generator=generator,
        )
        out.update(
            loss=instance + cfg.cld_lambda * terms.loss,
            loss_cld=terms.loss.detach(),
            cld_accuracy=terms.accuracy,
            clusters_used=terms.clusters_used,
        )
        return out

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        if self.config.base_loss == "moco":
            super().after_optimizer_step(step, total_steps)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """float32 for half/bfloat16/float32 inputs; float64 kept (reference checks, gradcheck)."""
    return x if x.dtype == torch.float64 else x.float()


def _moco_head(head: str) -> str:
    """The MoCo head CLD's head is built from (normmlp = mlp with a unit-row last layer)."""
    return "mlp" if head == "normmlp" else head
