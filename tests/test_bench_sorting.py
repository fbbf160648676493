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

from methods.sorting import rank_mass, soft_sort
from tests.conftest import skip_if_sort_too_big

NETWORK_B = 256
RANK_MASS_B = 1024


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
    gib = skip_if_sort_too_big(backend, network, n, NETWORK_B)
    benchmark.group = f"sorting network {network} n={n} B={NETWORK_B} fwd+bwd"
    benchmark.extra_info["saved_gib_estimate"] = round(gib, 3)
    run = _step(backend, network, n, NETWORK_B, form_p=backend != "group_sum")
    run()  # builds and caches the plan / DiffSortNet outside the timing
    benchmark.pedantic(run, rounds=_rounds(gib), iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("backend", ["group_sum", "columns", "diffsort"])
@pytest.mark.parametrize("n", [11, 51, 128, 256])
def test_bench_rank_mass(benchmark, backend: str, n: int):
    network = "odd_even"  # GroCo's sorter
    gib = skip_if_sort_too_big(backend, network, n, RANK_MASS_B)
    benchmark.group = f"rank_mass {network} n={n} B={RANK_MASS_B} fwd+bwd"
    benchmark.extra_info["saved_gib_estimate"] = round(gib, 3)
    run = _step(backend, network, n, RANK_MASS_B, form_p=False)
    run()
    benchmark.pedantic(run, rounds=_rounds(gib), iterations=1, warmup_rounds=0)
