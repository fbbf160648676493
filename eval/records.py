"""Reading run records back: the one place that knows the record layout on disk.

A run directory ``<results>/runs/<dataset>/<method>-<preset>/<backbone>/seed<s>-<hash>/`` holds
``record.json`` once the run finished (or failed with an error) and ``checkpoint.pt`` while it is
under way. ``load_records`` returns the readable records and a list of problems: unreadable
records (named, never silently dropped) and runs with a checkpoint but no record (unfinished).
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
        except (OSError, ValueError) as exc:
            result.problems.append(Problem(str(path.parent), "unreadable", f"{path}: {exc}"))
            continue
        record["run_dir"] = str(path.parent)
        if record["status"] != "finished":
            result.problems.append(
                Problem(str(path.parent), record["status"], str(record.get("error", "")))
            )
            continue
        result.records.append(record)
    for path in sorted(runs_dir.rglob("checkpoint.pt")):
        if path.parent not in seen_dirs:
            result.problems.append(
                Problem(str(path.parent), "unfinished", "checkpoint but no record yet")
            )
    return result


def pack_bits(correct: Any) -> str:
    """Per-image correctness (bool tensor or array) as hex of packed bits: 1 bit per test image."""
    array = correct.detach().cpu().numpy() if hasattr(correct, "detach") else np.asarray(correct)
    return np.packbits(array.astype(bool)).tobytes().hex()


def unpack_bits(packed: str, n: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(packed), dtype=np.uint8))
    return bits[:n].astype(bool)
