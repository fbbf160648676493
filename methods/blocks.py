"""Building blocks that two or more methods share, each written once (a piece only one method
uses lives in that method's file).

- ``l2_normalize``: ẑ = z / max(‖z‖₂, 1e-8), the harness-wide cosine normalisation;
  ``at_least_float32`` and ``float32_region``: the losses' float32 under mixed precision.
- ``projection_mlp``: the Linear/BN/ReLU projector and predictor stacks of every method;
  ``build_projector`` (SimCLR's projectors, GroCo's too), ``build_nnclr_projector`` and
  ``build_nnclr_predictor`` (NNCLR's heads, All4One's too), ``NormLinear`` (MoCo, CLD).
- ``gather`` / ``GatherWithGrad``: all-gather over processes; the backward pass *sums* the incoming
  gradients across processes and returns this process's slice (solo-learn's GatherLayer rule), so
  W processes with B/W samples each match one process with B samples.
- ``MomentumEncoder``: an EMA copy of online modules, θ_k ← m·θ_k + (1−m)·θ_q.
- ``FeatureQueue``: a FIFO memory of detached, gathered embeddings, with cosine nearest-neighbour
  lookup that sees only the filled part.
- ``SplitBatchNorm2d``: BatchNorm over ``splits`` sub-batches (ASCL / MoCo-CIFAR's split BN).
- ``multi_positive_infonce``: InfoNCE with several positives per anchor (SimCLR, NNCLR).
- ``IndexLabelsMixin``: optional pre-training labels for the neighbour diagnostics (NNCLR,
  All4One).
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


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """float32 for half/bfloat16/float32 inputs (losses run in float32 under mixed precision);
    float64 stays float64 (reference checks, gradcheck)."""
    return x if x.dtype == torch.float64 else x.float()


def float32_region(x: torch.Tensor) -> torch.autocast:
    """Autocast switched off on ``x``'s device: casting the inputs alone is not enough, because
    autocast would run the similarity matmuls in half precision again."""
    return torch.autocast(device_type=x.device.type, enabled=False)


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
    """Linear layer with unit-norm weight rows, no bias: cosine logits (CLD's ``NormedLinear``).

    ``weight`` is (out, in) like ``nn.Linear``'s; its rows are the columns of CLD's (in, out)
    weight. It starts as CLD's does: a uniform draw in [−1, 1] of the (in, out) matrix, each
    column renormalised to norm 1 (``uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)``). The layer
    is scale-invariant in its weight, so a smaller initial norm would act as a larger step size.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        weight = torch.empty(in_features, out_features).uniform_(-1.0, 1.0)
        weight = weight.renorm(2, 1, 1e-5).mul(1e5)
        self.weight = nn.Parameter(weight.t().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, l2_normalize(self.weight))


def build_projector(kind: str, in_dim: int, hidden: int, out: int) -> torch.nn.Module:
    """``solo``: Linear→ReLU→Linear; ``paper``: Linear(d→d)→ReLU→Linear; ``groco``: GroCo's
    3 × (Linear no-bias → BN → ReLU) with the last BN non-affine (GroCo's RegularProjection)."""
    if kind == "solo":
        return projection_mlp([in_dim, hidden, out])
    if kind == "paper":
        return projection_mlp([in_dim, in_dim, out])
    return projection_mlp(
        [in_dim, in_dim, in_dim, out], hidden_bn=True, last_bn=True, last_bn_affine=False,
        hidden_bias=False,
    )


def build_nnclr_projector(in_dim: int, hidden: int, out: int) -> nn.Sequential:
    """Linear(d→h) → BN → ReLU → Linear(h→h) → BN → ReLU → Linear(h→D) → BN, biases kept
    (paper and solo-learn)."""
    return projection_mlp([in_dim, hidden, hidden, out], hidden_bn=True, last_bn=True)


def build_nnclr_predictor(dim: int, hidden: int) -> nn.Sequential:
    """Linear(D→h) → BN → ReLU → Linear(h→D)."""
    return projection_mlp([dim, hidden, dim], hidden_bn=True)


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
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            # back to the input's NHWC order, so the next convolution and pooling run on the
            # channels-last kernels as they do after a plain BN (the values are unchanged)
            out = out.contiguous(memory_format=torch.channels_last)
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
    # (a data-dependent check: skipped while torch.compile traces, where it would break the graph)
    if not torch.compiler.is_compiling() and not bool(positive.any(dim=1).all()):
        raise ValueError("every anchor needs at least one positive")
    neg_inf = torch.finfo(logits.dtype).min
    pos_term = logits.masked_fill(~positive, neg_inf).logsumexp(dim=1)
    all_term = logits.masked_fill(~(positive | negative), neg_inf).logsumexp(dim=1)
    return (all_term - pos_term).mean()


# --------------------------------------------------------------------------------------------
# diagnostics
# --------------------------------------------------------------------------------------------
class IndexLabelsMixin:
    """Optional labels of the pre-training images, for the ``nn_label_acc`` diagnostic only.

    The subclass registers a non-persistent ``index_labels`` buffer (None until labels are set),
    so checkpoints never depend on whether labels were attached.
    """

    index_labels: torch.Tensor | None

    def set_train_labels(self, labels: torch.Tensor) -> None:
        """Labels (N,) of the pre-training split by image index (−1: unlabelled); logging only."""
        device = next(self.parameters()).device  # type: ignore[attr-defined]
        self.index_labels = labels.detach().long().to(device)
