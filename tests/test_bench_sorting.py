"""pytest-benchmark cases for methods.sorting: forward + backward per back end.

Two groups: the sorting networks alone (``soft_sort`` for columns / diffsort, ``rank_mass`` for
group_sum, which never forms P) at n in {11, 32, 64}, and GroCo's hot path ``rank_mass`` at
B = 1024 for n in {11, 51, 128, 256}. P-forming back ends are skipped when autograd's saved
tensors would not fit in memory.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from methods.sorting import network_layers, rank_mass, soft_sort

NETWORK_B = 256
RANK_MASS_B = 1024
# Bytes kept for the backward per row, layer and n^2 (float32): diffsort 0.2.0's autograd graph
# (sorting-networks.md section 7, ~13 bytes) and the columns back end (one (n, n + 1) state per
# layer, ~4.5 bytes with transients); group_sum keeps O(n) per layer, negligible here.
BYTES_PER_ROW_LAYER_N2 = {"diffsort": 13.0, "columns": 4.5, "group_sum": 0.0}


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def _skip_if_too_big(backend: str, network: str, n: int, bsz: int) -> float:
    """Estimated autograd memory in GiB; skips when it exceeds half the free memory or 6 GiB."""
    layers = len(network_layers(network, n))
    need = BYTES_PER_ROW_LAYER_N2[backend] * bsz * layers * n * n
    budget = min(0.5 * _available_bytes(), 6 * 2**30)
    if need > budget:
        pytest.skip(
            f"{backend} {network} n={n} B={bsz} needs ~{need / 2**30:.1f} GiB of saved tensors "
            f"(budget {budget / 2**30:.1f} GiB)"
        )
    return need / 2**30


def _step(backend: str, network: str, n: int, bsz: int, form_p: bool) -> Callable[[], None]:
    """One forward + backward: of a weighted sum of (sorted_x, P) when ``form_p``, else of a
    weighted rank mass on the top rank (GroCo with one positive)."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(bsz, n, generator=gen).mul_(0.3).requires_grad_(True)
    if not form_p:
        mask = torch.arange(n) >= n - 1
        weights = torch.randn(bsz, n, generator=gen)

        def run() -> None:
            q = rank_mass(x, mask, network, "cauchy", 1.0, backend=backend)
            (q * weights).sum().backward()
            x.grad = None

        return run
    weights = torch.randn(n, n, generator=gen)

    def run() -> None:
        sorted_x, p = soft_sort(x, network, "cauchy", 1.0, backend=backend)
        (sorted_x.sum() + (p * weights).sum()).backward()
        x.grad = None

    return run


def _rounds(gib: float) -> int:
    # Large autograd graphs take seconds per step on a 2-core CPU; keep those runs short.
    return 5 if gib < 0.1 else 2


@pytest.mark.parametrize("backend", ["group_sum", "columns", "diffsort"])
@pytest.mark.parametrize("network", ["odd_even", "bitonic"])
@pytest.mark.parametrize("n", [11, 32, 64])
def test_bench_network(benchmark, backend: str, network: str, n: int):
    gib = _skip_if_too_big(backend, network, n, NETWORK_B)
    benchmark.group = f"sorting network {network} n={n} B={NETWORK_B} fwd+bwd"
    benchmark.extra_info["saved_gib_estimate"] = round(gib, 3)
    run = _step(backend, network, n, NETWORK_B, form_p=backend != "group_sum")
    run()  # builds and caches the plan / DiffSortNet outside the timing
    benchmark.pedantic(run, rounds=_rounds(gib), iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("backend", ["group_sum", "columns", "diffsort"])
@pytest.mark.parametrize("n", [11, 51, 128, 256])
def test_bench_rank_mass(benchmark, backend: str, n: int):
    network = "odd_even"  # GroCo's sorter
    gib = _skip_if_too_big(backend, network, n, RANK_MASS_B)
    benchmark.group = f"rank_mass {network} n={n} B={RANK_MASS_B} fwd+bwd"
    benchmark.extra_info["saved_gib_estimate"] = round(gib, 3)
    run = _step(backend, network, n, RANK_MASS_B, form_p=False)
    run()
    benchmark.pedantic(run, rounds=_rounds(gib), iterations=1, warmup_rounds=0)
