"""Building blocks shared by the methods, each written once.

- ``l2_normalize``: ẑ = z / max(‖z‖₂, 1e-8), the harness-wide cosine normalisation.
- ``projection_mlp``: the Linear/BN/ReLU projector and predictor stacks of every method.
- ``gather`` / ``GatherWithGrad``: all-gather over processes; the backward pass *sums* the incoming
  gradients across processes and returns this process's slice (solo-learn's GatherLayer rule), so
  W processes with B/W samples each match one process with B samples.
- ``MomentumEncoder``: an EMA copy of online modules, θ_k ← m·θ_k + (1−m)·θ_q, with the
  constant or cosine (m → 1) momentum schedules.
- ``FeatureQueue``: a FIFO memory of detached, gathered embeddings, with cosine nearest-neighbour
  lookup that sees only the filled part.
- ``SplitBatchNorm2d``: BatchNorm over ``splits`` sub-batches (ASCL / MoCo-CIFAR's split BN).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from methods.base import MethodConfigError

COSINE_EPS = 1e-8


def l2_normalize(z: torch.Tensor) -> torch.Tensor:
    """ẑ = z / max(‖z‖₂, 1e-8) along the last dimension."""
    return F.normalize(z, dim=-1, eps=COSINE_EPS)


# --------------------------------------------------------------------------------------------
# heads
# --------------------------------------------------------------------------------------------
def projection_mlp(
    dims: Sequence[int],
    *,
    hidden_bn: bool = False,
    last_bn: bool = False,
    last_bn_affine: bool = True,
    hidden_bias: bool = True,
    last_bias: bool = True,
) -> nn.Sequential:
    """Linear layers ``dims[0] → dims[1] → … → dims[-1]``, ReLU between them.

    ``hidden_bn`` puts BatchNorm1d before each hidden ReLU; ``last_bn`` adds one after the last
    Linear (non-affine when ``last_bn_affine`` is false, as GroCo's and BYOL-style projectors do).
    """
    if len(dims) < 2:
        raise ValueError(f"a projector needs at least input and output sizes, got {list(dims)}")
    layers: list[nn.Module] = []
    for i in range(len(dims) - 2):
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=hidden_bias))
        if hidden_bn:
            layers.append(nn.BatchNorm1d(dims[i + 1]))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.Linear(dims[-2], dims[-1], bias=last_bias))
    if last_bn:
        layers.append(nn.BatchNorm1d(dims[-1], affine=last_bn_affine))
    return nn.Sequential(*layers)


class NormLinear(nn.Module):
    """Linear layer with unit-norm weight rows, no bias: cosine logits (CLD's ``NormedLinear``)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, l2_normalize(self.weight))


# --------------------------------------------------------------------------------------------
# distribution
# --------------------------------------------------------------------------------------------
def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


GATHER_BACKWARDS = ("sum", "local")


class GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward keeps this rank's slice of the incoming gradient, summed over
    processes (``sum``, solo-learn's GatherLayer, the harness rule) or this process's own only
    (``local``, the GroCo repository's GatherLayer: other processes' contributions are lost)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, backward: str = "sum") -> torch.Tensor:  # type: ignore[override]
        ctx.batch = x.shape[0]
        ctx.reduce = backward == "sum"
        parts = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous()
        if ctx.reduce:
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.batch
        return grad[start : start + ctx.batch], None


def gather(x: torch.Tensor, *, with_grad: bool, backward: str = "sum") -> torch.Tensor:
    """Concatenate ``x`` from every process along dim 0 (identity on one process).

    ``backward`` (with ``with_grad``): ``sum`` or ``local``, see ``GatherWithGrad``."""
    if backward not in GATHER_BACKWARDS:
        raise ValueError(f"invalid gather backward={backward!r}; valid: {', '.join(GATHER_BACKWARDS)}")
    if world_size() == 1:
        return x
    if with_grad:
        return GatherWithGrad.apply(x, backward)
    parts = [torch.zeros_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


# --------------------------------------------------------------------------------------------
# momentum encoder
# --------------------------------------------------------------------------------------------
def momentum_at(base: float, final: float, step: int, total_steps: int, schedule: str) -> float:
    """Momentum for ``step``: constant ``base``, or BYOL's cosine from ``base`` to ``final``."""
    if schedule == "constant":
        return base
    if schedule == "cosine":
        progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
        return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2
    raise MethodConfigError(f"invalid momentum schedule {schedule!r}; valid: constant, cosine")


class MomentumEncoder(nn.Module):
    """An exponential moving average of online modules; never receives gradients.

    Only parameters are averaged; buffers (BN running statistics) are the EMA copy's own, as in
    MoCo, where the key encoder runs BN in train mode on its own batches.
    """

    def __init__(self, online: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(online)
        for param in self.module.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self, online: nn.Module, momentum: float) -> None:
        """θ_k ← m·θ_k + (1 − m)·θ_q."""
        ema = list(self.module.parameters())
        src = list(online.parameters())
        if len(ema) != len(src):
            raise RuntimeError("momentum encoder and online module have different parameters")
        torch._foreach_mul_(ema, momentum)
        torch._foreach_add_(ema, src, alpha=1.0 - momentum)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# queue
# --------------------------------------------------------------------------------------------
class FeatureQueue(nn.Module):
    """FIFO memory of M embeddings of dimension D (detached; gathered over processes on push).

    ``init``: ``random_unit`` (random unit rows, counted as filled, as MoCo initialises its queue),
    ``uniform`` (uniform in ±1/√(D/3), counted as filled: CLD's MemoryMoCo), or ``empty`` (nothing
    counted as filled until pushed: NNCLR/All4One support sets). ``size`` must be a multiple of the
    global batch; ``check_batch`` says so with both numbers.
    """

    INITS = ("random_unit", "uniform", "empty")

    def __init__(
        self, size: int, dim: int, init: str = "random_unit", generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        if size < 1:
            raise MethodConfigError(f"queue size must be >= 1, got {size}")
        if init not in self.INITS:
            raise MethodConfigError(f"invalid queue init {init!r}; valid: {', '.join(self.INITS)}")
        if init == "random_unit":
            data = l2_normalize(torch.randn(size, dim, generator=generator))
            filled = size
        elif init == "uniform":
            bound = 1.0 / math.sqrt(dim / 3)
            data = torch.rand(size, dim, generator=generator) * 2 * bound - bound
            filled = size
        else:
            data = torch.zeros(size, dim)
            filled = 0
        self.register_buffer("data", data)
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.tensor(filled, dtype=torch.long))

    @property
    def size(self) -> int:
        return self.data.shape[0]

    def check_batch(self, global_batch: int) -> None:
        if self.size % global_batch != 0:
            raise MethodConfigError(
                f"queue size {self.size} is not a multiple of the global batch {global_batch}; "
                f"use a multiple such as {max(1, self.size // global_batch) * global_batch}"
            )

    def features(self) -> torch.Tensor:
        """The filled rows (all of them once the queue has wrapped)."""
        return self.data[: int(self.filled)]

    @torch.no_grad()
    def push(self, keys: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Enqueue the global batch of ``keys`` (gathered here), overwriting the oldest rows."""
        keys = gather(keys.detach(), with_grad=False).to(self.data.dtype)
        n = keys.shape[0]
        if n > self.size:
            raise MethodConfigError(
                f"cannot push {n} keys into a queue of size {self.size}; the queue must be at "
                "least one global batch"
            )
        start = int(self.pointer)
        idx = (torch.arange(n, device=keys.device) + start) % self.size
        self.data[idx] = keys
        if labels is not None:
            self.labels[idx] = gather(labels, with_grad=False)
        self.pointer.fill_((start + n) % self.size)
        self.filled.fill_(min(self.size, int(self.filled) + n))

    @torch.no_grad()
    def nearest(self, query: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k cosine neighbours of each query row among the filled rows: (values (B,k,D), idx)."""
        bank = self.features()
        if bank.shape[0] < k:
            raise MethodConfigError(
                f"the queue holds {bank.shape[0]} embeddings, fewer than the k={k} neighbours asked"
            )
        sims = l2_normalize(query.detach()) @ l2_normalize(bank).T
        idx = sims.topk(k, dim=1).indices
        return bank[idx], idx


# --------------------------------------------------------------------------------------------
# split batch-norm
# --------------------------------------------------------------------------------------------
class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics come from ``splits`` equal sub-batches.

    Simulates multi-GPU BN on one device (MoCo's CIFAR demo, ASCL). Running statistics are the
    mean over splits; evaluation is plain BN.
    """

    def __init__(self, num_features: int, splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.splits = splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if not self.training or self.splits == 1:
            return super().forward(x)
        if n % self.splits != 0:
            raise MethodConfigError(
                f"split BN with {self.splits} splits needs a batch divisible by {self.splits}, got {n}"
            )
        running_mean = self.running_mean.repeat(self.splits)
        running_var = self.running_var.repeat(self.splits)
        # Folding the splits into channels needs NCHW order (a channels_last input is copied).
        out = F.batch_norm(
            x.contiguous().view(-1, c * self.splits, h, w),
            running_mean,
            running_var,
            None if self.weight is None else self.weight.repeat(self.splits),
            None if self.bias is None else self.bias.repeat(self.splits),
            True,
            self.momentum,
            self.eps,
        ).view(n, c, h, w)
        self.running_mean.copy_(running_mean.view(self.splits, c).mean(dim=0))
        self.running_var.copy_(running_var.view(self.splits, c).mean(dim=0))
        return out


def convert_split_bn(module: nn.Module, splits: int) -> nn.Module:
    """Replace every BatchNorm2d in ``module`` by a SplitBatchNorm2d with the same parameters."""
    if splits == 1:
        return module
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SplitBatchNorm2d):
            new = SplitBatchNorm2d(
                child.num_features, splits, eps=child.eps, momentum=child.momentum,
                affine=child.affine,
            )
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert_split_bn(child, splits)
    return module


# --------------------------------------------------------------------------------------------
# losses shared by several methods
# --------------------------------------------------------------------------------------------
def multi_positive_infonce(
    logits: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor
) -> torch.Tensor:
    """Mean over rows of −log( Σ_{j∈pos(i)} e^{ℓ_ij} / Σ_{j∈pos(i)∪neg(i)} e^{ℓ_ij} ).

    ``logits`` (N, M) float; ``positive``/``negative`` (N, M) disjoint boolean masks, every row with
    at least one positive. Entries in neither mask (the anchor itself, masked views) are ignored.
    Computed with logsumexp, so large logits cannot overflow.
    """
    if not bool(positive.any(dim=1).all()):
        raise ValueError("every anchor needs at least one positive")
    neg_inf = torch.finfo(logits.dtype).min
    pos_term = logits.masked_fill(~positive, neg_inf).logsumexp(dim=1)
    all_term = logits.masked_fill(~(positive | negative), neg_inf).logsumexp(dim=1)
    return (all_term - pos_term).mean()


def keep_topk(mask: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """Restrict each row of ``mask`` to its ``k`` entries with the largest ``scores``."""
    masked = scores.masked_fill(~mask, float("-inf"))
    top = masked.topk(k, dim=1).indices
    kept = torch.zeros_like(mask)
    kept.scatter_(1, top, True)
    return kept & mask


# --------------------------------------------------------------------------------------------
# batch k-means (CLD) and per-step random streams
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
    if x.dtype != torch.float64:
        x = x.float()
    n = x.shape[0]
    with torch.autocast(device_type=x.device.type, enabled=False):
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
