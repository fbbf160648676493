"""GroCo: group ordering constraints (docs/methods/groco.md; official code
ninatu/learning_by_sorting).

For each anchor embedding, the similarities to its positives (the other global views of its image)
and to its k hardest negatives (the most similar other images, in the anchor's own view) form one
group; a differentiable sorting network sorts the group and a binary cross-entropy asks every
positive to land on the top ranks and every negative below them. The default options reproduce the
official loss, quirks included; each departure docs/methods/groco.md §5 lists is a named option:

- ``negatives=same_view`` (official) | ``all_views``: negatives also from the other views of the
  other images.
- ``stop_grad=true`` (official): positives and negatives are detached, each view learns only
  through its own anchor terms | ``false``.
- ``gather_backward=local`` (official ``GatherLayer``: each process keeps only its own slice of the
  negatives' gradient) | ``sum`` (the harness rule). They agree while ``stop_grad=true``.
- ``sorter.network=odd_even`` (official) | ``bitonic`` | ``bitonic_merge`` (an approximation that
  needs its own steepness, docs/sorting-networks.md §8).

The sort itself lives in ``methods.sorting``; ``sorter.backend=group_sum`` (default) computes the
two group masses without forming the permutation matrix, ``columns`` and ``diffsort`` form it;
all three are exact to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from methods import register_method
from methods.base import MethodConfigError, SSLMethod, check_choice, check_positive
from methods.blocks import (
    GATHER_BACKWARDS,
    at_least_float32,
    build_projector,
    float32_region,
    gather,
    l2_normalize,
    rank,
)
from methods.sorting import DISTRIBUTIONS, NETWORKS, RANK_MASS_BACKENDS, rank_mass, soft_sort

NEGATIVES = ("same_view", "all_views")


class _HardestSimilarities(torch.autograd.Function):
    """The k largest entries of each row of ``anchors @ bank.T`` (a row's ``excluded`` column
    left out), with a backward that touches only the selected entries.

    The top-k is an index choice, so only k of the B similarities per row get a gradient: the
    anchors' gradient is a weighted sum of k bank rows (``embedding_bag``), O(B_l·k·D), instead of
    a dense B_l × B × D matmul, which at GroCo's group sizes is a large part of the loss's cost.
    """

    @staticmethod
    def forward(ctx, anchors: torch.Tensor, bank: torch.Tensor, k: int,  # type: ignore[override]
                image: torch.Tensor | None, excluded: torch.Tensor) -> torch.Tensor:
        sims = anchors @ bank.T
        owner = torch.arange(bank.shape[0], device=bank.device) if image is None else image
        sims.masked_fill_(excluded[:, None] == owner[None, :], float("-inf"))
        values, index = sims.topk(k, dim=1)
        ctx.save_for_backward(anchors, bank, index)
        return values

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        anchors, bank, index = ctx.saved_tensors
        grad_anchors = grad_bank = None
        if ctx.needs_input_grad[0]:
            # Σ_j g_ij bank[index_ij] per row, without materialising the (B_l, k, D) neighbours.
            grad_anchors = F.embedding_bag(index, bank, per_sample_weights=grad, mode="sum")
        if ctx.needs_input_grad[1]:  # stop_grad=false only: a dense scatter is fine here
            dense = grad.new_zeros(anchors.shape[0], bank.shape[0]).scatter_(1, index, grad)
            grad_bank = dense.T @ anchors
        return grad_anchors, grad_bank, None, None, None


def _group_masses(
    groups: torch.Tensor, topk_neg: int, network: str, distribution: str, steepness: float,
    art_lambda: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, q̄): each element's soft mass on the positive ranks (c ≥ k) and on the negative ranks."""
    n = groups.shape[1]
    positive_ranks = torch.arange(n, device=groups.device) >= topk_neg
    sort_args = dict(network=network, distribution=distribution, steepness=steepness,
                     art_lambda=art_lambda, split=topk_neg)
    if backend == "group_sum":
        # Every layer's mixing matrix is doubly stochastic, so P 1 = 1 and q̄ = P 1_{c<k} = 1 − q
        # in exact arithmetic: one right-to-left pass gives both halves, equal to the sums of the
        # formed P up to rounding (float64: ~1e-16). P itself is never formed.
        q = rank_mass(groups, positive_ranks, backend=backend, **sort_args)
        return q, 1 - q
    _, perm = soft_sort(groups, backend=backend, **sort_args)
    return perm[:, :, topk_neg:].sum(-1), perm[:, :, :topk_neg].sum(-1)


def group_ordering_loss(
    groups: torch.Tensor,
    topk_neg: int,
    network: str = "odd_even",
    distribution: str = "cauchy",
    steepness: float = 1.0,
    art_lambda: float = 0.25,
    backend: str = "group_sum",
) -> torch.Tensor:
    """GroCo's ordering loss on pre-built groups (B, n): the first ``topk_neg`` columns are
    negatives, the rest positives, each run ascending.

    With P the soft permutation of each row (P[r, c] = probability that element r lands at
    ascending rank c), labels y_r = 1[r ≥ k], q_r = clip(Σ_{c≥k} P[r, c], 0, 1) and
    q̄_r = clip(Σ_{c<k} P[r, c], 0, 1):

        ℓ = ½ [ BCE(q, y) + BCE(q̄, 1 − y) ],  BCE averaged over the B·n entries, logs ≥ −100.
    """
    if groups.ndim != 2 or not 1 <= topk_neg < groups.shape[1]:
        raise ValueError(
            f"groups must be (B, n) with 1 <= topk_neg < n; got shape {tuple(groups.shape)}, "
            f"topk_neg={topk_neg}"
        )
    # (a data-dependent check: skipped while torch.compile traces, where it would break the graph)
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(groups).all()):
        raise ValueError(
            f"non-finite similarity in GroCo's groups of size {groups.shape[1]} "
            "(NaN or inf in the embeddings)"
        )
    q, q_bar = _group_masses(groups, topk_neg, network, distribution, steepness, art_lambda,
                             backend)
    labels = (torch.arange(groups.shape[1], device=groups.device) >= topk_neg).to(q.dtype)
    labels = labels.expand_as(q)
    return 0.5 * (
        F.binary_cross_entropy(q.clamp(0, 1), labels)
        + F.binary_cross_entropy(q_bar.clamp(0, 1), 1 - labels)
    )


def groco_loss(
    views: list[torch.Tensor],
    topk_neg: int = 10,
    steepness: float = 1.0,
    n_pos_views: int | None = None,
    network: str = "odd_even",
    distribution: str = "cauchy",
    stop_grad: bool = True,
    backend: str = "group_sum",
    *,
    art_lambda: float = 0.25,
    negatives: str = "same_view",
    negative_views: list[torch.Tensor] | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """GroCo's group-ordering loss over V views; ``views[v]`` is (B_l, D), normalised inside.

    With ẑ = z / max(‖z‖, 1e-8), s(u, w) = û·ŵ, V_p = ``n_pos_views`` (default V) global views and
    sg = stop-gradient when ``stop_grad``, for anchor view a and image i:

    - positives  Pos_i = sort↑{ s(z_a[i], sg z_p[i]) : p < V_p, p ≠ a }            (m values)
    - negatives  Neg_i = sort↑ top-k{ s(z_a[i], sg z̃_a[j]) : j ≠ i }               (k values)
      z̃_a is view a of the global batch (``negative_views``; default the local views);
      ``negatives="all_views"`` draws from every view of every other image instead.
    - group      u_i = [Neg_i ‖ Pos_i] ∈ ℝⁿ, n = k + m, labels y_r = 1[r ≥ k]
    - P = soft permutation of u_i (diffsort convention: P[r, c] = P(element r lands at rank c))
      q_r = clip(Σ_{c≥k} P[r, c], 0, 1),  q̄_r = clip(Σ_{c<k} P[r, c], 0, 1)
    - ℓ_a = ½ [ BCE(q, y) + BCE(q̄, 1 − y) ], BCE averaged over the B_l·n entries, logs ≥ −100

    L = (1/V) Σ_a ℓ_a: every view, local crops included, is the anchor once; a local-crop anchor
    (a ≥ V_p) has all V_p global views as positives. ``offset`` is the global index of local row 0
    (its own column among the negatives is excluded). Computed in float32 (float64 inputs stay
    float64) with autocast off.
    """
    if not isinstance(views, (list, tuple)) or len(views) < 2:
        raise ValueError(f"GroCo needs a list of at least 2 views, got {type(views).__name__} "
                         f"of length {len(views) if isinstance(views, (list, tuple)) else '-'}")
    if any(v.ndim != 2 for v in views) or len({tuple(v.shape) for v in views}) != 1:
        raise ValueError(f"every view must be (B, D) of one shape, got {[tuple(v.shape) for v in views]}")
    n_views = len(views)
    n_pos = n_views if n_pos_views is None else n_pos_views
    if not 2 <= n_pos <= n_views:
        raise ValueError(f"n_pos_views={n_pos_views} must be in [2, {n_views}] for {n_views} views")
    check_choice("negatives", negatives, NEGATIVES)
    check_choice("backend", backend, RANK_MASS_BACKENDS)
    check_choice("network", network, NETWORKS)
    check_choice("distribution", distribution, DISTRIBUTIONS)
    check_positive("steepness", steepness)
    bank_views = list(views) if negative_views is None else list(negative_views)
    if len(bank_views) != n_views:
        raise ValueError(f"negative_views has {len(bank_views)} views, views has {n_views}")
    if any(b.ndim != 2 or b.shape[1] != views[0].shape[1] or b.shape[0] != bank_views[0].shape[0]
           for b in bank_views):
        raise ValueError(
            f"negative_views must be (B, D) of one shape with D = {views[0].shape[1]} like views; "
            f"got {[tuple(b.shape) for b in bank_views]}"
        )
    local, global_batch = views[0].shape[0], bank_views[0].shape[0]
    available = global_batch - 1 if negatives == "same_view" else n_views * (global_batch - 1)
    if isinstance(topk_neg, bool) or not isinstance(topk_neg, int) or not 1 <= topk_neg <= available:
        raise ValueError(
            f"topk_neg={topk_neg!r} must be a whole number in [1, {available}]: a global batch of "
            f"{global_batch} images has {available} {negatives.replace('_', '-')} negatives per anchor"
        )
    if not 0 <= offset <= global_batch - local:
        raise ValueError(f"offset={offset} does not place {local} local rows in a batch of {global_batch}")

    with float32_region(views[0]):
        z = [l2_normalize(at_least_float32(v)) for v in views]
        bank = [l2_normalize(at_least_float32(v)) for v in bank_views]
        if stop_grad:
            bank = [b.detach() for b in bank]
        targets = [zi.detach() for zi in z] if stop_grad else z
        own = torch.arange(local, device=z[0].device) + offset
        candidates, image = None, None
        if negatives == "all_views":
            candidates = torch.cat(bank)
            image = torch.arange(global_batch, device=z[0].device).repeat(n_views)
        # Anchors whose groups have the same size (global views: m = V_p − 1; local crops: V_p)
        # are sorted in one call: each view's BCE is a mean over B_l·n entries, so the mean over
        # the stacked rows, times the number of views stacked, is their sum.
        by_size: dict[int, list[torch.Tensor]] = {}
        for a in range(n_views):
            positives = torch.stack(
                [(z[a] * targets[p]).sum(-1) for p in range(n_pos) if p != a], dim=1
            ).sort(dim=1).values
            if negatives == "same_view":
                hardest = _HardestSimilarities.apply(z[a], bank[a], topk_neg, None, own)
            else:
                hardest = _HardestSimilarities.apply(z[a], candidates, topk_neg, image, own)
            groups = torch.cat([hardest.flip(1), positives], dim=1)
            by_size.setdefault(groups.shape[1], []).append(groups)
        total = z[0].new_zeros(())
        for stack in by_size.values():
            loss = group_ordering_loss(torch.cat(stack), topk_neg, network, distribution,
                                       steepness, art_lambda, backend)
            total = total + len(stack) * loss
        return total / n_views


@dataclass
class SorterConfig:
    network: str = "odd_even"  # odd_even (official) | bitonic | bitonic_merge (approximation, own β)
    distribution: str = "cauchy"  # logistic | logistic_phi | gaussian | reciprocal | cauchy | optimal
    steepness: float = 1.0  # β
    art_lambda: float = 0.25  # used by logistic_phi only
    backend: str = "group_sum"  # group_sum (never forms P) | columns | diffsort; all exact


@dataclass
class GroCoConfig:
    """Defaults: the official code (ninatu/learning_by_sorting), preset ``default``."""

    preset: str = "default"
    topk_neg: int = 10  # k hardest negatives per anchor; group size n = k + positives
    sorter: SorterConfig = field(default_factory=SorterConfig)
    views: int = 2  # global views (2, 3, 4, ...), `shared` augmentation family
    multicrop: bool = False  # True: 2 DINO-style global views + local_views local crops
    local_views: int = 6
    n_pos_views: int | None = None  # None: every global view can be a positive
    negatives: str = "same_view"  # same_view (official) | all_views (clean variant)
    stop_grad: bool = True  # detach positives and negatives (official)
    gather_backward: str = "local"  # local (official GatherLayer) | sum (harness rule)
    proj_output_dim: int = 2048


@register_method("groco")
class GroCo(SSLMethod):
    Config = GroCoConfig
    base_presets = ("simclr_groco_baseline",)  # the repository's SimCLR baseline
    paper_aliases = ("groco",)
    optimizer_defaults = {  # plain SGD, no LARS (train.py); lr, decay, warm-up: epoch_defaults
        "name": "sgd", "lr": None, "lr_scaling": "linear", "lr_reference_batch": 32,
        "weight_decay": None, "momentum": 0.9, "exclude_1d": False,
        "schedule": "warmup0_cosine", "warmup_epochs": None,
    }

    @classmethod
    def epoch_defaults(cls, epochs: int, options: dict[str, Any]) -> dict[str, Any]:
        """The official configs by length: base lr 0.75 up to 100 epochs (6.0 at B = 256), 0.375
        for 200-400 and 0.1875 for 800; warm-up 1 epoch up to 100 epochs (10 with multi-crop),
        else 10; weight decay 1e-6, or 2e-6 from 200 epochs with 4+ global views or multi-crop.
        Between the official lengths (chosen): 101-199 epochs take the 200-epoch values and
        401-799 the 400-epoch ones."""
        if epochs <= 100:
            lr, warmup = 0.75, 10 if options.get("multicrop") else 1
        elif epochs < 800:
            lr, warmup = 0.375, 10
        else:
            lr, warmup = 0.1875, 10
        many_views = bool(options.get("multicrop")) or (options.get("views") or 2) >= 4
        decay = 2.0e-6 if many_views and epochs > 100 else 1.0e-6
        return {"optimizer": {"lr": lr, "weight_decay": decay, "warmup_epochs": warmup}}

    @classmethod
    def validate_config(cls, config: GroCoConfig) -> None:
        sorter = config.sorter
        check_choice("method.sorter.network", sorter.network, NETWORKS)
        check_choice("method.sorter.distribution", sorter.distribution, DISTRIBUTIONS)
        check_choice("method.sorter.backend", sorter.backend, RANK_MASS_BACKENDS)
        check_positive("method.sorter.steepness", sorter.steepness)
        check_positive("method.sorter.art_lambda", sorter.art_lambda)
        check_choice("method.negatives", config.negatives, NEGATIVES)
        check_choice("method.gather_backward", config.gather_backward, GATHER_BACKWARDS)
        if isinstance(config.topk_neg, bool) or not isinstance(config.topk_neg, int) or config.topk_neg < 1:
            raise MethodConfigError(
                f"invalid method.topk_neg={config.topk_neg!r}; it must be a whole number >= 1"
            )
        if config.views < 2:
            raise MethodConfigError(f"invalid method.views={config.views}; GroCo needs >= 2 global views")
        if config.multicrop and config.local_views < 1:
            raise MethodConfigError(
                f"invalid method.local_views={config.local_views} with multicrop; it must be >= 1"
            )
        n_global = 2 if config.multicrop else config.views
        n_total = n_global + (config.local_views if config.multicrop else 0)
        if config.n_pos_views is not None and not 2 <= config.n_pos_views <= n_global:
            raise MethodConfigError(
                f"invalid method.n_pos_views={config.n_pos_views}; it must be in [2, {n_global}] "
                f"(the global views of {n_total}), or null for all of them"
            )

    def __init__(self, backbone: torch.nn.Module, config: GroCoConfig) -> None:
        super().__init__(backbone, config)
        # GroCo's RegularProjection(num_layers=3): hidden width = backbone width
        # (docs/methods/groco.md §4).
        self.projector = build_projector("groco", self.feature_dim, self.feature_dim,
                                         config.proj_output_dim)

    @property
    def n_pos_views(self) -> int:
        cfg = self.config
        if cfg.n_pos_views is not None:
            return cfg.n_pos_views
        return 2 if cfg.multicrop else cfg.views

    def view_kinds(self) -> list[str]:
        cfg = self.config
        if cfg.multicrop:
            return ["global1", "global2"] + ["local"] * cfg.local_views
        return ["shared"] * cfg.views

    def official_view_kinds(self, dataset: str) -> list[str]:
        # GroCo's DINO-style views, t1 and t2 alternating (3 views: t1, t2, t1)
        if self.config.multicrop:
            return self.view_kinds()
        return [("global1", "global2")[i % 2] for i in range(self.config.views)]

    def check_batch(self, batch_size: int, dataset_size: int) -> None:
        super().check_batch(batch_size, dataset_size)
        k = self.config.topk_neg
        per_anchor = batch_size - 1 if self.config.negatives == "same_view" else (
            len(self.view_kinds()) * (batch_size - 1))
        if k > per_anchor:
            raise MethodConfigError(
                f"method.topk_neg={k} needs more negatives than batch_size={batch_size} gives "
                f"({per_anchor} per anchor); use topk_neg <= {per_anchor} or a batch of at least "
                f"{k + 1 if self.config.negatives == 'same_view' else -(-k // len(self.view_kinds())) + 1}"
            )

    def training_step(self, views: list[torch.Tensor], indices: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.config
        z = [self.projector(self.backbone(v)) for v in views]
        # Only the negatives cross processes; the gradient through the gather is either summed
        # (harness rule) or, as the official GatherLayer does, this process's slice only.
        with_grad = not cfg.stop_grad
        bank = [gather(zi, with_grad=with_grad, backward=cfg.gather_backward) for zi in z]
        loss = groco_loss(
            z, topk_neg=cfg.topk_neg, steepness=cfg.sorter.steepness, n_pos_views=self.n_pos_views,
            network=cfg.sorter.network, distribution=cfg.sorter.distribution,
            stop_grad=cfg.stop_grad, backend=cfg.sorter.backend, art_lambda=cfg.sorter.art_lambda,
            negatives=cfg.negatives, negative_views=bank, offset=rank() * z[0].shape[0],
        )
        return {"loss": loss}
