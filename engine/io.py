"""Atomic file writes, config hashing and provenance (git commit, package versions).

Every record, checkpoint and report output is written to a temporary file in the destination's
directory, fsynced, then renamed over the destination: a reader sees the old file or the new one,
never half of either, and a writer killed mid-write leaves the previous file intact.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

PROVENANCE_PACKAGES = (
    "torch",
    "torchvision",
    "timm",
    "diffsort",
    "numpy",
    "scipy",
    "scikit-learn",
    "pandas",
    "hydra-core",
    "submitit",
)


class ResultsDirError(OSError):
    """The results directory cannot be created or written."""


RESULTS_DIR_HINT = "Choose a writable results_dir (e.g. results_dir=/tmp/groupbench-results)."


def check_writable_dir(path: str | os.PathLike, *, hint: str = RESULTS_DIR_HINT) -> None:
    """Raise ResultsDirError unless ``path`` is, or could be created as, a writable directory.

    Nothing is left behind: the nearest existing ancestor must be a directory this process may
    write into (a regular file in the way, a read-only mount or missing permissions all fail here,
    not when the first checkpoint is written after an epoch of training), and a probe directory is
    made in it and removed again. The probe catches what permission bits do not show: root may
    write anywhere by them, yet not into ``/proc`` or a full disk.
    """
    path = Path(path).expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ResultsDirError(
            f"cannot write {path}: {existing} is a file, not a directory. {hint}"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ResultsDirError(f"cannot write {path}: {existing} is not writable. {hint}")
    try:
        probe = tempfile.mkdtemp(dir=existing, prefix=".groupbench-write-check-")
    except OSError as exc:
        raise ResultsDirError(
            f"cannot write {path}: nothing can be created in {existing} "
            f"({exc.strerror or exc}). {hint}"
        ) from exc
    os.rmdir(probe)


def _umask() -> int:
    # Python has no getter: setting a umask returns the old one, which is then put back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _file_mode(path: Path) -> int:
    """The mode the written file should end with: the replaced file's, else what open() gives.

    mkstemp creates its file 0600; renamed as it is, every record, checkpoint and plot would be
    unreadable to the other users of a shared results directory.
    """
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def atomic_write_bytes(
    path: str | os.PathLike, data: bytes, *, hint: str = RESULTS_DIR_HINT
) -> None:
    """Write ``data`` to ``path`` via temp file + fsync + rename (and fsync of the directory).

    The file keeps the mode of the file it replaces (a new one gets 0666 minus the umask).
    ``hint`` ends the ResultsDirError raised when the directory cannot be written: what to change.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise ResultsDirError(f"cannot write {path}: {exc.strerror or exc}. {hint}") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), _file_mode(path))
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_write_text(
    path: str | os.PathLike, text: str, *, hint: str = RESULTS_DIR_HINT
) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), hint=hint)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def torch_archive_problem(path: str | os.PathLike) -> str | None:
    """Why the file at ``path`` is not an intact ``torch.save`` zip archive, or None if it is.

    torch.load does not check the archive's CRC-32s: a flipped byte inside a tensor loads as a
    silently different weight. Every member is checked here first; a truncated file fails to
    open (its central directory is at the end).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile as exc:
        return f"not a complete torch archive ({exc}; truncated or not written by torch.save)"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if bad is not None:
        return f"corrupt (archive member {bad} fails its CRC-32 check)"
    return None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def config_hash(config: dict[str, Any], length: int = 12) -> str:
    """Stable hash of a resolved config (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, default=_json_default, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """The checkout's HEAD commit with a ``-dirty`` suffix for local changes; None outside git."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = "-dirty" if status.returncode == 0 and status.stdout.strip() else ""
    return commit.stdout.strip() + dirty


def cpu_model(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """The CPU's model name and the instruction set torch's CPU kernels use on it, e.g.
    ``AMD EPYC (AVX2)``: with one torch build, two CPUs that differ in either can round float
    sums differently, so their runs differ in the last bits (and in accuracies by a few test
    images). The model name comes from ``cpuinfo`` (Linux), else from ``platform``."""
    import platform

    name = ""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "unknown CPU"
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{name} ({capability})" if capability else name


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PROVENANCE_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
