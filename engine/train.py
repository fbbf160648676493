"""One run, end to end: seed → data → backbone → method → train → evaluate → record.

``run(cfg)`` takes a composed config (hydra DictConfig or dict), resolves it, and either skips a
finished run, resumes an interrupted one from its own last checkpoint, or trains from scratch.
The run directory is keyed by the hash of the fully resolved config, seed included, so two seeds
(or any two settings) never share a checkpoint.

With several processes (torchrun, or a submitit job with ``tasks_per_node > 1``; see
``engine.distributed``) every process trains on its slice of each global batch, gradients are
averaged, and rank 0 alone writes checkpoints and the record and evaluates. W > 1 is part of the
run's identity (``trainer.world_size`` joins the hashed config): MoCo's shuffle-BN and the order of
floating-point reductions make it a different computation from one process.

A run that raises writes a record with ``status: "failed"``, the error and the scheduler job, so
the report lists it; running the same command again resumes it from its last checkpoint. A
preemption or time-limit signal (submitit) is not a failure: the job requeues itself and resumes.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
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
from engine.config import method_options, resolve_run_config, semantic_config
from engine.data import TrainBatches, derive_seed
from engine.distributed import DistContext, pick_device
from engine.evaluate import cached_features, evaluate_features
from engine.io import (
    atomic_torch_save,
    atomic_write_json,
    config_hash,
    git_commit,
    package_versions,
    torch_archive_problem,
)
from engine.optim import OptimizerSettings, build_optimizer, lr_factor, set_lr
from methods import build_method

__all__ = [
    "TrainingError",
    "accumulate_gradients",
    "finished_record",
    "pick_device",
    "resolve_channels_last",
    "resolve_compile",
    "run",
    "run_dir_for",
    "split_micro_batches",
]

RECORD_VERSION = 1
PROTOCOL = "groupbench-v1"  # protocol.md: final checkpoint, k-NN on pooled features, L-BFGS probe
# torch.compile backend for trainer.compile; tests swap in "aot_eager" (the same graph capture
# without inductor's C++ code generation, which alone takes minutes on a small CPU).
COMPILE_BACKEND = "inductor"
# Autocast dtype → the precision a run actually used (no autocast: fp32).
PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, unusable checkpoint); the message says where."""


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on CUDA (fp16 where bf16 is missing), nothing on CPU or with fp32."""
    if precision == "fp32" or device.type != "cuda":
        return nullcontext(), None
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


def accumulate_gradients(
    method: nn.Module,
    views: Sequence[torch.Tensor],
    indices: torch.Tensor,
    steps: int,
    autocast: AbstractContextManager[Any],
    scaler: torch.amp.GradScaler | None,
    world_size: int,
) -> torch.Tensor:
    """Forward and backward of one batch as ``steps`` micro-batches, summing into ``.grad``.

    Each micro-batch's loss is scaled by 1/steps, so the gradient is the mean of the micro-batch
    gradients (the full batch's, for a loss that is a mean over independent samples; not for a
    contrastive loss, whose negatives now come from the micro-batch). Gradients are then averaged
    over processes, once. Returns the detached loss, averaged over micro-batches and processes; a
    non-finite micro-batch loss is returned at once, before its backward pass, for the caller to
    raise (every process sees the same value, so none is left waiting in a collective).
    """
    losses = []
    for micro_indices, micro_views in split_micro_batches(indices, views, steps):
        with autocast:
            loss = method.training_step(micro_views, micro_indices)["loss"]
        global_loss = distributed.all_reduce_mean(loss.detach(), world_size)
        if not torch.isfinite(global_loss):
            return global_loss
        if steps > 1:  # one micro-batch keeps the unscaled loss: bit-identical to no accumulation
            loss = loss / steps
        (scaler.scale(loss) if scaler is not None else loss).backward()
        losses.append(global_loss)
    distributed.average_gradients(method, world_size)
    return losses[0] if steps == 1 else torch.stack(losses).mean()


def _ema_runs_in_training_step(method: nn.Module) -> bool:
    """A key encoder updated at the start of training_step (MoCo/CLD/ASCL ema_timing=before_keys)."""
    config = getattr(method, "config", None)
    return (
        getattr(config, "ema_timing", None) == "before_keys"
        and getattr(config, "base_loss", "moco") == "moco"
    )


def run_dir_for(config: dict[str, Any]) -> Path:
    method = config["method"]
    name = f"{method['name']}-{method.get('preset') or 'default'}"
    leaf = f"seed{config['seed']}-{config_hash(semantic_config(config))}"
    return (
        Path(config["results_dir"]) / "runs" / config["dataset"]["name"] / name
        / config["backbone"]["name"] / leaf
    )


# What a checkpoint written by this engine holds: key → accepted types.
CHECKPOINT_FIELDS: dict[str, tuple[type, ...]] = {
    "config_hash": (str,),
    "epoch": (int,),
    "method": (dict,),
    "optimizer": (dict,),
    "history": (list,),
    "train_seconds": (int, float),
}


def _load_checkpoint(path: Path, expected_hash: str) -> dict[str, Any]:
    """The checkpoint's state, or a TrainingError naming the file and the way out.

    The archive is verified before torch.load (which would accept a flipped byte inside a
    tensor), and the fields the resume reads are checked, so a damaged file is refused here
    rather than by a KeyError or a silently wrong state further down.
    """
    way_out = "delete it or run with trainer.resume=false to start this run over"
    problem = torch_archive_problem(path)
    if problem is not None:
        raise TrainingError(f"checkpoint {path} is {problem}; {way_out}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises several types for a truncated or foreign file
        raise TrainingError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); {way_out}"
        ) from None
    if not isinstance(state, dict):
        raise TrainingError(
            f"checkpoint {path} holds a {type(state).__name__}, not a groupbench checkpoint; "
            f"{way_out}"
        )
    if state.get("config_hash") != expected_hash:
        raise TrainingError(
            f"checkpoint {path} does not belong to this config (hash {expected_hash}); delete it "
            "or run with trainer.resume=false"
        )
    for key, types in CHECKPOINT_FIELDS.items():
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, types):
            found = "missing" if key not in state else f"a {type(value).__name__}"
            raise TrainingError(
                f"checkpoint {path} is damaged: {key!r} is {found}, expected "
                f"{' or '.join(t.__name__ for t in types)}; {way_out}"
            )
    if state["epoch"] < 1 or len(state["history"]) != state["epoch"]:
        raise TrainingError(
            f"checkpoint {path} is damaged: epoch {state['epoch']} with "
            f"{len(state['history'])} epochs of history; {way_out}"
        )
    return state


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is the process's peak resident set, in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def finished_record(run_dir: Path) -> dict[str, Any] | None:
    """The run's record if it says finished (an unreadable or failed one does not count)."""
    try:
        record = json.loads((run_dir / "record.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("status") == "finished" else None


def _record_header(config: dict[str, Any], run_dir: Path, ctx: DistContext) -> dict[str, Any]:
    """The fields every record has, finished or failed."""
    method_cfg = config["method"]
    return {
        "record_version": RECORD_VERSION,
        "protocol": PROTOCOL,
        "run_id": run_dir.name,
        "config_hash": config_hash(semantic_config(config)),
        "config": config,
        "seed": config["seed"],
        "method": method_cfg["name"],
        "preset": method_cfg.get("preset"),
        "dataset": config["dataset"]["name"],
        "backbone": config["backbone"]["name"],
        "world_size": ctx.world_size,
        "job": ctx.job.as_dict(),
    }


def _write_failed_record(
    config: dict[str, Any], run_dir: Path, ctx: DistContext, exc: BaseException
) -> None:
    """Leave a record the report lists, unless a finished record is already there."""
    if finished_record(run_dir) is not None:
        return
    checkpoint = run_dir / "checkpoint.pt"
    epochs_done = None
    if checkpoint.exists():
        try:
            epochs_done = torch.load(checkpoint, map_location="cpu", weights_only=False)["epoch"]
        except Exception:  # an unreadable checkpoint is itself reported by the error
            epochs_done = None
    record = {
        **_record_header(config, run_dir, ctx),
        "status": "failed",
        "error": f"{type(exc).__name__}: {exc}",
        "traceback": traceback.format_exc()[-6000:],
        "epochs_done": epochs_done,
        "failed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        atomic_write_json(run_dir / "record.json", record)
    except OSError as write_error:  # the original error matters more than this one
        print(f"[groupbench] could not write the failed record of {run_dir}: {write_error}")


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
        return _train_and_evaluate(config, run_dir, ctx)
    except Exception as exc:  # not BaseException: preemption (SystemExit) must not look failed
        # Into this process's log too: under a launcher (hydra, submitit) the exception otherwise
        # reaches only the submitting process, which may be long gone.
        where = f" (rank {ctx.rank} of {ctx.world_size})" if ctx.world_size > 1 else ""
        print(f"[groupbench] run {run_dir} failed{where}:\n{traceback.format_exc()}",
              file=sys.stderr, flush=True)
        if ctx.is_main:
            _write_failed_record(config, run_dir, ctx, exc)
        raise


def _train_and_evaluate(config: dict[str, Any], run_dir: Path, ctx: DistContext) -> dict[str, Any]:
    trainer = config["trainer"]
    record_path = run_dir / "record.json"
    checkpoint_path = run_dir / "checkpoint.pt"
    run_hash = config_hash(semantic_config(config))
    if ctx.is_main and ctx.job.id is not None:
        # Which job ran this run last: the report shows it (and its log) if no record appears.
        atomic_write_json(run_dir / "job.json", {**ctx.job.as_dict(), "world_size": ctx.world_size})

    device = ctx.device
    world = ctx.world_size
    seed = config["seed"]
    seed_everything(seed)
    dataset_cfg = config["dataset"]
    bundle = datasets.load_dataset(
        dataset_cfg["name"], dataset_cfg.get("root"), dataset_cfg.get("download", False),
        **(dataset_cfg.get("options") or {}),
    )
    backbone_cfg = config["backbone"]
    # The backbone is built first after seeding, so matched seeds give identical initial
    # backbones across methods (spec README §5).
    backbone = build_backbone(
        backbone_cfg["name"], in_chans=bundle.channels, stem=backbone_cfg["stem"],
        image_size=bundle.image_size, patch_size=backbone_cfg.get("patch_size"),
        **(backbone_cfg.get("kwargs") or {}),
    )
    method_cfg = config["method"]
    method = build_method(method_cfg["name"], backbone, **method_options(method_cfg))
    batch_size = trainer["batch_size"]
    if batch_size > len(bundle.pretrain):
        raise TrainingError(
            f"trainer.batch_size={batch_size} exceeds the {len(bundle.pretrain)} pre-training "
            f"images of {bundle.name}; use at most {len(bundle.pretrain)}"
        )
    accum = trainer["grad_accum_steps"]
    if batch_size % world == 0 and (batch_size // world) % accum:  # (else shard_slice says so)
        raise TrainingError(
            f"the per-process batch {batch_size // world} (trainer.batch_size={batch_size} over "
            f"{world} processes) is not divisible by trainer.grad_accum_steps={accum}; use a "
            f"batch size that is a multiple of {world * accum}"
        )
    # The method sees global micro-batches: its queue, top-k and split-BN checks are about them.
    method.check_batch(batch_size // accum, len(bundle.pretrain))
    if accum > 1 and _ema_runs_in_training_step(method):
        warnings.warn(
            f"trainer.grad_accum_steps={accum}: {method_cfg['name']} updates its key encoder inside "
            f"training_step (ema_timing=before_keys), i.e. {accum} EMA updates per optimiser step "
            f"(effective momentum m^{accum}); use method.ema_timing=after_step for one per step",
            stacklevel=2,
        )
    parallel = distributed.prepare_method(method, world)
    method.to(device)
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

    views = [view_config(bundle.name, kind, bundle.image_size) for kind in method.view_kinds()]
    batches = distributed.ShardedBatches(
        TrainBatches(
            bundle, views, batch_size, device, seed, trainer["num_workers"],
            trainer.get("max_steps_per_epoch"),
        ),
        ctx.rank, world,
    )
    epochs = trainer["epochs"]
    steps_per_epoch = batches.steps_per_epoch
    total_steps = epochs * steps_per_epoch
    optim = OptimizerSettings.from_dict(method_cfg["optimizer"])
    peak_lr = optim.peak_lr(batch_size)
    warmup = optim.warmup_epochs
    if dataset_cfg.get("warmup_cap_epochs") is not None:
        warmup = min(warmup, dataset_cfg["warmup_cap_epochs"])
    optimizer = build_optimizer(method.parameter_groups(), optim, peak_lr)
    autocast, scaler = autocast_context(device, trainer["precision"])

    start_epoch, history, train_seconds, resumed_from = 0, [], 0.0, []
    if checkpoint_path.exists() and trainer["resume"]:
        state = _load_checkpoint(checkpoint_path, run_hash)
        try:
            method.load_state_dict(state["method"])
            optimizer.load_state_dict(state["optimizer"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            # Weights of another architecture under this run's hash (code changed since).
            raise TrainingError(
                f"checkpoint {checkpoint_path} does not fit this run's model or optimiser "
                f"({str(exc).splitlines()[0]}); delete it or run with trainer.resume=false to "
                "start this run over"
            ) from None
        start_epoch, history = state["epoch"], state["history"]
        train_seconds = state["train_seconds"]
        resumed_from = [*state.get("resumed_from", []), start_epoch]
        if ctx.is_main:
            print(f"[groupbench] resuming {run_dir} after epoch {start_epoch}/{epochs}")
    # Identical seeds already give identical weights; the broadcast makes it a guarantee.
    distributed.broadcast_state(method, world)

    images_seen = 0
    bar = tqdm(
        total=total_steps, initial=start_epoch * steps_per_epoch,
        disable=not (trainer["progress"] and ctx.is_main),
        desc=f"{method_cfg['name']}/{method_cfg.get('preset')} seed {seed}", unit="step",
        dynamic_ncols=True,
    )
    method.train()
    for epoch in range(start_epoch, epochs):
        # The same stream on every process: random choices a method makes for the whole batch
        # (permutations, cluster seeds) must agree across processes.
        torch.manual_seed(derive_seed(seed, "torch", epoch))
        epoch_start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for step_in_epoch, (indices, views_batch) in enumerate(batches.epoch(epoch)):
            step = epoch * steps_per_epoch + step_in_epoch
            set_lr(optimizer, lr_factor(optim.schedule, step, steps_per_epoch, epochs, warmup, peak_lr))
            if channels_last:
                views_batch = to_channels_last(views_batch)
            optimizer.zero_grad(set_to_none=True)
            # The global batch's loss (mean over processes) decides for every process at once.
            global_loss = accumulate_gradients(
                method, views_batch, indices.to(device), accum, autocast, scaler, world
            )
            if not torch.isfinite(global_loss):
                raise TrainingError(
                    f"non-finite loss {global_loss.item()} in method {method_cfg['name']} "
                    f"(preset {method_cfg.get('preset')}) at epoch {epoch + 1}, step "
                    f"{step_in_epoch + 1}; "
                    + (f"the last good checkpoint ({checkpoint_path}, epoch {epoch}) is kept"
                       if epoch > 0 else "no checkpoint had been written yet")
                )
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            # Once per optimiser step, however many micro-batches it took.
            method.after_optimizer_step(step, total_steps)
            loss_sum += global_loss
            images_seen += batch_size
            bar.update(1)
            if step_in_epoch % 5 == 0 or step_in_epoch == steps_per_epoch - 1:
                rate = images_seen / max(train_seconds + time.perf_counter() - epoch_start, 1e-9)
                bar.set_postfix(loss=f"{global_loss.item():.4f}", img_s=f"{rate:.0f}")
        # Per-process buffers (shuffle-BN's key encoder statistics) follow rank 0, whose copy is
        # the one checkpointed: a resumed run then continues from exactly the uninterrupted state.
        distributed.broadcast_state(method, world, parameters=False)
        epoch_seconds = time.perf_counter() - epoch_start
        train_seconds += epoch_seconds
        history.append(
            {
                "epoch": epoch + 1,
                "loss": (loss_sum / steps_per_epoch).item(),
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": epoch_seconds,
                "images_per_second": steps_per_epoch * batch_size / max(epoch_seconds, 1e-9),
            }
        )
        if ctx.is_main:
            atomic_torch_save(
                checkpoint_path,
                {
                    "config_hash": run_hash,
                    "epoch": epoch + 1,
                    "method": method.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "history": history,
                    "train_seconds": train_seconds,
                    "resumed_from": resumed_from,
                },
            )
    bar.close()
    if not ctx.is_main:
        # Rank 0 evaluates alone (no collective follows), so the other processes are done.
        return {"status": "trained", "rank": ctx.rank, "world_size": world, "run_dir": str(run_dir),
                "history": history, "metrics": {}}

    eval_start = time.perf_counter()
    train_features, test_features = cached_features(
        method, bundle, device, run_dir, config["eval"]["batch_size"], trainer["num_workers"]
    )
    evaluation = evaluate_features(
        train_features, bundle.train.labels, test_features, bundle.test.labels,
        config["eval"]["knn"], config["eval"]["linear"], config["eval"]["probe_backend"],
        config["eval"]["chunk_size"], device,
    )
    eval_seconds = time.perf_counter() - eval_start
    images_trained = total_steps * batch_size
    record = {
        **_record_header(config, run_dir, ctx),
        "status": "finished",
        "stem": backbone_cfg["stem"],
        "epochs": epochs,
        "batch_size": batch_size,
        "steps": total_steps,
        "distributed": {
            **ctx.as_dict(),
            "per_process_batch": batch_size // world,
            "sync_bn_layers": parallel["sync_bn_layers"],
            "per_process_bn": parallel["local_bn_modules"],
            "augmentation": "identical to W=1" if batches.identical_augmentation
            else "per-rank photometric generator",
        },
        "shuffle_bn": bool(getattr(method, "shuffle_bn", False)) and world > 1,
        # What trainer.precision / channels_last / compile resolved to on this device.
        "execution": {
            "precision": PRECISION_NAMES[getattr(autocast, "fast_dtype", None)],
            "channels_last": channels_last,
            "compile": compiled,
            "grad_accum_steps": accum,
            "micro_batch": batch_size // accum,
        },
        "resumed_from": resumed_from,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "metrics": evaluation["metrics"],
        "correct": evaluation["correct"],
        "history": history,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "images_per_second": images_trained / max(train_seconds, 1e-9),
        "peak_memory_mb": _peak_memory_mb(device),
        "git_commit": git_commit(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(record_path, record)
    print(
        f"[groupbench] {run_dir}: knn20 {evaluation['metrics'].get('knn20_top1', float('nan')):.2f} "
        f"linear {evaluation['metrics'].get('linear_top1', float('nan')):.2f} "
        f"({train_seconds:.0f} s training)"
    )
    return record
