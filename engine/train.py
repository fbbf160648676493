"""One run, end to end: seed → data → backbone → method → train → evaluate → record.

``run(cfg)`` takes a composed config (hydra DictConfig or dict), resolves it, and either skips a
finished run, resumes an interrupted one from its own last checkpoint, or trains from scratch.
The run directory is keyed by the hash of the fully resolved config, seed included, so two seeds
(or any two settings) never share a checkpoint.
"""

from __future__ import annotations

import json
import platform
import resource
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import datasets
from backbones import build_backbone
from datasets.views import view_config
from engine.config import method_options, resolve_run_config, semantic_config
from engine.data import TrainBatches, derive_seed
from engine.evaluate import cached_features, evaluate_features
from engine.io import (
    atomic_torch_save,
    atomic_write_json,
    config_hash,
    git_commit,
    package_versions,
)
from engine.optim import OptimizerSettings, build_optimizer, lr_factor, set_lr
from methods import build_method

RECORD_VERSION = 1
PROTOCOL = "groupbench-v1"  # protocol.md: final checkpoint, k-NN on pooled features, L-BFGS probe


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, unusable checkpoint); the message says where."""


def pick_device(requested: str = "auto") -> torch.device:
    """CUDA when present (or asked for), else CPU; never assumes a GPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"trainer.device={requested!r} but no CUDA device is available; use auto or cpu")
    return device


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


def run_dir_for(config: dict[str, Any]) -> Path:
    method = config["method"]
    name = f"{method['name']}-{method.get('preset') or 'default'}"
    leaf = f"seed{config['seed']}-{config_hash(semantic_config(config))}"
    return (
        Path(config["results_dir"]) / "runs" / config["dataset"]["name"] / name
        / config["backbone"]["name"] / leaf
    )


def _load_checkpoint(path: Path, expected_hash: str) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises several types for a truncated or foreign file
        raise TrainingError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); delete it or run with "
            "trainer.resume=false to start this run over"
        ) from None
    if not isinstance(state, dict) or state.get("config_hash") != expected_hash:
        raise TrainingError(
            f"checkpoint {path} does not belong to this config (hash {expected_hash}); delete it "
            "or run with trainer.resume=false"
        )
    return state


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is the process's peak resident set, in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(cfg: Any) -> dict[str, Any]:
    """Train and evaluate one config; return its run record (also written to record.json)."""
    config = resolve_run_config(cfg)
    trainer = config["trainer"]
    run_dir = run_dir_for(config)
    record_path = run_dir / "record.json"
    checkpoint_path = run_dir / "checkpoint.pt"
    run_hash = config_hash(semantic_config(config))
    if trainer["skip_finished"] and record_path.exists():
        try:
            record = json.loads(record_path.read_text())
        except (OSError, json.JSONDecodeError):
            record = None
        if record and record.get("status") == "finished":
            print(f"[groupbench] skipping finished run {run_dir}")
            return record

    device = pick_device(trainer["device"])
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
    method.check_batch(batch_size, len(bundle.pretrain))
    method.to(device)

    views = [view_config(bundle.name, kind, bundle.image_size) for kind in method.view_kinds()]
    batches = TrainBatches(
        bundle, views, batch_size, device, seed, trainer["num_workers"],
        trainer.get("max_steps_per_epoch"),
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

    start_epoch, history, train_seconds = 0, [], 0.0
    if checkpoint_path.exists() and trainer["resume"]:
        state = _load_checkpoint(checkpoint_path, run_hash)
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, history = state["epoch"], state["history"]
        train_seconds = state["train_seconds"]
        print(f"[groupbench] resuming {run_dir} after epoch {start_epoch}/{epochs}")

    images_seen = 0
    bar = tqdm(
        total=total_steps, initial=start_epoch * steps_per_epoch, disable=not trainer["progress"],
        desc=f"{method_cfg['name']}/{method_cfg.get('preset')} seed {seed}", unit="step",
        dynamic_ncols=True,
    )
    method.train()
    for epoch in range(start_epoch, epochs):
        torch.manual_seed(derive_seed(seed, "torch", epoch))
        epoch_start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for step_in_epoch, (indices, views_batch) in enumerate(batches.epoch(epoch)):
            step = epoch * steps_per_epoch + step_in_epoch
            set_lr(optimizer, lr_factor(optim.schedule, step, steps_per_epoch, epochs, warmup, peak_lr))
            with autocast:
                out = method.training_step(views_batch, indices.to(device))
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"non-finite loss {loss.item()} in method {method_cfg['name']} "
                    f"(preset {method_cfg.get('preset')}) at epoch {epoch + 1}, step "
                    f"{step_in_epoch + 1}; the last good checkpoint ({checkpoint_path}, epoch "
                    f"{epoch}) is kept"
                )
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            method.after_optimizer_step(step, total_steps)
            loss_sum += loss.detach()
            images_seen += batch_size
            bar.update(1)
            if step_in_epoch % 5 == 0 or step_in_epoch == steps_per_epoch - 1:
                rate = images_seen / max(train_seconds + time.perf_counter() - epoch_start, 1e-9)
                bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:.0f}")
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
            },
        )
    bar.close()

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
        "record_version": RECORD_VERSION,
        "status": "finished",
        "protocol": PROTOCOL,
        "run_id": run_dir.name,
        "config_hash": run_hash,
        "config": config,
        "seed": seed,
        "method": method_cfg["name"],
        "preset": method_cfg.get("preset"),
        "dataset": bundle.name,
        "backbone": backbone_cfg["name"],
        "stem": backbone_cfg["stem"],
        "epochs": epochs,
        "batch_size": batch_size,
        "steps": total_steps,
        "world_size": 1,
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
