"""CLD: cross-level instance-group discrimination on top of MoCo or SimCLR (docs/methods/cld.md).

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

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
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
    FeatureQueue,
    MomentumEncoder,
    NormLinear,
    at_least_float32,
    convert_split_bn,
    float32_region,
    gather,
    l2_normalize,
    world_size,
)
from methods.moco import HEADS as MOCO_HEADS
from methods.moco import (
    MoCoConfig,
    build_head,
    check_moco_batch,
    check_moco_options,
    cld_official_kind,
    moco_infonce_loss,
    moco_view_kinds,
    momentum_keys,
)
from methods.simclr import nt_xent_loss

CLD_HEADS = (*MOCO_HEADS, "normmlp")
BASE_LOSSES = ("moco", "simclr")
CENTROIDS = ("raw", "normalized")
KMEANS_SCOPES = ("global", "local")


# --------------------------------------------------------------------------------------------
# batch k-means and its per-step random stream
# --------------------------------------------------------------------------------------------
KMEANS_INITS = ("first_k", "random")


def generator_from_global_rng(device: torch.device | str | None = None) -> torch.Generator:
    """A CPU generator seeded by one draw from torch's global CPU RNG.

    The engine seeds the global RNG per epoch, so the stream is reproducible; with W > 1 the seed
    is broadcast from rank 0 so that every process draws the same permutations (a clustering or a
    batch shuffle that differed between processes would break the gathered-gradient rule).
    ``device`` is where the broadcast buffer lives (NCCL needs a CUDA tensor).
    """
    seed = torch.randint(0, 2**62, (1,), dtype=torch.long)
    if world_size() > 1:
        buffer = seed.to(device if device is not None else "cpu")
        dist.broadcast(buffer, src=0)
        seed = buffer.cpu()
    return torch.Generator().manual_seed(int(seed.item()))


def _kmeans_slack(sq_x: torch.Tensor, sq_c: torch.Tensor) -> torch.Tensor:
    # The matmul form ‖x‖² − 2x·c + ‖c‖² is only used to shortlist centroids; its rounding error
    # is a few ulp of ‖x‖² + ‖c‖² in IEEE float32, up to ~1e-3 relative when float32 matmuls run
    # in TF32 (or bf16) on a GPU. The shortlist keeps everything within a generous multiple.
    try:
        ieee = sq_x.dtype == torch.float64 or torch.get_float32_matmul_precision() == "highest"
    except RuntimeError:  # torch refuses to report it when legacy and new TF32 flags are mixed
        ieee = False
    rtol = 1e-4 if ieee else 2e-2
    return rtol * (sq_x + sq_c.max().clamp_min(0)) + 1e-12


def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Γ(i) = argmin_j Σ_d (x_id − c_jd)², the lowest index on ties (``argmin``'s rule).

    The distance is the direct sum of squared differences, as CLD's ``KMeans`` computes it (so a
    point sitting exactly on a centroid is at distance exactly 0). Materialising the (N, K, D)
    difference tensor costs ~50× a matmul on a CPU, so candidates are shortlisted with the
    expanded form and only those pairs get the direct distance; every centroid within the
    expanded form's error bound of the row minimum is a candidate, so the result is the direct
    form's argmin.
    """
    sq_x = (x * x).sum(dim=1, keepdim=True)
    sq_c = (centroids * centroids).sum(dim=1)
    approx = sq_x - 2.0 * (x @ centroids.T) + sq_c
    best = approx.min(dim=1, keepdim=True).values
    rows, cols = (approx <= best + _kmeans_slack(sq_x, sq_c)).nonzero(as_tuple=True)
    exact = torch.full_like(approx, float("inf"))
    exact[rows, cols] = ((x[rows] - centroids[cols]) ** 2).sum(dim=-1)
    return exact.argmin(dim=1)


def cluster_means(x: torch.Tensor, assignments: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """M_j = Σ_{i: Γ(i)=j} x_i / max(n_j, 1): an empty cluster gets count 1 and sum 0, i.e. a
    zero centroid (CLD's ``labels_count_all`` rule). Differentiable in ``x``."""
    sums = x.new_zeros(n_clusters, x.shape[1]).index_add(0, assignments, x)
    counts = torch.bincount(assignments, minlength=n_clusters).clamp_min(1).to(x.dtype)
    return sums / counts[:, None]


# Under torch.compile k-means runs eagerly, one graph break per call: its candidate shortlist has
# a data-dependent shape (nonzero) and its slack depends on the float32 matmul precision setting.
@torch.compiler.disable
def spherical_kmeans(
    x: torch.Tensor,
    n_clusters: int,
    n_iters: int,
    generator: torch.Generator | None = None,
    init: str = "first_k",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch k-means of the rows of ``x`` (N, D), exactly as CLD's ``spectral_clustering.KMeans``.

    Meant for unit rows (CLD's group embeddings) but the rows are used as given:

    1. Initial centroids: the first min(k, N) rows (``first_k``, CLD), or min(k, N) distinct rows
       drawn with ``generator`` (``random``; torch's default generator when None).
    2. ``n_iters`` times: assign Γ(i) = argmin_j Σ_d (x_id − c_jd)² (direct form, lowest index on
       ties), then recompute c_j = Σ_{Γ(i)=j} x_i / max(n_j, 1) for j < k. With k > N the first
       assignment therefore sees N centroids and later ones k, the surplus ones zero.
    3. Returns ``(centroids (k, D), assignments (N,))``: the labels of the last assignment and the
       means recomputed from them.

    Centroids are **not** re-normalised (norm ≤ 1 for unit rows) and an empty cluster's centroid
    is 0. They carry gradient to ``x`` (only through the final means; the assignments are
    discrete and the earlier iterations only choose them), as in CLD, where they are built by
    scatter-add from the undetached features. Runs in float32 (float64 kept) with autocast off,
    on ``x``'s device; the random initialisation is drawn on the CPU, so it is the same on every
    device for a given generator state.
    """
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"k-means needs a non-empty (N, D) tensor, got shape {tuple(x.shape)}")
    if n_clusters < 1 or n_iters < 1:
        raise ValueError(
            f"k-means needs n_clusters >= 1 and n_iters >= 1, got {n_clusters} and {n_iters}"
        )
    if init not in KMEANS_INITS:
        raise ValueError(f"invalid k-means init {init!r}; valid: {', '.join(KMEANS_INITS)}")
    x = at_least_float32(x)
    n = x.shape[0]
    with float32_region(x):
        with torch.no_grad():
            points = x.detach()
            if init == "first_k":
                centroids = points[:n_clusters].clone()
            else:
                pick = torch.randperm(n, generator=generator)[:n_clusters].to(x.device)
                centroids = points[pick]
            for it in range(n_iters):
                assignments = nearest_centroid(points, centroids)
                if it + 1 < n_iters:
                    centroids = cluster_means(points, assignments, n_clusters)
        return cluster_means(x, assignments, n_clusters), assignments


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
    # (a data-dependent check: skipped while torch.compile traces, where it would break the graph)
    if n and not torch.compiler.is_compiling() and not 0 <= int(labels.min()) <= int(labels.max()) < k:
        raise ValueError(
            f"cross_level_cross_entropy: labels must lie in [0, {k}) for {k} centroids, got "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    with float32_region(anchors):
        g = l2_normalize(at_least_float32(anchors))
        m = at_least_float32(centroids)
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
    g1 = l2_normalize(at_least_float32(group1))
    g2 = l2_normalize(at_least_float32(group2))
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
        # (non-empty clusters counted by a fixed-shape fill: bincount's shape depends on data)
        used = 0.5 * sum(
            labels.new_zeros(clusters).index_fill_(0, labels, 1).sum() for labels in (labels1, labels2)
        ).float()
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
    """Defaults: the CIFAR-10 MoCo+CLD script, harness clustering scope ``global``; the instance
    branch's options are MoCo's, those not restated here with MoCo's defaults. ``views=2`` (two
    online views and the symmetric MoCo term) needs ``direction=symmetric``."""

    preset: str = "cld"
    # instance branch
    temperature: float = 0.07  # instance τ (MoCo) or NT-Xent τ (base_loss=simclr)
    queue_size: int = 12288
    head: str = "normlinear"  # linear | normlinear (CIFAR) | mlp | normmlp (ImageNet NormMLP)
    views: int = 3  # 3: two online crops + one key crop (official) | 2
    ema_timing: str = "after_step"  # after_step (CIFAR code) | before_keys (ImageNet builder)
    queue_init: str = "uniform"  # uniform (CLD's MemoryMoCo) | random_unit
    base_loss: str = "moco"  # moco (official) | simclr (NT-Xent on the two online views; views=2)
    # group branch
    clusters: int = 200  # k (--clusters); must not exceed the clustering batch
    cld_t: float = 0.2  # τ_G (--cld_t)
    cld_lambda: float = 0.8  # λ (--Lambda)
    num_iters: int = 5  # T, k-means iterations (--num-iters)
    kmeans_init: str = "first_k"  # first_k (official: the first k rows) | random (seeded per step)
    kmeans_scope: str = "global"  # global (all-gathered batch) | local (official: per process)
    centroids: str = "raw"  # raw (official: not re-normalised, zero if empty) | normalized
    centroid_grad: bool = True  # True (official: gradient through the centroids) | False


@register_method("cld")
class CLD(SSLMethod):
    """MoCo (or SimCLR) plus the CLD group branch on the same pooled backbone features.

    The MoCo instance branch is composed from MoCo's pieces (``methods.moco``: head, momentum
    encoder, queue, keys under shuffle-BN, option and batch checks), built in MoCo's order so
    that matched seeds give CLD the initial instance branch and queue of moco/cld_base. With
    ``base_loss=simclr`` there is no momentum encoder and no queue.

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
    base_presets = ("moco_cld_base",)  # the same three-crop MoCo with λ = 0
    paper_aliases = ("cld",)
    small_options = {"clusters": 4}  # k = 200 clusters need batches of >= 200 images
    optimizer_defaults = {
        "name": "sgd", "lr": 0.03, "lr_scaling": "linear", "lr_reference_batch": 128,
        "weight_decay": 8.0e-4, "momentum": 0.9, "exclude_1d": False, "schedule": "cld",
        "warmup_epochs": 5,
    }
    # CIFAR-10 script values above (also used for digits, STL-10 and Tiny-ImageNet).
    dataset_defaults = {
        "digits": {"queue_size": 1024},
        "cifar100": {"queue_size": 4096, "cld_lambda": 0.25, "optimizer": {"weight_decay": 7.0e-4}},
        "imagenet100": {
            "temperature": 0.2, "queue_size": 65536, "head": "normmlp", "ema_timing": "before_keys",
            "queue_init": "random_unit", "clusters": 120, "cld_t": 0.4, "cld_lambda": 0.25,
            "optimizer": {
                "lr": 0.2, "lr_reference_batch": 512, "weight_decay": 1.0e-4,
                "schedule": "epoch_cosine",
            },
        },
    }

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
        check_moco_options(config, heads=CLD_HEADS)
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
        convert_split_bn(backbone, config.bn_splits)
        super().__init__(backbone, config)
        moco = config.base_loss == "moco"
        # Built (and registered) in MoCo's order: head, online network, key encoder, queue; the
        # random draws come in the order head, queue, NormMLP's last layer, group head.
        self.head = build_head(
            _moco_head(config.head), self.feature_dim, config.head_hidden_dim, config.dim
        )
        self.online = nn.Sequential(self.backbone, self.head)
        queue = FeatureQueue(config.queue_size, config.dim, init=config.queue_init) if moco else None
        if config.head == "normmlp":
            self.head[-1] = NormLinear(self.head[-1].in_features, config.dim)
        if moco:
            self.key_encoder = MomentumEncoder(self.online)
            self.queue = queue
        last = self.head[-1] if isinstance(self.head, nn.Sequential) else self.head
        in_dim = last.weight.shape[1]
        self.group_head = (
            NormLinear(in_dim, config.dim)
            if config.head in ("normlinear", "normmlp")
            else nn.Linear(in_dim, config.dim)
        )
        # The key encoder's shuffle-BN with W > 1, as MoCo's (``MoCo.shuffle_bn``).
        self.shuffle_bn: bool = moco

    # -- data ------------------------------------------------------------------------------
    def view_kinds(self) -> list[str]:
        if self.config.base_loss == "simclr":
            return ["shared", "shared"]
        return moco_view_kinds(self.config)

    def official_view_kinds(self, dataset: str) -> list[str]:
        strong = cld_official_kind(dataset)
        if self.config.base_loss == "simclr":
            return [strong, strong]
        return moco_view_kinds(self.config, strong)

    def local_bn_modules(self) -> list[nn.Module]:
        # the SimCLR base has no key encoder to keep out of SyncBN
        return [self.key_encoder] if self.uses_shuffle_bn() else []

    def uses_shuffle_bn(self) -> bool:
        return self.config.base_loss == "moco" and self.shuffle_bn

    def updates_ema_in_training_step(self) -> bool:
        return self.config.base_loss == "moco" and self.config.ema_timing == "before_keys"

    def clustering_batch(self, batch_size: int) -> int:
        """Rows k-means sees per view: the global batch, or the per-process one (scope local)."""
        if self.config.kmeans_scope == "local":
            return batch_size // world_size()
        return batch_size

    def check_batch(self, batch_size: int, dataset_size: int) -> None:
        super().check_batch(batch_size, dataset_size)
        if self.config.base_loss == "moco":
            check_moco_batch(self.config, self.queue, batch_size, dataset_size)
        rows = self.clustering_batch(batch_size)
        if self.config.clusters > rows:
            raise MethodConfigError(
                f"method.clusters={self.config.clusters} exceeds the {rows} images k-means "
                f"clusters per view (batch_size={batch_size}, kmeans_scope="
                f"{self.config.kmeans_scope}); use at most {rows} clusters or a larger batch"
            )

    # -- training --------------------------------------------------------------------------
    @torch.no_grad()
    def _keys(self, images: torch.Tensor) -> torch.Tensor:
        return momentum_keys(self.key_encoder, images, self.shuffle_bn)

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
        cfg = self.config
        if cfg.base_loss == "moco" and cfg.ema_timing == "after_step":
            self.key_encoder.update(self.online, cfg.momentum)


def _moco_head(head: str) -> str:
    """The MoCo head CLD's head is built from (normmlp = mlp with a unit-row last layer)."""
    return "mlp" if head == "normmlp" else head
