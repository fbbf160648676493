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

    import methods  # noqa: F401  (the preset YAMLs extend the methods' registered defaults)

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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests (threads would only add
    synchronisation on the shared cores); restores the count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Bytes that autograd keeps for the backward per row, layer and n^2 (float32) when a sorting back
# end forms the n x n permutation matrix: diffsort 0.2.0's graph (~13 bytes, measured; see
# docs/sorting-networks.md) and the columns back end (one (n, n + 1) state per layer, ~4.5 bytes
# with transients); group_sum keeps O(n) per layer, negligible here.
SORT_BYTES_PER_ROW_LAYER_N2 = {"diffsort": 13.0, "columns": 4.5, "group_sum": 0.0}


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def skip_if_sort_too_big(backend: str, network: str, n: int, bsz: int) -> float:
    """Estimated autograd memory in GiB of sorting ``bsz`` rows of ``n`` with ``backend``; skips
    the test when it exceeds half the free memory or 6 GiB."""
    from methods.sorting import network_layers

    layers = len(network_layers(network, n))
    need = SORT_BYTES_PER_ROW_LAYER_N2[backend] * bsz * layers * n * n
    budget = min(0.5 * _available_bytes(), 6 * 2**30)
    if need > budget:
        pytest.skip(
            f"{backend} {network} n={n} B={bsz} needs ~{need / 2**30:.1f} GiB of saved tensors "
            f"(budget {budget / 2**30:.1f} GiB)"
        )
    return need / 2**30
