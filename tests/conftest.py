"""Shared test settings.

Benchmarks (tests using pytest-benchmark's ``benchmark`` fixture) take minutes; plain ``pytest``
skips them and ``pytest --benchmark-only`` runs only them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Two cores: one intra-op thread per core, and nothing left over for oversubscription.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("benchmark_only", default=False):
        return
    skip = pytest.mark.skip(reason="benchmark: run with `pytest --benchmark-only`")
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)


def compose_config(overrides: list[str]):
    """The run config that ``python -m eval.train <overrides>`` composes (not yet resolved)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose("config", overrides=overrides)


def run_cli(args: list[str], cwd: Path | None = None, timeout: float = 600, env: dict | None = None):
    """Run ``python -m <args>`` from the repository root and return the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd or REPO, capture_output=True, text=True,
        timeout=timeout, env=full_env,
    )
