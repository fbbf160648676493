"""SimCLR: multi-view NT-Xent, the pair-wise baseline (docs/methods/simclr.md).

Presets (configs/method): ``solo`` (default; solo-learn's 2048→256 projector, τ 0.2, LARS) and
``groco_baseline`` (GroCo repository's SimCLR: its 3-layer projector at D = 128, τ 0.1, LARC).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from methods import register_method
from methods.base import MethodConfigError, SSLMethod, check_choice, check_positive
from methods.blocks import build_projector, gather, l2_normalize, multi_positive_infonce

MULTIVIEW_MODES = ("sum_in_log", "all_pairs")
PROJECTORS = ("solo", "groco", "paper")


def keep_topk(mask: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """Restrict each row of ``mask`` to its ``k`` entries with the largest ``scores``."""
    masked = scores.masked_fill(~mask, float("-inf"))
    top = masked.topk(k, dim=1).indices
    kept = torch.zeros_like(mask)
    kept.scatter_(1, top, True)
    return kept & mask


def nt_xent_loss(
    views: list[torch.Tensor],
    temperature: float = 0.2,
    multiview: str = "sum_in_log",
    topk_neg: int | None = None,
    stop_grad: bool = False,
) -> torch.Tensor:
    """NT-Xent over V views of B images; each ``views[v]`` is (B, D), normalised inside.

    With ẑ = z / max(‖z‖, 1e-8) and s_ij = ẑ_i·ẑ_j / τ over all V·B embeddings:

    - ``sum_in_log`` (solo-learn; NT-Xent for V = 2):
      ℓ_i = −log[ Σ_{j∈pos(i)} e^{s_ij} / (Σ_{j∈pos(i)} e^{s_ij} + Σ_{k∈neg(i)} e^{s_ik}) ],
      pos(i) = the other views of i's image, neg(i) = every view of every other image;
      L = mean over all V·B anchors.
    - ``all_pairs`` (GroCo repository): for every view pair p < q, NT-Xent with anchors from views
      p and q, the partner as positive and every view of the other images as negatives (the
      image's remaining views are masked out); L = mean over pairs.

    ``topk_neg = k`` keeps only the k largest negative logits per anchor and ``stop_grad`` detaches
    the keys (the GroCo repository's truncated control). For V = 2 every mode is
    L = (1/2B) Σ_i −log( e^{s_i,p(i)} / Σ_{k≠i} e^{s_ik} ) (paper §2.1).
    """
    if len(views) < 2:
        raise ValueError(f"NT-Xent needs at least 2 views, got {len(views)}")
    batch = views[0].shape[0]
    if any(v.shape != views[0].shape for v in views) or views[0].ndim != 2:
        raise ValueError(f"every view must be (B, D) of one shape, got {[tuple(v.shape) for v in views]}")
    if batch < 1:  # the mean over zero anchors would be NaN
        raise ValueError(f"NT-Xent needs at least 1 image per view, got views of shape {tuple(views[0].shape)}")
    check_choice("multiview", multiview, MULTIVIEW_MODES)
    check_positive("temperature", temperature)
    n_views = len(views)
    with torch.autocast(device_type=views[0].device.type, enabled=False):  # float32 logits
        z = l2_normalize(torch.cat([v.float() for v in views]))
        keys = z.detach() if stop_grad else z
        logits = z @ keys.T / temperature
    image = torch.arange(batch, device=z.device).repeat(n_views)
    same_image = image[:, None] == image[None, :]
    eye = torch.eye(n_views * batch, dtype=torch.bool, device=z.device)
    negative = ~same_image
    if topk_neg is not None:
        if not 1 <= topk_neg <= n_views * (batch - 1):
            raise ValueError(
                f"topk_neg={topk_neg} must be in [1, {n_views * (batch - 1)}] for "
                f"{n_views} views of batch {batch}"
            )
        negative = keep_topk(negative, logits.detach(), topk_neg)
    if multiview == "sum_in_log" or n_views == 2:
        return multi_positive_infonce(logits, same_image & ~eye, negative)
    view = torch.arange(n_views, device=z.device).repeat_interleave(batch)
    losses = []
    for p in range(n_views):
        for q in range(p + 1, n_views):
            rows = (view == p) | (view == q)
            partner = same_image & ~eye & ((view[:, None] + view[None, :]) == p + q)
            losses.append(multi_positive_infonce(logits[rows], partner[rows], negative[rows]))
    return torch.stack(losses).mean()


@dataclass
class SimCLRConfig:
    """Defaults: preset ``solo`` (solo-learn scripts/pretrain/*/simclr.yaml)."""

    preset: str = "solo"
    temperature: float = 0.2
    projector: str = "solo"  # solo: Linear→ReLU→Linear | paper | groco (GroCo's 3-layer BN projector)
    proj_hidden_dim: int = 2048  # ImageNet-100: 4096
    proj_output_dim: int = 256  # ImageNet-100: 512
    views: int = 2
    multiview: str = "sum_in_log"  # sum_in_log (solo-learn) | all_pairs (GroCo repository); same for V = 2
    topk_neg: int | None = None  # None: every negative; k: the k hardest (GroCo's truncated control)
    stop_grad: bool = False
    gather: bool = True


@register_method("simclr")
class SimCLR(SSLMethod):
    Config = SimCLRConfig
    paper_aliases = ("simclr",)
    optimizer_defaults = {
        "name": "lars", "lr": 0.4, "lr_scaling": "linear", "lr_reference_batch": 256,  # lr × B/256
        "weight_decay": 1.0e-4, "momentum": 0.9, "trust_coefficient": 0.02, "trust_clip": True,
        "exclude_1d": True, "schedule": "warmup_cosine", "warmup_epochs": 10,
    }
    dataset_defaults = {
        "imagenet100": {"proj_hidden_dim": 4096, "proj_output_dim": 512, "optimizer": {"lr": 0.3}},
    }

    @classmethod
    def validate_config(cls, config: SimCLRConfig) -> None:
        check_choice("method.projector", config.projector, PROJECTORS)
        check_choice("method.multiview", config.multiview, MULTIVIEW_MODES)
        check_positive("method.temperature", config.temperature)
        if config.views < 2:
            raise MethodConfigError(f"invalid method.views={config.views}; SimCLR needs >= 2")

    def __init__(self, backbone: torch.nn.Module, config: SimCLRConfig) -> None:
        super().__init__(backbone, config)
        self.projector = build_projector(
            config.projector, self.feature_dim, config.proj_hidden_dim, config.proj_output_dim
        )

    def view_kinds(self) -> list[str]:
        return ["shared"] * self.config.views

    def official_view_kinds(self, dataset: str) -> list[str]:
        # solo-learn's symmetric pipeline; GroCo's SimCLR baseline uses the same parameters
        return ["simclr"] * self.config.views

    def check_batch(self, batch_size: int, dataset_size: int) -> None:
        super().check_batch(batch_size, dataset_size)
        k = self.config.topk_neg
        if k is not None and k > self.config.views * (batch_size - 1):
            raise MethodConfigError(
                f"method.topk_neg={k} exceeds the {self.config.views * (batch_size - 1)} negatives "
                f"available at batch_size={batch_size}"
            )

    def training_step(self, views: list[torch.Tensor], indices: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.config
        z = [self.projector(self.backbone(v)) for v in views]
        if cfg.gather:
            z = [gather(zi, with_grad=True) for zi in z]
        loss = nt_xent_loss(z, cfg.temperature, cfg.multiview, cfg.topk_neg, cfg.stop_grad)
        return {"loss": loss}
