"""A run's checkpoint: when it is written, what it holds, how it is read back and checked.

One file per run, ``<run dir>/checkpoint.pt``, written atomically by rank 0 (``engine.io``:
temp file, fsync, rename), replacing the previous one:

- at the end of training, always (a run killed during its evaluation resumes straight into it);
- every ``trainer.checkpoint_every_s`` seconds of training, after the optimiser step that crosses
  the mark (inside an epoch if need be); ``0`` writes one at the end of every epoch instead;
- on SIGUSR2, the signal SLURM sends ``signal_delay_s`` before a time limit and on preemption
  (submitit's requeue path, slurm/README.md): the step under way finishes, the checkpoint is
  written, then the signal's previous handler runs (submitit's requeues the job and exits; with no
  handler the process ends as the signal would have ended it).

A checkpoint's position is ``epoch`` whole epochs plus ``step`` optimiser steps of the next one
(0 at an epoch boundary). One written inside an epoch also holds what the rest of that epoch needs
to go on exactly as an uninterrupted run would (``epoch_state``): torch's random number generator
states, the epoch's loss sum, its seconds so far and the sums of the method's diagnostics
(``DiagnosticSums``). The data order and augmentations are derived
from (seed, epoch) and replayed up to the step (``engine.data.TrainBatches.epoch``).

Under several processes only rank 0 writes. Its parameters and optimiser state are every rank's;
per-process buffers (BatchNorm running statistics of a shuffle-BN key encoder, split BN) follow
rank 0 on resume, as they do at every epoch end, and are not read by a training step.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import nn

from engine.io import atomic_torch_save, torch_archive_problem
from eval.records import CHECKPOINT_FILE

# The signal SLURM (submitit's --signal=USR2@signal_delay_s) sends before a time limit and on
# preemption.
CHECKPOINT_SIGNALS = (signal.SIGUSR2,)
WAY_OUT = "delete it or run with trainer.resume=false to start this run over"

# What a checkpoint written by this engine holds: key → accepted types.
CHECKPOINT_FIELDS: dict[str, tuple[type, ...]] = {
    "config_hash": (str,),
    "epoch": (int,),
    "method": (dict,),
    "optimizer": (dict,),
    "history": (list,),
    "train_seconds": (int, float),
}
# The extra fields of a checkpoint written inside an epoch (``step`` > 0), under ``epoch_state``.
EPOCH_STATE_FIELDS: dict[str, tuple[type, ...]] = {
    "loss_sum": (torch.Tensor,),
    "seconds": (int, float),
    "cpu_rng": (torch.Tensor,),
}


# Written since the diagnostics are logged; a checkpoint without them resumes with empty sums.
DIAGNOSTIC_STATE_FIELDS: dict[str, type] = {
    "diagnostic_sums": torch.Tensor,
    "diagnostic_steps": int,
}


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, unusable checkpoint); the message says where."""


@dataclass
class Progress:
    """How far training is: what a checkpoint saves and a resume starts from.

    ``epoch`` whole epochs done, ``step`` steps of the next one; ``epoch_state`` (only while
    ``step`` > 0) holds the running epoch's loss sum, seconds and RNG states.
    """

    epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    resumed_from: list[int] = field(default_factory=list)
    resumed_from_step: list[int] = field(default_factory=list)
    epoch_state: dict[str, Any] | None = None


@dataclass
class DiagnosticSums:
    """One epoch's running sums of a method's diagnostics (the scalars its ``training_step``
    returns beside the loss), each with the number of steps that reported it.

    The sums stay on the device (no synchronisation per step); a checkpoint written inside the
    epoch keeps them (``state``), so a resumed epoch logs the means of the uninterrupted one.
    """

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.sums)

    def add(self, diagnostics: dict[str, torch.Tensor]) -> None:
        for name, value in diagnostics.items():
            if name in self.sums:
                self.sums[name] += value
            else:
                self.sums[name] = value.detach().float().clone()
            self.steps[name] = self.steps.get(name, 0) + 1

    def means(self) -> dict[str, float | None]:
        """Each diagnostic's mean over the steps that reported it; None where it is not finite
        (JSON has no NaN)."""
        means = {}
        for name, total in self.sums.items():
            mean = (total / self.steps[name]).item()
            means[name] = mean if math.isfinite(mean) else None
        return means

    def state(self) -> dict[str, dict[str, Any]]:
        """The sums (on the CPU) and step counts, as ``epoch_state`` keeps them."""
        return {
            "diagnostic_sums": {name: total.detach().cpu().clone()
                                for name, total in self.sums.items()},
            "diagnostic_steps": dict(self.steps),
        }

    @classmethod
    def from_state(cls, epoch_state: dict[str, Any], device: torch.device) -> DiagnosticSums:
        """The sums a checkpoint's ``epoch_state`` holds (empty for one written without them)."""
        sums = epoch_state.get("diagnostic_sums") or {}
        return cls({name: total.to(device) for name, total in sums.items()},
                   dict(epoch_state.get("diagnostic_steps") or {}))


def _diagnostic_state_problem(epoch_state: dict[str, Any]) -> str | None:
    names = []
    for key, kind in DIAGNOSTIC_STATE_FIELDS.items():
        value = epoch_state.get(key, {})
        if not isinstance(value, dict) or not all(
            isinstance(v, kind) and not isinstance(v, bool) for v in value.values()
        ):
            return f"epoch_state {key!r} is not a dict of {kind.__name__} values"
        names.append(set(value))
    if names[0] != names[1]:
        return "epoch_state 'diagnostic_sums' and 'diagnostic_steps' name different diagnostics"
    return None


def checkpoint_path(run_dir: Path) -> Path:
    return run_dir / CHECKPOINT_FILE


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """torch's global generators: the CPU one, and the device's when it is a GPU."""
    state = {"cpu_rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu_rng"])
    if device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def save_checkpoint(
    path: Path,
    run_hash: str,
    progress: Progress,
    method: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
) -> None:
    """Write ``progress`` with the method's and the optimiser's state to ``path``, atomically."""
    state: dict[str, Any] = {
        "config_hash": run_hash,
        "epoch": progress.epoch,
        "step": progress.step,
        "method": method.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "history": progress.history,
        "train_seconds": progress.train_seconds,
        "resumed_from": progress.resumed_from,
        "resumed_from_step": progress.resumed_from_step,
    }
    if progress.step:
        state["epoch_state"] = progress.epoch_state
    atomic_torch_save(path, state)


def _field_problem(where: str, state: dict[str, Any], fields: dict[str, tuple[type, ...]]) -> str | None:
    for key, types in fields.items():
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, types):
            found = "missing" if key not in state else f"a {type(value).__name__}"
            return f"{where}{key!r} is {found}, expected {' or '.join(t.__name__ for t in types)}"
    return None


def load_checkpoint(path: Path, expected_hash: str) -> dict[str, Any]:
    """The checkpoint's state, or a TrainingError naming the file and the way out.

    The archive is verified before torch.load (which would accept a flipped byte inside a
    tensor), and the fields the resume reads are checked, so a damaged file is refused here
    rather than by a KeyError or a silently wrong state further down. Checkpoints written before
    positions inside an epoch existed have no ``step``: they are at an epoch boundary.
    """
    problem = torch_archive_problem(path)
    if problem is not None:
        raise TrainingError(f"checkpoint {path} is {problem}; {WAY_OUT}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises several types for a truncated or foreign file
        raise TrainingError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); {WAY_OUT}"
        ) from None
    if not isinstance(state, dict):
        raise TrainingError(
            f"checkpoint {path} holds a {type(state).__name__}, not a groupbench checkpoint; "
            f"{WAY_OUT}"
        )
    if state.get("config_hash") != expected_hash:
        raise TrainingError(
            f"checkpoint {path} does not belong to this config (hash {expected_hash}); delete it "
            "or run with trainer.resume=false"
        )
    state.setdefault("step", 0)
    problem = _field_problem("", state, {**CHECKPOINT_FIELDS, "step": (int,)})
    if problem is None and state["step"] > 0:
        epoch_state = state.get("epoch_state")
        if not isinstance(epoch_state, dict):
            problem = f"'epoch_state' is {type(epoch_state).__name__}, expected a dict at step {state['step']}"
        else:
            problem = (_field_problem("epoch_state ", epoch_state, EPOCH_STATE_FIELDS)
                       or _diagnostic_state_problem(epoch_state))
    if problem is not None:
        raise TrainingError(f"checkpoint {path} is damaged: {problem}; {WAY_OUT}")
    epoch, step = state["epoch"], state["step"]
    if epoch < 0 or step < 0 or (epoch, step) == (0, 0) or len(state["history"]) != epoch:
        where = f"epoch {epoch}" + (f", step {step}" if step else "")
        raise TrainingError(
            f"checkpoint {path} is damaged: {where} with {len(state['history'])} epochs of "
            f"history; {WAY_OUT}"
        )
    return state


def restore_checkpoint(
    path: Path,
    state: dict[str, Any],
    method: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    steps_per_epoch: int,
) -> Progress:
    """Load a checked ``state`` into the method and optimiser; the progress to resume from."""
    if state["step"] >= steps_per_epoch:
        raise TrainingError(
            f"checkpoint {path} is at step {state['step']} of an epoch, but this run's epochs have "
            f"{steps_per_epoch} steps; {WAY_OUT}"
        )
    try:
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    except (RuntimeError, ValueError, KeyError) as exc:
        # Weights of another architecture under this run's hash (code changed since).
        raise TrainingError(
            f"checkpoint {path} does not fit this run's model or optimiser "
            f"({str(exc).splitlines()[0]}); {WAY_OUT}"
        ) from None
    epoch, step = state["epoch"], state["step"]
    return Progress(
        epoch=epoch,
        step=step,
        history=state["history"],
        train_seconds=state["train_seconds"],
        resumed_from=[*state.get("resumed_from", []), epoch],
        resumed_from_step=[*state.get("resumed_from_step", []), epoch * steps_per_epoch + step],
        epoch_state=state.get("epoch_state") if step else None,
    )


def checkpoint_epoch(path: Path) -> int | None:
    """The whole epochs a checkpoint holds, or None (missing or unreadable)."""
    if not path.exists():
        return None
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["epoch"])
    except Exception:  # an unreadable checkpoint is reported by the error that stopped the run
        return None


class CheckpointPolicy:
    """When to write a checkpoint: on a wall-clock cadence, at epoch ends, or on a signal.

    ``every_s`` > 0: after the first step that ends ``every_s`` seconds or more after the last
    checkpoint (or the start of training); 0: at the end of every epoch. ``watch_signals()``
    turns SIGUSR2 into a request for a checkpoint after the current step; ``after_save()`` then
    hands the signal on to the handler that was there before.
    """

    def __init__(self, every_s: float, enabled: bool = True) -> None:
        self.every_s = float(every_s)
        self.enabled = enabled
        self.last = time.monotonic()
        self.signalled: int | None = None
        self._previous: dict[int, Any] = {}

    def due(self, *, epoch_end: bool) -> bool:
        """Whether a checkpoint should be written now (the end of a step or of an epoch)."""
        if not self.enabled:
            return False
        if self.signalled is not None:
            return True
        if self.every_s == 0:
            return epoch_end
        return time.monotonic() - self.last >= self.every_s

    def saved(self) -> None:
        self.last = time.monotonic()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signalled = signum

    @contextmanager
    def watch_signals(self) -> Iterator[None]:
        """Within the block, SIGUSR2 asks for a checkpoint instead of acting at once.

        Only in the main thread (where Python runs signal handlers) of a process that writes
        checkpoints, and only for a signal that is not ignored. A signal still waiting for its
        checkpoint when the block ends goes to its own handler then.
        """
        if self.enabled and threading.current_thread() is threading.main_thread():
            for signum in CHECKPOINT_SIGNALS:
                previous = signal.getsignal(signum)
                if previous is not signal.SIG_IGN and previous is not None:
                    self._previous[signum] = previous
                    signal.signal(signum, self._on_signal)
        try:
            yield
        finally:
            for signum, previous in self._previous.items():
                signal.signal(signum, previous)
            self._previous = {}
            signum, self.signalled = self.signalled, None
            if signum is not None:
                signal.raise_signal(signum)

    def after_save(self) -> None:
        """After a checkpoint: a signal that asked for it goes to its own handler now (submitit's
        requeues the job and exits; without one, USR2 ends the process as it would have)."""
        signum, self.signalled = self.signalled, None
        if signum is None:
            return
        signal.signal(signum, self._previous[signum])
        try:
            signal.raise_signal(signum)  # Python runs the handler before this call returns
        finally:
            signal.signal(signum, self._on_signal)
