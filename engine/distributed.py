"""Several processes for one run: process group, device, data shards, SyncBN, gradient averaging.

One run is one global batch of ``trainer.batch_size`` images per step, whatever the number of
processes W. Each process takes a contiguous 1/W slice of every global batch, and after the backward
pass the gradients are averaged over processes, so W processes with B/W images each take the same
optimiser step as one process with B images (docs/conventions.md §6):

- a gather with gradients (``methods.blocks.gather``) sums the incoming gradients in its backward
  pass; averaging the parameter gradients afterwards divides that sum back;
- BatchNorm layers become synchronised BatchNorm (statistics over the global batch), except the
  modules a method keeps per process (``method.local_bn_modules()``: MoCo's shuffle-BN key
  encoder) and BatchNorm subclasses with their own semantics (ASCL's split BN);
- only rank 0 writes checkpoints and records and runs the evaluation.

The process group comes from the environment: torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
``MASTER_ADDR``/``MASTER_PORT``, or a submitit job with more than one task
(``hydra.launcher.tasks_per_node``). Without either the run is one process and nothing here
changes what it computes. Backend: ``nccl`` on CUDA, ``gloo`` on CPU.

Data (``engine.data.TrainBatches`` with ``rank`` and ``world_size``): in-memory datasets are
augmented as the whole global batch on every process (the same (seed, epoch) generator as one
process) and each process keeps its slice, so W processes see exactly the images *and*
augmentations of one process. File-backed datasets (ImageNet-100,
imagefolder) decode only the process's slice; their random crops are per image (seed, epoch,
index) and therefore identical too, but the photometric ops on the device draw from a per-rank
generator (seed, epoch, rank, W): the union over ranks is well defined and reproducible, and it
differs from W = 1. The gradients are averaged by an explicit all-reduce after the backward pass
rather than by wrapping the method in DistributedDataParallel, because a method's entry point is
``training_step`` (not ``forward``) and several methods keep momentum encoders and queues that
DDP's parameter and buffer bookkeeping would have to be told about.
"""

from __future__ import annotations

import atexit
import ctypes
import datetime
import gc
import os
import platform
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

if TYPE_CHECKING:
    from methods.base import SSLMethod


# How long a collective waits for a missing peer before it raises. Rank 0's evaluation comes after
# the last collective, so the other processes never wait for it.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)
_TIMM_BN_ACT: type | None
try:  # timm's BatchNorm + activation layer (EfficientNet, RegNet, ...); ResNets use plain BN
    from timm.layers.norm_act import BatchNormAct2d as _TIMM_BN_ACT
    from timm.layers.norm_act import SyncBatchNormAct as _TimmSyncBatchNormAct
except ImportError:  # pragma: no cover - timm is a dependency, but keep this module usable alone
    _TIMM_BN_ACT = None


class DistributedError(RuntimeError):
    """The process environment cannot run this config (batch not divisible, missing variables)."""


# --------------------------------------------------------------------------------------------
# process group and device
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobInfo:
    """The scheduler job a process runs in (SLURM through submitit, or plain SLURM)."""

    id: str | None = None
    stdout: str | None = None
    stderr: str | None = None
    hostname: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "stdout": self.stdout, "stderr": self.stderr, "hostname": self.hostname}


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    launcher: str = "single"  # single | torchrun | submitit | external (group made by the caller)
    job: JobInfo = field(default_factory=JobInfo)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size, "backend": self.backend, "launcher": self.launcher,
            "device": str(self.device),
        }


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """CUDA when present (or asked for), else CPU; with several processes, GPU ``local_rank``."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DistributedError(
                f"trainer.device={requested!r} but no CUDA device is available; use auto or cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DistributedError(
                f"trainer.device={requested!r} but this machine has {count} CUDA device(s); "
                f"valid: auto, cpu, cuda, cuda:0 to cuda:{count - 1}"
            )
        if device.index is None:
            # SLURM may hand each task one GPU (gpus_per_task) or the node's GPUs (gpus_per_node)
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def _submitit_environment() -> Any | None:
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    try:
        import submitit

        return submitit.JobEnvironment()
    except Exception:  # not inside a submitit job after all (stale variable)
        return None


def job_info() -> JobInfo:
    """Job id and log files when running under submitit (or at least SLURM), else empty."""
    env = _submitit_environment()
    if env is not None:
        paths = env.paths
        return JobInfo(env.job_id, str(paths.stdout), str(paths.stderr), env.hostname)
    slurm_id = os.environ.get("SLURM_ARRAY_JOB_ID") and (
        f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    )
    slurm_id = slurm_id or os.environ.get("SLURM_JOB_ID")
    if slurm_id:
        return JobInfo(slurm_id, hostname=os.uname().nodename)
    return JobInfo()


def configure_threads() -> None:
    """Under SLURM, one intra-op thread per CPU the task was given (not one per CPU of the node).

    Without this every job on a shared node starts as many threads as the node has cores, and
    jobs slow each other down. An explicit OMP_NUM_THREADS wins.
    """
    if os.environ.get("OMP_NUM_THREADS") or "SLURM_JOB_ID" not in os.environ:
        return
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus is None and os.environ.get("SLURM_CPUS_ON_NODE"):
        tasks = int(re.match(r"\d+", os.environ.get("SLURM_NTASKS_PER_NODE", "1")).group())
        cpus = str(max(1, int(os.environ["SLURM_CPUS_ON_NODE"]) // max(1, tasks)))
    if cpus and cpus.isdigit() and int(cpus) > 0:
        torch.set_num_threads(int(cpus))


#: glibc ``mallopt`` parameters: M_TRIM_THRESHOLD, M_MMAP_MAX.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def configure_host_allocator() -> bool:
    """Keep freed host memory in the process for reuse instead of handing it back to the kernel
    after every step (glibc only; returns whether the settings took).

    By default glibc serves blocks above its mmap threshold (at most 32 MiB) with fresh mmaps and
    unmaps them on ``free``, and returns the heap's free top to the kernel. A training step frees
    and re-allocates the same activation-sized blocks every step, so every step page-faults them
    in again and the kernel zeroes each page: ~8,000 faults per one-thread step of SimCLR on
    digits (5-7 % of the step), and about a million per step of SimCLR on ResNet-18 at 32 px and
    batch 256, whose largest activations are 64 MiB (~11 % of the step; 30 % of a forward pass at
    evaluation). Here every block comes from the heap (no mmaps) and the heap is never trimmed, so
    a step after the first takes almost no faults. Results are unchanged (only where memory comes
    from). The cost: the process keeps its peak heap until it exits, and blocks freed in a
    different order than they were allocated leave holes, so the peak resident size is higher
    (ResNet-18 step: 4.3 GB against 3.7 GB). Malloc settings in the environment (``MALLOC_*``,
    ``GLIBC_TUNABLES``) win: any of them, e.g. glibc's own default ``MALLOC_MMAP_MAX_=65536``,
    leaves glibc's behaviour as it is.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(key.startswith("MALLOC_") for key in os.environ) or "glibc.malloc." in os.environ.get(
        "GLIBC_TUNABLES", ""
    ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # a trim threshold of -1 turns trimming off (mallopt(3)); the largest positive value would
    # still hand back a free top above 2 GiB, about half of a ResNet-18 step's heap
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))


_exit_collection_skipped = False


def skip_exit_collection() -> None:
    """Let this process exit without the interpreter's last garbage-collection pass over every
    live object (idempotent).

    At exit CPython runs a full cycle collection before it clears the modules. With torch, timm,
    hydra, scipy and pandas imported that pass alone takes about 1.2 s here (a native profile of
    a finished ``python -m eval.grid`` run in its last second shows only the collector), on every
    CLI command, every run's process and every DDP rank. The first call registers an atexit
    handler that moves every live object into the collector's permanent generation
    (``gc.freeze``), which that last pass skips. Handlers registered after it (the process
    group's teardown) run before it; those registered before it (logging's) run after it, on
    objects that are all still alive. Module teardown and reference counting still release what
    they release, and the operating system takes the memory back. What is given up is the
    finalisation of cyclic garbage still uncollected at exit, as ``os._exit`` gives it up;
    records and checkpoints are written, fsynced and closed before a run returns, so none of
    them depends on it.
    """
    global _exit_collection_skipped
    if not _exit_collection_skipped:
        atexit.register(gc.freeze)
        _exit_collection_skipped = True


def _port_for(job_id: str) -> int:
    """A rendezvous port every task of a job agrees on without talking: derived from the job id."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return 20000 + int(digits) % 20000


def _environment() -> tuple[int, int, int, str] | None:
    """(rank, world size, local rank, launcher) from torchrun or submitit; None for one process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing and int(os.environ["WORLD_SIZE"]) > 1:
            raise DistributedError(
                f"RANK/WORLD_SIZE are set but {', '.join(missing)} not; launch with torchrun or "
                "set MASTER_ADDR and MASTER_PORT"
            )
        local = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local, "torchrun"
    env = _submitit_environment()
    if env is not None and env.num_tasks > 1:
        if "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = env.hostnames[0] if env.num_nodes > 1 else "127.0.0.1"
        os.environ.setdefault("MASTER_PORT", str(_port_for(env.raw_job_id)))
        return env.global_rank, env.num_tasks, env.local_rank, "submitit"
    return None


def setup(requested_device: str = "auto") -> DistContext:
    """Join (or create) the process group of this run and choose this process's device.

    Idempotent: a process group that already exists (a second run in the same processes, or a
    test harness that made its own) is reused as it is.
    """
    configure_threads()
    configure_host_allocator()
    skip_exit_collection()
    job = job_info()
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = pick_device(requested_device, local)
        return DistContext(rank, world, local, dist.get_backend(), device, "external", job)
    found = _environment()
    if found is None or found[1] == 1:
        return DistContext(device=pick_device(requested_device), job=job)
    rank, world, local, launcher = found
    device = pick_device(requested_device, local)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, init_method="env://", rank=rank, world_size=world, timeout=PROCESS_GROUP_TIMEOUT
    )
    # Destroyed at exit, not after each run: a multirun in the same processes reuses the group.
    atexit.register(_destroy)
    return DistContext(rank, world, local, backend, device, launcher, job)


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# collectives used by the training loop
# --------------------------------------------------------------------------------------------
def all_reduce_mean(value: torch.Tensor, world_size: int) -> torch.Tensor:
    """Mean of ``value`` over processes (a copy; identity on one process)."""
    if world_size == 1:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world_size


def average_gradients(module: nn.Module, world_size: int, bucket_numel: int = 2**24) -> None:
    """Replace each parameter's gradient by its mean over processes.

    A parameter whose gradient is missing on some processes but not others (a branch one rank did
    not take) counts as zero there; one that no process touched keeps ``grad is None``, exactly as
    on one process (optimisers skip it).
    """
    if world_size == 1:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8,
                            device=params[0].device)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    grads = []
    for param, flag in zip(params, has_grad.tolist(), strict=True):
        if not flag:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grads.append(param.grad)
    # Flattened buckets: one collective per ~64 MB of float32 instead of one per tensor.
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for grad in grads:
        if buckets and buckets[-1][0].dtype == grad.dtype and size < bucket_numel:
            buckets[-1].append(grad)
            size += grad.numel()
        else:
            buckets.append([grad])
            size = grad.numel()
    for bucket in buckets:
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world_size
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def broadcast_state(module: nn.Module, world_size: int, *, parameters: bool = True) -> None:
    """Copy rank 0's parameters (optionally) and buffers to every process."""
    if world_size == 1:
        return
    tensors = list(module.parameters()) if parameters else []
    tensors += list(module.buffers())
    seen: set[int] = set()
    with torch.no_grad():
        for tensor in tensors:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            dist.broadcast(tensor.data, src=0)


# --------------------------------------------------------------------------------------------
# synchronised BatchNorm
# --------------------------------------------------------------------------------------------
class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the backward pass sums the gradients too (every process's output
    depends on every process's input)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class SyncBatchNorm(nn.SyncBatchNorm):
    """torch's SyncBatchNorm, plus the same statistics on CPU tensors (gloo).

    torch only synchronises CUDA/XPU inputs; on CPU this computes the global mean and biased
    variance with two differentiable all-reduces (the backward pass sums the statistics'
    gradients over processes, as torch's kernel does), and updates the running statistics with
    the unbiased global variance, as BatchNorm on the whole global batch would.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if (
            input.device.type != "cpu"
            or not self.training
            or not (dist.is_available() and dist.is_initialized())
        ):
            return super().forward(input)
        return self._cpu_sync_forward(input)

    def _cpu_sync_forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as in BatchNorm
                factor = 1.0 / float(self.num_batches_tracked)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
        sums = _AllReduceSum.apply(torch.cat([x.sum(dims), count]))
        total = sums[-1]
        mean = sums[:-1] / total
        centered = x - mean.view(shape)
        # two passes (mean, then squared deviations) as the BatchNorm kernels do: no cancellation
        var = _AllReduceSum.apply(centered.pow(2).sum(dims)) / total
        if self.track_running_stats:
            with torch.no_grad():
                unbiased = var * (total / (total - 1).clamp(min=1))
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.detach(), alpha=factor)
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


if _TIMM_BN_ACT is not None:

    class SyncBatchNormAct(_TimmSyncBatchNormAct, SyncBatchNorm):
        """timm's BatchNormAct2d, synchronised: timm's layer resolves ``super().forward`` to ours."""


_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _sync_copy(bn: _BatchNorm) -> nn.Module:
    is_act = _TIMM_BN_ACT is not None and type(bn) is _TIMM_BN_ACT
    cls = SyncBatchNormAct if is_act else SyncBatchNorm
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if is_act:
        new.act, new.drop = bn.act, bn.drop
    # the same Parameter and buffer objects: optimiser groups and EMA copies stay valid
    if bn.affine:
        new.weight, new.bias = bn.weight, bn.bias
    new.running_mean, new.running_var = bn.running_mean, bn.running_var
    new.num_batches_tracked = bn.num_batches_tracked
    new.train(bn.training)
    return new


def convert_sync_batchnorm(module: nn.Module, exclude: Iterable[nn.Module] = ()) -> int:
    """Turn every plain BatchNorm layer of ``module`` into SyncBatchNorm, in place.

    Layers inside ``exclude`` stay per process. BatchNorm subclasses with their own forward
    (e.g. ``SplitBatchNorm2d``, which is defined per process) are left alone; unknown ones are
    named in a warning. Modules shared by several parents are converted once. Returns the number
    of converted layers.
    """
    from methods.blocks import SplitBatchNorm2d

    excluded = {id(m) for m in exclude}
    done: dict[int, nn.Module] = {}
    unknown: set[str] = set()

    def convert(mod: nn.Module) -> nn.Module:
        if id(mod) in excluded or isinstance(mod, (nn.SyncBatchNorm, SplitBatchNorm2d)):
            return mod
        if id(mod) in done:
            return done[id(mod)]
        if type(mod) in _PLAIN_BN or (_TIMM_BN_ACT is not None and type(mod) is _TIMM_BN_ACT):
            new = _sync_copy(mod)  # type: ignore[arg-type]
        else:
            if isinstance(mod, _BatchNorm):
                unknown.add(type(mod).__name__)
            for name, child in list(mod.named_children()):
                converted = convert(child)
                if converted is not child:
                    setattr(mod, name, converted)
            new = mod
        done[id(mod)] = new
        return new

    convert(module)
    if unknown:
        warnings.warn(
            f"BatchNorm layers of type {', '.join(sorted(unknown))} are not synchronised across "
            "processes (unknown subclass): their statistics are per process",
            stacklevel=2,
        )
    return sum(1 for v in done.values() if isinstance(v, SyncBatchNorm))


def prepare_method(method: SSLMethod, world_size: int) -> dict[str, Any]:
    """SyncBN for W > 1 except the method's per-process BN modules (``local_bn_modules()``);
    what was done, for the record."""
    if world_size == 1:
        return {"sync_bn_layers": 0, "local_bn_modules": []}
    local = list(method.local_bn_modules())
    names = [n for n, m in method.named_modules() if any(m is x for x in local)]
    return {"sync_bn_layers": convert_sync_batchnorm(method, local), "local_bn_modules": names}


# --------------------------------------------------------------------------------------------
# data shards (engine.data.TrainBatches takes its slice of every global batch here)
# --------------------------------------------------------------------------------------------
def shard_slice(global_batch: int, rank: int, world_size: int) -> slice:
    """This rank's contiguous part of a global batch; the batch must divide evenly."""
    if global_batch % world_size:
        raise DistributedError(
            f"trainer.batch_size={global_batch} is not divisible by the {world_size} processes; "
            f"use a multiple of {world_size} (e.g. {global_batch - global_batch % world_size or world_size})"
        )
    local = global_batch // world_size
    return slice(rank * local, (rank + 1) * local)


__all__ = [
    "DistContext",
    "DistributedError",
    "JobInfo",
    "SyncBatchNorm",
    "all_reduce_mean",
    "average_gradients",
    "broadcast_state",
    "configure_host_allocator",
    "configure_threads",
    "convert_sync_batchnorm",
    "job_info",
    "pick_device",
    "prepare_method",
    "setup",
    "shard_slice",
    "skip_exit_collection",
]
