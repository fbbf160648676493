"""The run record: the one module that lays it out on disk, writes it and reads it back.

A run directory ``<results>/runs/<dataset>/<method>-<preset>/<backbone>/seed<s>-<hash>/``
(``run_dir_for``; the hash is that of the resolved config without ``NON_SEMANTIC_KEYS``, seed
included) holds ``record.json`` once the run finished (or failed with an error),
``checkpoint.pt`` once training has written one, ``job.json`` (written when the run starts; it
names the scheduler job that ran it last, if any) and the feature cache.

Writing (the engine, rank 0): ``record_header`` holds the fields every record has;
``build_finished_record`` and ``build_failed_record`` add the rest; ``write_record`` writes the
file atomically. Reading: ``finished_record`` (one run: its record if it says finished) and
``load_records`` (every run under a directory: the readable records, and a list of problems:
unreadable records, named, never silently dropped; failed runs; runs that started, with or
without a checkpoint, but have no record: unfinished). A finished record counts as unreadable too
when a field the report reads is missing or of the wrong type (``record_problem``), so one
damaged file cannot stop the whole report.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

RECORD_VERSION = 1
PROTOCOL = "groupbench-v1"  # docs/protocol.md: final checkpoint, k-NN on pooled features, probe
RECORD_FILE = "record.json"
CHECKPOINT_FILE = "checkpoint.pt"
JOB_FILE = "job.json"

# Config keys that never change what a run computes: left out of the run hash and of cells.
NON_SEMANTIC_KEYS = (
    ("results_dir",),
    ("smoke",),  # a smoke check writes no run
    ("trainer", "progress"),
    ("trainer", "num_workers"),
    ("trainer", "resume"),
    ("trainer", "skip_finished"),
    # When checkpoints are written changes nothing a run computes (a resumed run continues
    # exactly as an uninterrupted one), so the cadence never moves a run to another directory.
    ("trainer", "checkpoint_every_s"),
    # Memory layout and compilation change float rounding only, and `auto` resolves per machine:
    # a run resumed on another machine must still find its checkpoint.
    ("trainer", "channels_last"),
    ("trainer", "compile"),
    ("eval", "batch_size"),
    ("eval", "chunk_size"),
    ("dataset", "root"),
    ("dataset", "download"),
)
# A cell's runs differ only in their seed (docs/protocol.md §5).
NON_CELL_KEYS = (("seed",), *NON_SEMANTIC_KEYS)
# Keys that change what a run computes but came after runs existed: left out of the run hash and
# the cell while they hold the value every earlier run had, so such a run keeps its directory and
# its cell.
DEFAULT_ONLY_KEYS: dict[tuple[str, ...], Any] = {("augment",): "shared"}


def drop_keys(config: dict[str, Any], paths: tuple[tuple[str, ...], ...]) -> dict[str, Any]:
    """A deep copy of ``config`` without the nested keys in ``paths``, and without the
    ``DEFAULT_ONLY_KEYS`` that hold their default value."""
    out = copy.deepcopy(config)
    for path in paths:
        _pop(out, path)
    for path, default in DEFAULT_ONLY_KEYS.items():
        _pop(out, path, only_if=default)
    return out


_ANY = object()


def _pop(config: dict[str, Any], path: tuple[str, ...], only_if: Any = _ANY) -> None:
    node: Any = config
    for key in path[:-1]:
        node = node.get(key, {}) if isinstance(node, dict) else {}
    if isinstance(node, dict) and path[-1] in node:
        if only_if is _ANY or node[path[-1]] == only_if:
            node.pop(path[-1])


# --------------------------------------------------------------------------------------------
# where a run lives
# --------------------------------------------------------------------------------------------
def run_hash(config: dict[str, Any]) -> str:
    """The hash of a resolved run config without its NON_SEMANTIC_KEYS (seed included)."""
    from engine.io import config_hash

    return config_hash(drop_keys(config, NON_SEMANTIC_KEYS))


def run_dir_for(config: dict[str, Any]) -> Path:
    """``<results_dir>/runs/<dataset>/<method>-<preset>/<backbone>/seed<s>-<hash>``."""
    method = config["method"]
    name = f"{method['name']}-{method.get('preset') or 'default'}"
    leaf = f"seed{config['seed']}-{run_hash(config)}"
    return (
        Path(config["results_dir"]) / "runs" / config["dataset"]["name"] / name
        / config["backbone"]["name"] / leaf
    )


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def record_header(
    config: dict[str, Any], run_dir: Path, *, world_size: int, job: dict[str, Any],
    reference: bool,
) -> dict[str, Any]:
    """The fields every record has, finished or failed.

    ``reference``: the row is a reference (raw pixels, an untrained backbone), not a trained
    method; the report sets such rows apart.
    """
    method_cfg = config["method"]
    return {
        "record_version": RECORD_VERSION,
        "protocol": PROTOCOL,
        "run_id": run_dir.name,
        "config_hash": run_hash(config),
        "config": config,
        "seed": config["seed"],
        "method": method_cfg["name"],
        "preset": method_cfg.get("preset"),
        "reference": bool(reference),
        "dataset": config["dataset"]["name"],
        "backbone": config["backbone"]["name"],
        "world_size": world_size,
        "job": job,
    }


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def build_finished_record(
    header: dict[str, Any],
    *,
    stem: str,
    epochs: int,
    batch_size: int,
    steps: int,
    distributed: dict[str, Any],
    shuffle_bn: bool,
    execution: dict[str, Any],
    resumed_from: list[int],
    resumed_from_step: list[int],
    device: str,
    device_name: str,
    evaluation: dict[str, Any],
    history: list[dict[str, Any]],
    train_seconds: float,
    eval_seconds: float,
    peak_memory_mb: float,
) -> dict[str, Any]:
    """A finished run's record: ``header`` plus training, evaluation and provenance.

    ``resumed_from``: the whole epochs done at each resume; ``resumed_from_step``: the optimiser
    steps done at each resume (a checkpoint written inside an epoch resumes there).
    ``evaluation``: ``engine.evaluate.evaluate_features``'s ``{"metrics", "correct"}``.
    ``execution``: what trainer.precision / channels_last / compile resolved to on this device.
    """
    from engine.io import git_commit, package_versions

    return {
        **header,
        "status": "finished",
        "stem": stem,
        "epochs": epochs,
        "batch_size": batch_size,
        "steps": steps,
        "distributed": distributed,
        "shuffle_bn": shuffle_bn,
        "execution": execution,
        "resumed_from": resumed_from,
        "resumed_from_step": resumed_from_step,
        "device": device,
        "device_name": device_name,
        "threads": torch.get_num_threads(),
        "metrics": evaluation["metrics"],
        "correct": evaluation["correct"],
        "history": history,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "images_per_second": steps * batch_size / max(train_seconds, 1e-9),
        "peak_memory_mb": peak_memory_mb,
        "git_commit": git_commit(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "finished_at": _utc_now(),
    }


def build_failed_record(
    header: dict[str, Any], *, error: str, traceback: str, epochs_done: int | None
) -> dict[str, Any]:
    """A failed run's record: the error, the end of its traceback, the epochs checkpointed."""
    return {
        **header,
        "status": "failed",
        "error": error,
        "traceback": traceback[-6000:],
        "epochs_done": epochs_done,
        "failed_at": _utc_now(),
    }


def write_record(run_dir: Path, record: dict[str, Any]) -> None:
    """``run_dir/record.json``, written atomically (temp file, fsync, rename)."""
    from engine.io import atomic_write_json

    atomic_write_json(run_dir / RECORD_FILE, record)


def write_job(run_dir: Path, job: dict[str, Any]) -> None:
    """``run_dir/job.json``: the scheduler job running the run now (read back by ``job_of``)."""
    from engine.io import atomic_write_json

    atomic_write_json(run_dir / JOB_FILE, job)


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
def finished_record(run_dir: Path) -> dict[str, Any] | None:
    """The run's record if it says finished (an unreadable or failed one does not count)."""
    try:
        record = json.loads((run_dir / RECORD_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("status") == "finished" else None


@dataclass
class Problem:
    run_dir: str
    status: str  # "unreadable", "unfinished", "failed" or "duplicate"
    detail: str
    job_id: str | None = None  # the scheduler job that ran it last (SLURM/submitit), if any
    log_tail: str | None = None  # the end of that job's submitit log, when the file is readable


LOG_TAIL_LINES = 20


def job_of(run_dir: Path, record: dict[str, Any] | None = None) -> tuple[str | None, str | None]:
    """(job id, tail of its stderr log) from the record's ``job`` or the run's ``job.json``."""
    job = (record or {}).get("job")
    if not isinstance(job, dict):  # a record without a job (older, or not under a scheduler)
        try:
            job = json.loads((run_dir / JOB_FILE).read_text())
        except (OSError, ValueError):
            return None, None
    if not (isinstance(job, dict) and job.get("id")):
        return None, None
    tail = None
    for key in ("stderr", "stdout"):
        try:
            lines = Path(job[key]).read_text(errors="replace").splitlines()
        except (KeyError, TypeError, OSError):
            continue
        tail = "\n".join(lines[-LOG_TAIL_LINES:])
        break
    return str(job["id"]), tail


def _problem(run_dir: Path, status: str, detail: str, record: dict[str, Any] | None = None) -> Problem:
    job_id, tail = job_of(run_dir, record)
    if job_id:
        detail = f"{detail} (job {job_id})" if detail else f"job {job_id}"
    return Problem(str(run_dir), status, detail, job_id, tail)


@dataclass
class RecordSet:
    records: list[dict[str, Any]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value, sort_keys=True) if isinstance(value, list) else value
    return out


def cell_id(record: dict[str, Any]) -> str:
    """Runs share a cell iff their configs agree on everything but the seed (and run-time knobs)."""
    text = json.dumps(
        [record.get("protocol"), drop_keys(record.get("config", {}), NON_CELL_KEYS)],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _numbers_problem(where: str, table: Any, integer_keys: bool) -> str | None:
    if not isinstance(table, dict):
        return f"{where} is {table!r}, expected a mapping"
    for key, value in table.items():
        if integer_keys and not str(key).isdigit():
            return f"{where} has the key {key!r}, expected whole numbers (k)"
        if not _is_finite(value):
            return f"{where}.{key} is {value!r}, expected a finite number"
    return None


def record_problem(record: dict[str, Any]) -> str | None:
    """What makes a record unusable by the report (a missing or mistyped field), or None.

    Only the fields the report reads are checked: every metric it tabulates (``*_top1``,
    ``*_top5``, the k-NN curve, the neighbour agreement), the correctness bits behind the n = 1
    bootstrap, the loss history, the seed and the config it groups cells by.
    """
    status = record.get("status")
    if not isinstance(status, str):
        return f"status is {status!r}, expected a string such as 'finished' or 'failed'"
    if status != "finished":
        return None
    seed = record.get("seed")
    if not _is_whole(seed):
        return f"seed is {seed!r}, expected a whole number"
    if not isinstance(record.get("config"), dict):
        return f"config is {record.get('config')!r}, expected a mapping"
    metrics = record.get("metrics")
    if not isinstance(metrics, dict):
        return f"metrics is {metrics!r}, expected a mapping"
    for key, value in metrics.items():
        if (key.endswith(("_top1", "_top5")) or key in ("n_test", "n_train")) and not _is_finite(
            value
        ):
            return f"metrics.{key} is {value!r}, expected a finite number"
    for key, integer_keys in (("knn_curve", True), ("neighbour_agreement", True)):
        if key in metrics:
            problem = _numbers_problem(f"metrics.{key}", metrics[key], integer_keys)
            if problem:
                return problem
    correct = record.get("correct", {})
    if not isinstance(correct, dict):
        return f"correct is {correct!r}, expected a mapping of packed bits"
    for key, packed in correct.items():
        n_test = metrics.get("n_test")
        if not _is_whole(n_test) or n_test < 0:
            return f"metrics.n_test is {n_test!r}; correct.{key} needs the number of test images"
        try:
            n_bits = 8 * len(bytes.fromhex(packed))
        except (TypeError, ValueError):
            return f"correct.{key} is not a hex string of packed bits"
        if n_bits < n_test:
            return f"correct.{key} holds {n_bits} bits for {n_test} test images"
    history = record.get("history", [])
    if not isinstance(history, list):
        return f"history is {history!r}, expected a list of epochs"
    for i, epoch in enumerate(history):
        if not (isinstance(epoch, dict) and _is_number(epoch.get("epoch"))
                and _is_number(epoch.get("loss"))):
            return f"history[{i}] is {epoch!r}, expected {{epoch, loss, ...}} numbers"
        diagnostics = epoch.get("diagnostics", {})
        if not (isinstance(diagnostics, dict)
                and all(v is None or _is_number(v) for v in diagnostics.values())):
            return (f"history[{i}].diagnostics is {diagnostics!r}, expected a mapping of names to "
                    "numbers (null where not finite)")
    if "reference" in record and not isinstance(record["reference"], bool):
        return f"reference is {record['reference']!r}, expected true or false"
    for key in ("train_seconds", "images_per_second"):
        if key in record and not _is_number(record[key]):
            return f"{key} is {record[key]!r}, expected a number"
    return None


def _drop_duplicate_runs(result: RecordSet) -> None:
    """Keep one finished record per (cell, seed), the one that finished last, and list the others
    as problems. A run's directory is named by its config, seed included, so two records of one
    run only meet when a run folder was copied; counting both would shrink the interval as if
    they were independent seeds."""
    by_run: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for record in result.records:
        by_run.setdefault((cell_id(record), record["seed"]), []).append(record)
    dropped: set[int] = set()
    for (_, seed), records in by_run.items():
        if len(records) < 2:
            continue
        records = sorted(records, key=lambda r: (str(r.get("finished_at", "")), r["run_dir"]))
        kept = records[-1]
        for record in records[:-1]:
            dropped.add(id(record))
            result.problems.append(Problem(
                record["run_dir"], "duplicate",
                f"the same cell and seed {seed} as {kept['run_dir']}, which finished later; "
                "the report counts that one",
            ))
    result.records = [r for r in result.records if id(r) not in dropped]


def load_records(runs_dir: str | Path) -> RecordSet:
    runs_dir = Path(runs_dir)
    result = RecordSet()
    if not runs_dir.exists():
        return result
    seen_dirs = set()
    for path in sorted(runs_dir.rglob(RECORD_FILE)):
        seen_dirs.add(path.parent)
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict) or "status" not in record:
                raise ValueError("not a run record (no 'status' key)")
            problem = record_problem(record)
            if problem is not None:
                raise ValueError(f"damaged run record: {problem}")
        except (OSError, ValueError) as exc:
            result.problems.append(Problem(str(path.parent), "unreadable", f"{path}: {exc}"))
            continue
        record["run_dir"] = str(path.parent)
        if record["status"] != "finished":
            result.problems.append(
                _problem(path.parent, record["status"], str(record.get("error", "")), record)
            )
            continue
        result.records.append(record)
    _drop_duplicate_runs(result)
    for path in sorted(runs_dir.rglob(CHECKPOINT_FILE)):
        if path.parent not in seen_dirs:
            seen_dirs.add(path.parent)
            result.problems.append(
                _problem(path.parent, "unfinished", "checkpoint but no record yet")
            )
    for path in sorted(runs_dir.rglob(JOB_FILE)):
        if path.parent not in seen_dirs:  # killed before its first checkpoint
            result.problems.append(
                _problem(path.parent, "unfinished", "started, but no checkpoint or record yet")
            )
    return result


def pack_bits(correct: Any) -> str:
    """Per-image correctness (bool tensor or array) as hex of packed bits: 1 bit per test image."""
    array = correct.detach().cpu().numpy() if hasattr(correct, "detach") else np.asarray(correct)
    return np.packbits(array.astype(bool)).tobytes().hex()


def unpack_bits(packed: str, n: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(packed), dtype=np.uint8))
    return bits[:n].astype(bool)
