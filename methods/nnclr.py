"""NNCLR: nearest-neighbour contrastive learning (docs/methods/nnclr.md).

The anchor of SimCLR's contrast is replaced by its nearest neighbour in a support set of earlier
embeddings; the positive is the predictor output of the other view, the negatives are the other
images' predictor outputs in the global batch. Preset ``solo`` (configs/method/nnclr.yaml) is
solo-learn's NNCLR, which the default options reproduce:

- ``loss_form=cross_view``: the paper's loss as solo-learn computes it (only p is all-gathered);
  ``ntxent`` is lightly's full 2-view NT-Xent on [NN; p].
- ``queue_init=random_unit``: the support set starts as random unit vectors (solo-learn), so early
  neighbours are noise; ``empty`` counts only pushed rows (clean).
- ``queue_view=1``: the support set holds view 1's normalised projections (solo-learn); ``2`` is
  lightly's choice.
- ``exclude_self=false``: a stale copy of the anchor image in the support set may be its own
  neighbour (solo-learn's 65,536-entry queue on 50,000 CIFAR images); ``true`` masks entries with
  the anchor's image index before the arg-max. ``nn_self_rate`` is logged either way.

Public pieces reused by All4One: ``nn_infonce`` (the cross-view InfoNCE with gathered
candidates), ``support_neighbours`` (cosine top-k in a ``FeatureQueue`` with optional self
exclusion) and ``neighbour_metrics``; the heads both use are in ``methods.blocks``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
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
    IndexLabelsMixin,
    build_nnclr_predictor,
    build_nnclr_projector,
    float32_region,
    gather,
    l2_normalize,
    multi_positive_infonce,
    rank,
)
from methods.simclr import nt_xent_loss

LOSS_FORMS = ("cross_view", "ntxent")
QUEUE_INITS = ("random_unit", "empty")
QUEUE_VIEWS = (1, 2)


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------
def nn_infonce(anchor: torch.Tensor, candidates: torch.Tensor, temperature: float) -> torch.Tensor:
    """info(A, P, τ): cross-view InfoNCE with local anchors and globally gathered candidates.

    With â = A / max(‖A‖, 1e-8) for the B_l local rows, P̃ the all-gather of P over processes
    (B rows, gradient summed back to each process) and g(i) the global index of local row i:

        info = −(1/B_l) Σ_i log[ exp(â_i·p̂̃_g(i) / τ) / Σ_{k=1}^{B} exp(â_i·p̂̃_k / τ) ]

    solo-learn's ``nnclr_loss_func`` (after its change to gather p). Gradients reach both A and P;
    NNCLR passes constant neighbours as A, All4One passes transformer outputs. Any B_l works.
    """
    check_positive("temperature", temperature)
    if anchor.shape != candidates.shape or anchor.ndim != 2:
        raise ValueError(
            f"anchor and candidates must both be (B, D), got {tuple(anchor.shape)} and "
            f"{tuple(candidates.shape)}"
        )
    check_matrices("nn_infonce", anchor=anchor, candidates=candidates)  # B = 0: a mean over nothing
    with float32_region(anchor):
        a = l2_normalize(anchor.float())
        p = gather(l2_normalize(candidates.float()), with_grad=True)
        logits = a @ p.T / temperature
        local = a.shape[0]
        rows = torch.arange(local, device=a.device)
        positive = torch.zeros(logits.shape, dtype=torch.bool, device=a.device)
        # every process holds an equal share of the global batch, in rank order after the gather
        positive[rows, rows + rank() * local] = True
        return multi_positive_infonce(logits, positive, ~positive)


def nnclr_loss(
    nn1: torch.Tensor,
    p1: torch.Tensor,
    nn2: torch.Tensor,
    p2: torch.Tensor,
    temperature: float = 0.2,
    form: str = "cross_view",
) -> torch.Tensor:
    """Symmetric NNCLR loss from view-v neighbours ``nn_v`` and predictions ``p_v`` (each (B_l, D)).

    - ``cross_view`` (paper, solo-learn): L = ½·info(NN_1, p_2, τ) + ½·info(NN_2, p_1, τ), see
      ``nn_infonce``: anchors are the local neighbours, candidates the gathered predictions.
    - ``ntxent`` (lightly): L = ½·NTXent(NN_1, p_2) + ½·NTXent(NN_2, p_1), where NTXent(a, b) is
      the 2-view NT-Xent over the 2B gathered rows [ã; b̃]: for every row x,
      ℓ_x = −log[ e^{x̂·x̂⁺/τ} / Σ_{y≠x} e^{x̂·ŷ/τ} ], x⁺ its partner in the other half, so the
      negatives include the other neighbours and the other predictions in both directions.

    Neighbours are used as given (NNCLR's are constants from the support set).
    """
    check_choice("loss form", form, LOSS_FORMS)
    # The two views are of the same B_l images: each half alone would accept two batch sizes.
    check_matrices("nnclr_loss", nn1=nn1, p1=p1, nn2=nn2, p2=p2)
    if form == "cross_view":
        return 0.5 * nn_infonce(nn1, p2, temperature) + 0.5 * nn_infonce(nn2, p1, temperature)
    with float32_region(p1):
        # Every process computes the same loss over the gathered batch; with the summing gather
        # backward and the optimiser's gradient average this is the one-process gradient, as in
        # SimCLR.
        halves = []
        for anchor, positive in ((nn1, p2), (nn2, p1)):
            a = gather(anchor.float(), with_grad=True)
            b = gather(positive.float(), with_grad=True)
            halves.append(nt_xent_loss([a, b], temperature=temperature))
        return 0.5 * halves[0] + 0.5 * halves[1]


# --------------------------------------------------------------------------------------------
# support set
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def support_neighbours(
    query: torch.Tensor,
    queue: FeatureQueue,
    k: int = 1,
    *,
    query_ids: torch.Tensor | None = None,
    exclude_self: bool = False,
    current: torch.Tensor | None = None,
    current_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k support-set rows most cosine-similar to each query row, most similar first.

    Returns ``(values (B, k, D), ids (B, k))``; ``ids`` are the image indices stored with the
    entries (−1 for rows of the random initialisation). Only filled rows are searched.

    - ``exclude_self``: entries whose image index equals the query's ``query_ids`` are masked
      before the top-k (the clean fix of a queue larger than the dataset).
    - ``current`` / ``current_ids``: the global batch that will be pushed after the loss. They join
      the search only while the queue holds fewer than k entries, i.e. on the first step of an
      ``empty`` queue; the batch then serves as its own support set for that one step.
    """
    # The lookup runs in float32 under autocast too: half-precision similarities would pick other
    # neighbours whenever two candidates are within rounding of each other.
    with float32_region(query):
        return _lookup(
            query.detach().float(), queue, k, query_ids, exclude_self, current, current_ids
        )


def _lookup(
    query: torch.Tensor,
    queue: FeatureQueue,
    k: int,
    query_ids: torch.Tensor | None,
    exclude_self: bool,
    current: torch.Tensor | None,
    current_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``support_neighbours`` on a float32, detached query."""
    filled = int(queue.filled)
    if not exclude_self and filled >= k:
        values, idx = queue.nearest(query, k)
        return values, queue.labels[idx]
    bank, ids = queue.features(), queue.labels[:filled]
    if filled < k:
        if current is None or current_ids is None:
            raise MethodConfigError(
                f"the support set holds {filled} embeddings, fewer than the k={k} neighbours asked"
            )
        bank = torch.cat([bank, current.detach().to(bank.dtype)])
        ids = torch.cat([ids, current_ids.to(ids.dtype)])
    sims = l2_normalize(query.to(bank.dtype)) @ l2_normalize(bank).T
    if exclude_self:
        if query_ids is None:
            raise ValueError("exclude_self needs the query rows' image indices")
        sims = sims.masked_fill(ids[None, :] == query_ids[:, None], float("-inf"))
    top = sims.topk(k, dim=1)
    if exclude_self and not bool(torch.isfinite(top.values).all()):
        raise MethodConfigError(
            f"fewer than k={k} support-set entries remain once each image's own entries are "
            f"excluded (support set of {bank.shape[0]}); use a larger queue or batch"
        )
    return bank[top.indices], ids[top.indices]


@torch.no_grad()
def neighbour_metrics(
    nn_ids: torch.Tensor, indices: torch.Tensor, index_labels: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """Diagnostics of the first neighbours ``nn_ids`` (B,) of images ``indices`` (B,).

    ``nn_self_rate``: fraction whose neighbour is a stored copy of the anchor image itself.
    ``nn_label_acc`` (only with ``index_labels``, the label of every pre-training index):
    fraction whose neighbour has the anchor's label, counted over all anchors as solo-learn does.
    """
    out = {"nn_self_rate": (nn_ids == indices).float().mean()}
    if index_labels is not None:
        stored = nn_ids >= 0
        nn_labels = torch.where(stored, index_labels[nn_ids.clamp(min=0)], -1)
        hit = stored & (nn_labels == index_labels[indices]) & (nn_labels >= 0)
        out["nn_label_acc"] = hit.float().mean()
    return out


# --------------------------------------------------------------------------------------------
# method
# --------------------------------------------------------------------------------------------
@dataclass
class NNCLRConfig:
    """Defaults: preset ``solo`` (solo-learn scripts/pretrain/*/nnclr.yaml)."""

    preset: str = "solo"
    temperature: float = 0.2  # solo-learn; paper 0.1 (unverified), lightly 0.5
    queue_size: int = 65536  # support set M, a multiple of the global batch; digits: 1024
    queue_init: str = "random_unit"  # random_unit (solo-learn: early neighbours are noise) | empty
    queue_view: int = 1  # view whose normalised projections fill the queue: 1 (solo-learn) | 2 (lightly)
    proj_hidden_dim: int = 2048
    proj_output_dim: int = 256
    pred_hidden_dim: int = 4096
    loss_form: str = "cross_view"  # cross_view (paper, solo-learn) | ntxent (lightly's NT-Xent on [NN; p])
    exclude_self: bool = False  # True: mask stored copies of the anchor image before the arg-max (clean)


@register_method("nnclr")
class NNCLR(IndexLabelsMixin, SSLMethod):
    Config = NNCLRConfig
    base_presets = ("simclr",)  # NNCLR replaces SimCLR's positive by a neighbour
    paper_aliases = ("nnclr",)
    optimizer_defaults = {
        "name": "lars", "lr": 0.4, "lr_scaling": "linear", "lr_reference_batch": 256,  # lr × B/256
        "weight_decay": 1.0e-5, "momentum": 0.9, "trust_coefficient": 0.02, "trust_clip": True,
        "exclude_1d": True, "schedule": "warmup_cosine", "warmup_epochs": 10,
    }
    dataset_defaults = {"digits": {"queue_size": 1024}}

    @classmethod
    def validate_config(cls, config: NNCLRConfig) -> None:
        check_choice("method.loss_form", config.loss_form, LOSS_FORMS)
        check_choice("method.queue_init", config.queue_init, QUEUE_INITS)
        check_choice("method.queue_view", config.queue_view, QUEUE_VIEWS)
        check_choice("method.exclude_self", config.exclude_self, (False, True))
        check_positive("method.temperature", config.temperature)
        for key in ("queue_size", "proj_hidden_dim", "proj_output_dim", "pred_hidden_dim"):
            check_positive(f"method.{key}", getattr(config, key))

    def __init__(self, backbone: nn.Module, config: NNCLRConfig) -> None:
        super().__init__(backbone, config)
        self.projector = build_nnclr_projector(
            self.feature_dim, config.proj_hidden_dim, config.proj_output_dim
        )
        self.predictor = build_nnclr_predictor(config.proj_output_dim, config.pred_hidden_dim)
        self.queue = FeatureQueue(config.queue_size, config.proj_output_dim, init=config.queue_init)
        self.register_buffer("index_labels", None, persistent=False)

    def official_view_kinds(self, dataset: str) -> list[str]:
        return ["byol1", "byol2"]  # BYOL's asymmetric pair, as solo-learn's configs

    def check_batch(self, batch_size: int, dataset_size: int) -> None:
        super().check_batch(batch_size, dataset_size)
        self.queue.check_batch(batch_size)

    def training_step(
        self, views: list[torch.Tensor], indices: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        if len(views) != 2:
            raise ValueError(f"NNCLR takes 2 views, got {len(views)}")
        z = [self.projector(self.backbone(v)) for v in views]
        p = [self.predictor(zi) for zi in z]
        return self.loss_and_update(z, p, indices)

    def loss_and_update(
        self, z: list[torch.Tensor], p: list[torch.Tensor], indices: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Neighbour lookup, loss and queue push from projections ``z`` and predictions ``p``.

        ẑ_v (detached) serves only the lookup and the queue; the loss sees p from the
        un-normalised z (solo-learn ``forward``).
        """
        cfg = self.config
        z_hat = [l2_normalize(zi.detach().float()) for zi in z]
        pushed = z_hat[cfg.queue_view - 1]
        current = current_ids = None
        if int(self.queue.filled) < 1:  # first step of an empty queue only
            current = gather(pushed, with_grad=False)
            current_ids = gather(indices, with_grad=False)
        nn_v, ids_v = [], []
        for view in range(2):
            values, ids = support_neighbours(
                z_hat[view], self.queue, 1, query_ids=indices, exclude_self=cfg.exclude_self,
                current=current, current_ids=current_ids,
            )
            nn_v.append(values[:, 0])
            ids_v.append(ids[:, 0])
        loss = nnclr_loss(nn_v[0], p[0], nn_v[1], p[1], cfg.temperature, cfg.loss_form)
        # Pushed after the loss: the lookup above saw earlier steps only.
        self.queue.push(pushed, indices)
        return {"loss": loss, **neighbour_metrics(ids_v[0], indices, self.index_labels)}
