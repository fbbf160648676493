"""One run, end to end, in three parts: ``build`` → ``fit`` → ``finish``.

``run(cfg)`` takes a composed config (hydra DictConfig or dict), resolves it, and either skips a
finished run, or builds it (seed, data, backbone, method, batches, optimiser), resumes it from its
own last checkpoint if there is one (``resume``), trains it (``fit``, which writes checkpoints as
``engine.checkpoint`` describes), then evaluates the final weights and writes the record
(``finish``; the layout is ``eval.records``'). The run directory is keyed by the hash of the fully
resolved config, seed included, so two seeds (or any two settings) never share a checkpoint. A
method that does not train (``SSLMethod.trains`` False: the reference rows) goes from ``build``
straight to ``finish``: no optimiser, no step, no checkpoint.

``smoke_run(cfg)`` builds a config exactly as ``run`` does and takes a few steps and a small
evaluation, writing nothing: the pre-flight check of a grid on its real device.

With several processes (torchrun, or a submitit job with ``tasks_per_node > 1``; see
``engine.distributed``) every process trains on its slice of each global batch, gradients are
averaged, and rank 0 alone writes checkpoints and the record and evaluates. W > 1 is part of the
run's identity (``trainer.world_size`` joins the hashed config): MoCo's shuffle-BN and the order of
floating-point reductions make it a different computation from one process.

A run that raises writes a record with ``status: "failed"``, the error and the scheduler job, so
the report lists it; running the same command again resumes it from its last checkpoint. A
preemption or time-limit signal (SLURM's USR2 through submitit) is not a failure: the run writes a
checkpoint after the step under way, the job requeues itself and resumes there.
"""

from __future__ import annotations

import platform
import resource
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import datasets
from backbones import build_backbone
from datasets.views import view_config
from engine import distributed
from engine.checkpoint import (
    CheckpointPolicy,
    DiagnosticSums,
    Progress,
    TrainingError,
    checkpoint_epoch,
    checkpoint_path,
    load_checkpoint,
    restore_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from engine.config import method_options, resolve_run_config
from engine.data import TrainBatches, derive_seed, sample_split
from engine.distributed import DistContext, pick_device
from engine.evaluate import cached_features, evaluate_features, extract_features
from engine.io import cpu_model
from engine.optim import OptimizerSettings, build_optimizer, set_lr
from eval.records import (
    build_failed_record,
    build_finished_record,
    finished_record,
    record_header,
    run_dir_for,
    run_hash,
    write_job,
    write_record,
)
from methods import SSLMethod, build_method, get_method_class

__all__ = [
    "Built",
    "TrainingError",
    "accumulate_gradients",
    "build",
    "check_batch_fits",
    "finish",
    "finished_record",
    "fit",
    "pick_device",
    "resolve_channels_last",
    "resolve_compile",
    "resume",
    "run",
    "run_dir_for",
    "smoke_run",
    "split_micro_batches",
    "step_diagnostics",
    "train_step",
]

# torch.compile backend for trainer.compile; tests swap in "aot_eager" (the same graph capture
# without inductor's C++ code generation, which alone takes minutes on a small CPU).
COMPILE_BACKEND = "inductor"
# Autocast dtype → the precision a run actually used (no autocast: fp32).
PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Train and test images of smoke_run's k-NN evaluation (each drawn at random from its split).
SMOKE_EVAL_IMAGES = 256


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_context(device: torch.device, precision: str):
    """``auto``: bf16 autocast on CUDA (fp16 with gradient scaling where bf16 is missing), none on
    CPU. ``bf16`` also autocasts on CPU (every loss still runs in float32); ``fp16`` is CUDA's."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return nullcontext(), None
    if device.type != "cuda":
        if precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16), None
        raise TrainingError(
            f"trainer.precision={precision} needs CUDA, but this run is on {device}; valid on "
            f"{device.type}: auto, bf16, fp32"
        )
    if precision in ("auto", "bf16") and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


def resolve_channels_last(setting: bool | str, backbone: nn.Module) -> bool:
    """trainer.channels_last: ``auto`` is on for convolutional backbones (>= 2 Conv2d layers).

    NHWC only changes how convolutions run. A patch-embedding transformer has a single convolution
    (the patch projection) whose output is flattened into tokens, so there it would only add copies.
    """
    if setting != "auto":
        return bool(setting)
    return sum(isinstance(m, nn.Conv2d) for m in backbone.modules()) >= 2


def resolve_compile(setting: bool | str, device: torch.device) -> bool:
    """trainer.compile: ``auto`` is on for CUDA and off on CPU.

    On CPU inductor first compiles C++ for every graph (~85 s for test_resnet on 2 cores, longer
    than a whole digits run trains), and the forward graph again for evaluation.
    """
    if setting is False or (setting == "auto" and device.type != "cuda"):
        return False  # without importing torch._dynamo (1-2 s)
    from torch._dynamo import is_dynamo_supported

    if setting == "auto":
        return is_dynamo_supported()
    if not is_dynamo_supported():
        raise TrainingError(
            f"trainer.compile=true but torch.compile is not supported by torch {torch.__version__} "
            f"on Python {platform.python_version()} ({sys.platform}); use trainer.compile=auto or "
            "false"
        )
    return True


def to_channels_last(views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each (B, C, H, W) view in NHWC memory order (views may differ in size); values unchanged."""
    return [v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for v in views]


def split_micro_batches(
    indices: torch.Tensor, views: Sequence[torch.Tensor], steps: int
) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """``steps`` consecutive equal slices of a batch: (indices, views) of each micro-batch."""
    batch = indices.shape[0]
    if batch % steps:
        raise TrainingError(
            f"a batch of {batch} images cannot be split into trainer.grad_accum_steps={steps} "
            "equal micro-batches"
        )
    size = batch // steps
    return [
        (indices[i * size : (i + 1) * size], [v[i * size : (i + 1) * size] for v in views])
        for i in range(steps)
    ]


def step_diagnostics(out: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The loggable scalars of a ``training_step`` output: every one-element tensor but the loss,
    detached, in float32 (a method's diagnostics: its loss terms, neighbour accuracies, ...)."""
    return {
        name: value.detach().reshape(()).float()
        for name, value in out.items()
        if name != "loss" and isinstance(value, torch.Tensor) and value.numel() == 1
    }


def accumulate_gradients(
    method: nn.Module,
    views: Sequence[torch.Tensor],
    indices: torch.Tensor,
    steps: int,
    autocast: AbstractContextManager[Any],
    scaler: torch.amp.GradScaler | None,
    world_size: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and backward of one batch as ``steps`` micro-batches, summing into ``.grad``.

    Each micro-batch's loss is scaled by 1/steps, so the gradient is the mean of the micro-batch
    gradients (the full batch's, for a loss that is a mean over independent samples; not for a
    contrastive loss, whose negatives now come from the micro-batch). Gradients are then averaged
    over processes, once. Returns the detached loss and the method's diagnostics
    (``step_diagnostics``), each averaged over micro-batches and processes; a non-finite
    micro-batch loss is returned at once, before its backward pass, for the caller to raise
    (every process sees the same value, so none is left waiting in a collective).
    """
    losses, diagnostics = [], []
    for micro_indices, micro_views in split_micro_batches(indices, views, steps):
        with autocast:
            out = method.training_step(micro_views, micro_indices)
        loss, scalars = out["loss"], step_diagnostics(out)
        # One collective for the loss and the diagnostics; the loss keeps its own dtype, so its
        # mean is the one all_reduce_mean(loss) gives.
        reduced = distributed.all_reduce_mean(
            torch.stack([loss.detach(), *(v.to(loss.dtype) for v in scalars.values())]),
            world_size,
        )
        global_loss = reduced[0]
        if not torch.isfinite(global_loss):
            return global_loss, {}
        if steps > 1:  # one micro-batch keeps the unscaled loss: bit-identical to no accumulation
            loss = loss / steps
        (scaler.scale(loss) if scaler is not None else loss).backward()
        losses.append(global_loss)
        diagnostics.append(dict(zip(scalars, reduced[1:].float(), strict=True)))
    distributed.average_gradients(method, world_size)
    if steps == 1:
        return losses[0], diagnostics[0]
    return torch.stack(losses).mean(), {
        name: torch.stack([d[name] for d in diagnostics]).mean() for name in diagnostics[0]
    }


def check_batch_fits(
    method: nn.Module, trainer: dict[str, Any], dataset_size: int, dataset: str, world: int = 1
) -> None:
    """The global batch against the pre-training set, the processes and the micro-batches, then
    the method's own limits (``check_batch``); raises TrainingError or MethodConfigError. Run at
    the start of every run and by the grid's pre-flight, before anything trains."""
    batch_size, accum = trainer["batch_size"], trainer["grad_accum_steps"]
    if batch_size > dataset_size:
        raise TrainingError(
            f"trainer.batch_size={batch_size} exceeds the {dataset_size} pre-training "
            f"images of {dataset}; use at most {dataset_size}"
        )
    if batch_size % world == 0 and (batch_size // world) % accum:  # (else shard_slice says so)
        raise TrainingError(
            f"the per-process batch {batch_size // world} (trainer.batch_size={batch_size} over "
            f"{world} processes) is not divisible by trainer.grad_accum_steps={accum}; use a "
            f"batch size that is a multiple of {world * accum}"
        )
    # The method sees global micro-batches: its queue, top-k and split-BN checks are about them.
    method.check_batch(batch_size // accum, dataset_size)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is the process's peak resident set, in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


# --------------------------------------------------------------------------------------------
# build: everything a run trains and evaluates, from the resolved config
# --------------------------------------------------------------------------------------------
@dataclass
class Built:
    """A run's data, model, optimiser and execution settings, as ``build`` made them.

    ``batches``, ``optimizer`` and ``optim`` are None for a method that does not train
    (``SSLMethod.trains`` False: the reference rows), which goes straight to evaluation.
    """

    config: dict[str, Any]
    run_dir: Path
    ctx: DistContext
    bundle: datasets.DatasetBundle
    method: SSLMethod
    parallel: dict[str, Any]
    channels_last: bool
    compiled: bool
    autocast: AbstractContextManager[Any]
    scaler: torch.amp.GradScaler | None
    batches: TrainBatches | None = None
    optimizer: torch.optim.Optimizer | None = None
    optim: OptimizerSettings | None = None
    peak_lr: float = 0.0
    warmup: float = 0.0

    @property
    def trains(self) -> bool:
        return self.batches is not None

    @property
    def epochs(self) -> int:
        return self.config["trainer"]["epochs"] if self.trains else 0

    @property
    def steps_per_epoch(self) -> int:
        return self.batches.steps_per_epoch if self.batches is not None else 0

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def precision(self) -> str:
        return PRECISION_NAMES[getattr(self.autocast, "fast_dtype", None)]

    @property
    def label(self) -> str:
        method_cfg = self.config["method"]
        return f"method {method_cfg['name']} (preset {method_cfg.get('preset')})"


def build(config: dict[str, Any], run_dir: Path, ctx: DistContext) -> Built:
    """Seed, then load the data, build the backbone, the method and (if it trains) the batches
    and the optimiser, on this process's device with the run's precision, memory layout and
    compilation. Every check that needs the built objects runs here, before the first step."""
    trainer, device, world = config["trainer"], ctx.device, ctx.world_size
    seed = config["seed"]
    seed_everything(seed)
    dataset_cfg = config["dataset"]
    bundle = datasets.load_dataset(
        dataset_cfg["name"], dataset_cfg.get("root"), dataset_cfg.get("download", False),
        **(dataset_cfg.get("options") or {}),
    )
    backbone_cfg = config["backbone"]
    # The backbone is built first after seeding, so matched seeds give identical initial
    # backbones across methods.
    backbone = build_backbone(
        backbone_cfg["name"], in_chans=bundle.channels, stem=backbone_cfg["stem"],
        image_size=bundle.image_size, patch_size=backbone_cfg.get("patch_size"),
        **(backbone_cfg.get("kwargs") or {}),
    )
    method_cfg = config["method"]
    method = build_method(method_cfg["name"], backbone, **method_options(method_cfg))
    accum = trainer["grad_accum_steps"]
    if method.trains:
        check_batch_fits(method, trainer, len(bundle.pretrain), bundle.name, world)
        if accum > 1 and method.updates_ema_in_training_step():
            warnings.warn(
                f"trainer.grad_accum_steps={accum}: {method_cfg['name']} updates its key encoder "
                f"inside training_step (ema_timing=before_keys), i.e. {accum} EMA updates per "
                f"optimiser step (effective momentum m^{accum}); use method.ema_timing=after_step "
                "for one per step",
                stacklevel=2,
            )
    parallel = distributed.prepare_method(method, world)
    method.to(device)
    labels = bundle.pretrain.labels
    if method.trains and len(labels) and bool((labels >= 0).all()):
        # Diagnostics only (NNCLR's neighbour label accuracy); a split with unlabelled images
        # (STL-10's) would count them as misses, so it gets none.
        method.set_train_labels(labels)
    channels_last = resolve_channels_last(trainer["channels_last"], backbone)
    if channels_last:
        # All of the method's 4-D weights, not only the backbone's: momentum encoders are copies
        # of it and see the same views. Parameters stay the same objects (optimiser, EMA).
        method.to(memory_format=torch.channels_last)
    compiled = resolve_compile(trainer["compile"], device)
    if compiled:
        # In place (Module.compile): state_dict keys, checkpoints and the feature-cache key stay
        # those of the plain backbone; evaluation's embed() runs the compiled module too.
        backbone.compile(backend=COMPILE_BACKEND)
    autocast, scaler = autocast_context(device, trainer["precision"])
    built = Built(config, run_dir, ctx, bundle, method, parallel, channels_last, compiled,
                  autocast, scaler)
    if not method.trains:
        return built
    kinds = method.augmentation_kinds(config["augment"], bundle.name)
    views = [view_config(bundle.name, kind, bundle.image_size) for kind in kinds]
    built.batches = TrainBatches(
        bundle, views, trainer["batch_size"], device, seed, trainer["num_workers"],
        trainer.get("max_steps_per_epoch"), rank=ctx.rank, world_size=world,
    )
    built.optim = OptimizerSettings.from_dict(method_cfg["optimizer"])
    built.peak_lr = built.optim.peak_lr(trainer["batch_size"])
    built.warmup = built.optim.warmup_epochs
    if dataset_cfg.get("warmup_cap_epochs") is not None:
        built.warmup = min(built.warmup, dataset_cfg["warmup_cap_epochs"])
    built.optimizer = build_optimizer(method.parameter_groups(), built.optim, built.peak_lr)
    return built


def train_step(
    b: Built, indices: torch.Tensor, views: list[torch.Tensor], step: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimiser step (global step ``step``): learning rate, forward and backward of the
    micro-batches, optimiser step, ``after_optimizer_step``. Returns the global batch's loss and
    the method's diagnostics; a non-finite loss is returned before anything is updated, for the
    caller to raise."""
    assert b.optimizer is not None and b.optim is not None
    spe, epochs = b.steps_per_epoch, b.epochs
    set_lr(b.optimizer, b.optim.schedule, step, spe, epochs, b.warmup)
    if b.channels_last:
        views = to_channels_last(views)
    b.optimizer.zero_grad(set_to_none=True)
    # The global batch's loss (mean over processes) decides for every process at once.
    loss, diagnostics = accumulate_gradients(
        b.method, views, indices.to(b.ctx.device), b.config["trainer"]["grad_accum_steps"],
        b.autocast, b.scaler, b.ctx.world_size,
    )
    if not torch.isfinite(loss):
        return loss, diagnostics
    if b.scaler is not None:
        b.scaler.step(b.optimizer)
        b.scaler.update()
    else:
        b.optimizer.step()
    # Once per optimiser step, however many micro-batches it took.
    b.method.after_optimizer_step(step, b.total_steps)
    return loss, diagnostics


# --------------------------------------------------------------------------------------------
# fit: resume, train, checkpoint
# --------------------------------------------------------------------------------------------
def resume(b: Built) -> Progress:
    """The progress of this run's own checkpoint, loaded into the method and optimiser (nothing
    if there is none, or trainer.resume is false); then every process holds rank 0's weights."""
    path = checkpoint_path(b.run_dir)
    progress = Progress()
    if path.exists() and b.config["trainer"]["resume"]:
        assert b.optimizer is not None
        state = load_checkpoint(path, run_hash(b.config))
        progress = restore_checkpoint(
            path, state, b.method, b.optimizer, b.scaler, b.steps_per_epoch
        )
        if b.ctx.is_main:
            inside = (f", step {progress.step}/{b.steps_per_epoch} of epoch {progress.epoch + 1}"
                      if progress.step else "")
            print(f"[groupbench] resuming {b.run_dir} after epoch {progress.epoch}/{b.epochs}"
                  f"{inside}", flush=True)
    # Identical seeds already give identical weights; the broadcast makes it a guarantee.
    distributed.broadcast_state(b.method, b.ctx.world_size)
    return progress


def _save(b: Built, progress: Progress, policy: CheckpointPolicy) -> None:
    if b.ctx.is_main:
        assert b.optimizer is not None
        save_checkpoint(checkpoint_path(b.run_dir), run_hash(b.config), progress, b.method,
                        b.optimizer, b.scaler)
        policy.saved()
    policy.after_save()


def fit(b: Built, progress: Progress, policy: CheckpointPolicy) -> Progress:
    """Train from ``progress`` to the last epoch, writing checkpoints as ``policy`` says and one at
    the end. Raises TrainingError at the first non-finite loss (the last checkpoint is kept)."""
    trainer, device, world = b.config["trainer"], b.ctx.device, b.ctx.world_size
    spe, epochs, batch_size = b.steps_per_epoch, b.epochs, trainer["batch_size"]
    assert b.batches is not None and b.optimizer is not None
    saved = (progress.epoch, progress.step) if progress.resumed_from else None
    bar = tqdm(
        total=b.total_steps, initial=progress.epoch * spe + progress.step,
        disable=not (trainer["progress"] and b.ctx.is_main),
        desc=f"{b.config['method']['name']}/{b.config['method'].get('preset')} seed "
             f"{b.config['seed']}", unit="step", dynamic_ncols=True,
    )
    fit_start, images_seen = time.perf_counter(), 0
    b.method.train()
    with policy.watch_signals():
        for epoch in range(progress.epoch, epochs):
            start = progress.step  # > 0 only for a checkpoint written inside this epoch
            if start:
                assert progress.epoch_state is not None
                loss_sum = progress.epoch_state["loss_sum"].to(device)
                seconds = progress.epoch_state["seconds"]
                sums = DiagnosticSums.from_state(progress.epoch_state, device)
            else:
                # The same stream on every process: random choices a method makes for the whole
                # batch (permutations, cluster seeds) must agree across processes.
                torch.manual_seed(derive_seed(b.config["seed"], "torch", epoch))
                loss_sum, seconds = torch.zeros((), device=device), 0.0
                sums = DiagnosticSums()
            clock = time.perf_counter()
            for step_in_epoch, (indices, views) in enumerate(b.batches.epoch(epoch, start), start):
                if start and step_in_epoch == start:
                    # After the epoch's first batch is fetched (a DataLoader draws its seed from
                    # the global generator): the state of the uninterrupted run at this step.
                    assert progress.epoch_state is not None
                    set_rng_state(progress.epoch_state, device)
                loss, diagnostics = train_step(b, indices, views, epoch * spe + step_in_epoch)
                if not torch.isfinite(loss):
                    kept = ("no checkpoint had been written yet" if saved is None else
                            f"the last good checkpoint ({checkpoint_path(b.run_dir)}, epoch "
                            f"{saved[0]}{f', step {saved[1]}' if saved[1] else ''}) is kept")
                    raise TrainingError(
                        f"non-finite loss {loss.item()} in {b.label} at epoch {epoch + 1}, step "
                        f"{step_in_epoch + 1}; {kept}"
                    )
                loss_sum += loss
                sums.add(diagnostics)
                images_seen += batch_size
                progress.step = step_in_epoch + 1
                bar.update(1)
                if step_in_epoch % 5 == 0 or progress.step == spe:
                    rate = images_seen / max(time.perf_counter() - fit_start, 1e-9)
                    bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:.0f}")
                if progress.step < spe and policy.due(epoch_end=False):
                    seconds += time.perf_counter() - clock
                    progress.epoch_state = {"loss_sum": loss_sum.detach().cpu().clone(),
                                            "seconds": seconds, **sums.state(),
                                            **rng_state(device)}
                    _save(b, progress, policy)
                    saved = (progress.epoch, progress.step)
                    clock = time.perf_counter()
            # Per-process buffers (shuffle-BN's key encoder statistics) follow rank 0, whose copy
            # is the one checkpointed: a resumed run continues from exactly the same state.
            distributed.broadcast_state(b.method, world, parameters=False)
            seconds += time.perf_counter() - clock
            progress.train_seconds += seconds
            progress.history.append({
                "epoch": epoch + 1,
                "loss": (loss_sum / spe).item(),
                "lr": b.optimizer.param_groups[0]["lr"],
                "seconds": seconds,
                "images_per_second": spe * batch_size / max(seconds, 1e-9),
                **({"diagnostics": sums.means()} if sums else {}),
            })
            progress.epoch, progress.step, progress.epoch_state = epoch + 1, 0, None
            if progress.epoch == epochs or policy.due(epoch_end=True):
                _save(b, progress, policy)
                saved = (progress.epoch, 0)
    bar.close()
    return progress


# --------------------------------------------------------------------------------------------
# finish: evaluate the final weights, write the record
# --------------------------------------------------------------------------------------------
def finish(b: Built, progress: Progress) -> dict[str, Any]:
    """Evaluate the final weights (rank 0) and write the finished record."""
    config, ctx, trainer = b.config, b.ctx, b.config["trainer"]
    eval_start = time.perf_counter()
    train_features, test_features = cached_features(
        b.method, b.bundle, ctx.device, b.run_dir, config["eval"]["batch_size"],
        trainer["num_workers"],
    )
    evaluation = evaluate_features(
        train_features, b.bundle.train.labels, test_features, b.bundle.test.labels,
        config["eval"]["knn"], config["eval"]["linear"], config["eval"]["probe_backend"],
        config["eval"]["chunk_size"], ctx.device,
    )
    eval_seconds = time.perf_counter() - eval_start
    batch_size, accum, world = trainer["batch_size"], trainer["grad_accum_steps"], ctx.world_size
    if b.batches is None:
        augmentation = "none (not trained)"
    elif b.batches.identical_augmentation:
        augmentation = "identical to W=1"
    else:
        augmentation = "per-rank photometric generator"
    record = build_finished_record(
        _header(config, b.run_dir, ctx),
        stem=config["backbone"]["stem"],
        epochs=b.epochs,
        batch_size=batch_size,
        steps=b.total_steps,
        distributed={
            **ctx.as_dict(),
            "per_process_batch": batch_size // world,
            "sync_bn_layers": b.parallel["sync_bn_layers"],
            "per_process_bn": b.parallel["local_bn_modules"],
            "augmentation": augmentation,
        },
        shuffle_bn=b.method.uses_shuffle_bn() and world > 1,
        execution={
            "precision": b.precision,
            "channels_last": b.channels_last,
            "compile": b.compiled,
            "grad_accum_steps": accum,
            "micro_batch": batch_size // accum,
        },
        resumed_from=progress.resumed_from,
        resumed_from_step=progress.resumed_from_step,
        device=str(ctx.device),
        device_name=_device_name(ctx.device),
        evaluation=evaluation,
        history=progress.history,
        train_seconds=progress.train_seconds,
        eval_seconds=eval_seconds,
        peak_memory_mb=_peak_memory_mb(ctx.device),
    )
    write_record(b.run_dir, record)
    metrics = evaluation["metrics"]
    print(
        f"[groupbench] {b.run_dir}: knn20 {metrics.get('knn20_top1', float('nan')):.2f} "
        f"linear {metrics.get('linear_top1', float('nan')):.2f} "
        f"({progress.train_seconds:.0f} s training)"
    )
    return record


def _header(config: dict[str, Any], run_dir: Path, ctx: DistContext) -> dict[str, Any]:
    return record_header(
        config, run_dir, world_size=ctx.world_size, job=ctx.job.as_dict(),
        reference=get_method_class(config["method"]["name"]).is_reference,
    )


def _write_failed_record(
    config: dict[str, Any], run_dir: Path, ctx: DistContext, exc: BaseException
) -> None:
    """Leave a record the report lists, unless a finished record is already there."""
    if finished_record(run_dir) is not None:
        return
    record = build_failed_record(
        _header(config, run_dir, ctx),
        error=f"{type(exc).__name__}: {exc}",
        traceback=traceback.format_exc(),
        epochs_done=checkpoint_epoch(checkpoint_path(run_dir)),
    )
    try:
        write_record(run_dir, record)
    except OSError as write_error:  # the original error matters more than this one
        print(f"[groupbench] could not write the failed record of {run_dir}: {write_error}")


# --------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------
def run(cfg: Any) -> dict[str, Any]:
    """Train and evaluate one config; return its run record (also written to record.json).

    On ranks other than 0 of a multi-process run, returns a short summary after training (rank 0
    evaluates and writes the record).
    """
    config = resolve_run_config(cfg)
    ctx = distributed.setup(config["trainer"]["device"])
    if ctx.world_size > 1:
        # Only W > 1 is recorded in the hashed config, so one-process run keys stay as they were.
        config["trainer"]["world_size"] = ctx.world_size
    run_dir = run_dir_for(config)
    if config["trainer"]["skip_finished"]:
        record = finished_record(run_dir)
        if record is not None:
            if ctx.is_main:
                print(f"[groupbench] skipping finished run {run_dir}")
            return record
    try:
        if ctx.is_main:
            # The run has started, in this scheduler job (if any): until a record appears, the
            # report lists it as unfinished, with the job's log.
            write_job(run_dir, {**ctx.job.as_dict(), "world_size": ctx.world_size})
        b = build(config, run_dir, ctx)
        progress = Progress()
        if b.trains:
            policy = CheckpointPolicy(config["trainer"]["checkpoint_every_s"], enabled=ctx.is_main)
            progress = fit(b, resume(b), policy)
        if not ctx.is_main:
            # Rank 0 evaluates alone (no collective follows), so the other processes are done.
            return {"status": "trained", "rank": ctx.rank, "world_size": ctx.world_size,
                    "run_dir": str(run_dir), "history": progress.history, "metrics": {}}
        return finish(b, progress)
    except Exception as exc:  # not BaseException: preemption (SystemExit) must not look failed
        # Into this process's log too: under a launcher (hydra, submitit) the exception otherwise
        # reaches only the submitting process, which may be long gone.
        where = f" (rank {ctx.rank} of {ctx.world_size})" if ctx.world_size > 1 else ""
        print(f"[groupbench] run {run_dir} failed{where}:\n{traceback.format_exc()}",
              file=sys.stderr, flush=True)
        if ctx.is_main:
            _write_failed_record(config, run_dir, ctx, exc)
        raise


def smoke_run(cfg: Any, steps: int = 3) -> dict[str, Any]:
    """A few training steps and a small k-NN evaluation of ``cfg``, built exactly as ``run``
    builds it (device, precision, memory layout, compilation); writes nothing.

    Returns ``status`` ("ok" or "error"), ``error`` (one line, or None), ``step_ms`` (the median
    optimiser step after the first, which includes compilation; the first if only one ran),
    ``first_step_ms``, ``peak_mb``, ``device``, ``precision`` and ``compile`` (as resolved; None
    where the failure came first). A method that does not train runs the evaluation only.
    """
    result: dict[str, Any] = {
        "status": "ok", "error": None, "step_ms": None, "first_step_ms": None, "peak_mb": None,
        "device": None, "precision": None, "compile": None,
    }
    try:
        config = resolve_run_config(cfg)
        ctx = distributed.setup(config["trainer"]["device"])
        if ctx.world_size > 1:
            config["trainer"]["world_size"] = ctx.world_size
        result["device"] = str(ctx.device)
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        b = build(config, run_dir_for(config), ctx)  # nothing is written there
        result["precision"], result["compile"] = b.precision, b.compiled
        times = []
        if b.trains:
            assert b.batches is not None
            torch.manual_seed(derive_seed(config["seed"], "torch", 0))
            b.method.train()
            batches = b.batches.epoch(0)
            for step in range(min(steps, b.steps_per_epoch)):
                indices, views = next(batches)
                if ctx.device.type == "cuda":
                    torch.cuda.synchronize(ctx.device)
                start = time.perf_counter()
                loss, _ = train_step(b, indices, views, step)
                if not torch.isfinite(loss):
                    raise TrainingError(f"non-finite loss {loss.item()} in {b.label} at "
                                        f"step {step + 1}")
                if ctx.device.type == "cuda":
                    torch.cuda.synchronize(ctx.device)
                times.append(1000 * (time.perf_counter() - start))
        if times:
            result["first_step_ms"] = times[0]
            result["step_ms"] = statistics.median(times[1:] or times)
        if ctx.is_main:
            eval_cfg, workers = config["eval"], config["trainer"]["num_workers"]
            train, test = (sample_split(b.bundle.train, SMOKE_EVAL_IMAGES, 0),
                           sample_split(b.bundle.test, SMOKE_EVAL_IMAGES, 1))
            features = [extract_features(b.method, split, b.bundle, ctx.device,
                                         eval_cfg["batch_size"], workers)
                        for split in (train, test)]
            evaluate_features(features[0], train.labels, features[1], test.labels,
                              eval_cfg["knn"], linear=False,
                              chunk_size=eval_cfg["chunk_size"], device=ctx.device)
        result["peak_mb"] = _peak_memory_mb(ctx.device)
    except Exception as exc:
        message = " ".join(str(exc).split()) or "(no message)"
        result.update(status="error", error=f"{type(exc).__name__}: {message}")
    return result

