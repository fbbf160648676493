"""Reading run records back: the one place that knows the record layout on disk.

A run directory ``<results>/runs/<dataset>/<method>-<preset>/<backbone>/seed<s>-<hash>/`` holds
``record.json`` once the run finished (or failed with an error) and ``checkpoint.pt`` while it is
under way. ``load_records`` returns the readable records and a list of problems: unreadable
records (named, never silently dropped) and runs with a checkpoint but no record (unfinished).
A finished record counts as unreadable too when a field the report reads is missing or of the
wrong type (``record_problem``), so one damaged file cannot stop the whole report.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Config keys that never change what a run computes: left out of the run hash and of cells.
NON_SEMANTIC_KEYS = (
    ("results_dir",),
    ("trainer", "progress"),
    ("trainer", "num_workers"),
    ("trainer", "resume"),
    ("trainer", "skip_finished"),
    # Memory layout and compilation change float rounding only, and `auto` resolves per machine:
    # a run resumed on another machine must still find its checkpoint.
    ("trainer", "channels_last"),
    ("trainer", "compile"),
    ("eval", "batch_size"),
    ("eval", "chunk_size"),
    ("dataset", "root"),
    ("dataset", "download"),
)
# A cell's runs differ only in their seed (protocol.md §5).
NON_CELL_KEYS = (("seed",), *NON_SEMANTIC_KEYS)


@dataclass
class Problem:
    run_dir: str
    status: str  # "unreadable", "unfinished" or "failed"
    detail: str
    job_id: str | None = None  # the scheduler job that ran it last (SLURM/submitit), if any
    log_tail: str | None = None  # the end of that job's submitit log, when the file is readable


LOG_TAIL_LINES = 20


def job_of(run_dir: Path, record: dict[str, Any] | None = None) -> tuple[str | None, str | None]:
    """(job id, tail of its stderr log) from the record's ``job`` or the run's ``job.json``."""
    job = (record or {}).get("job")
    if not isinstance(job, dict):  # a record without a job (older, or not under a scheduler)
        try:
            job = json.loads((run_dir / "job.json").read_text())
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


def drop_keys(config: dict[str, Any], paths: tuple[tuple[str, ...], ...]) -> dict[str, Any]:
    """A deep copy of ``config`` without the nested keys in ``paths``."""
    out = copy.deepcopy(config)
    for path in paths:
        node = out
        for key in path[:-1]:
            node = node.get(key, {})
        if isinstance(node, dict):
            node.pop(path[-1], None)
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


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _numbers_problem(where: str, table: Any, integer_keys: bool) -> str | None:
    if not isinstance(table, dict):
        return f"{where} is {table!r}, expected a mapping"
    for key, value in table.items():
        if integer_keys and not str(key).isdigit():
            return f"{where} has the key {key!r}, expected whole numbers (k)"
        if not _is_number(value):
            return f"{where}.{key} is {value!r}, expected a number"
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
        if (key.endswith(("_top1", "_top5")) or key in ("n_test", "n_train")) and not _is_number(
            value
        ):
            return f"metrics.{key} is {value!r}, expected a number"
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
    for key in ("train_seconds", "images_per_second"):
        if key in record and not _is_number(record[key]):
            return f"{key} is {record[key]!r}, expected a number"
    return None


def load_records(runs_dir: str | Path) -> RecordSet:
    runs_dir = Path(runs_dir)
    result = RecordSet()
    if not runs_dir.exists():
        return result
    seen_dirs = set()
    for path in sorted(runs_dir.rglob("record.json")):
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
    for path in sorted(runs_dir.rglob("checkpoint.pt")):
        if path.parent not in seen_dirs:
            result.problems.append(
                _problem(path.parent, "unfinished", "checkpoint but no record yet")
            )
    return result


def pack_bits(correct: Any) -> str:
    """Per-image correctness (bool tensor or array) as hex of packed bits: 1 bit per test image."""
    array = correct.detach().cpu().numpy() if hasattr(correct, "detach") else np.asarray(correct)
    return np.packbits(array.astype(bool)).tobytes().hex()


def unpack_bits(packed: str, n: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(packed), dtype=np.uint8))
    return bits[:n].astype(bool)
