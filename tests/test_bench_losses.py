"""pytest-benchmark cases for the losses and the training steps (``pytest --benchmark-only``).

- loss forward + backward at B = 1024, D = 2048: NT-Xent, and GroCo at group size n = 1 + k for
  n in {11, 51, 128, 256} with each sorting back end (P-forming back ends only where their
  autograd graph fits in memory, see tests/conftest.py);
- GroCo's sorter at n = 512 on B = 256 rows for odd_even and bitonic (the largest group size
  the README claims);
- one training step (forward, backward, optimiser step and per-step state) of every training
  method's default preset at two scales: digits' backbone and batch, and ResNet-18 with the
  low-resolution stem at 32 px and batch 256 (``eval.bench.method_step``).

Ratios between them (GroCo / NT-Xent, group_sum / diffsort, method / SimCLR) are what the README's
performance section states; ``python -m eval.bench --write-readme`` measures them in one run.
"""

from __future__ import annotations

import pytest
import torch

from methods import list_methods
from methods.groco import groco_loss
from methods.simclr import nt_xent_loss
from methods.sorting import rank_mass
from tests.conftest import skip_if_sort_too_big

BATCH, DIM = 1024, 2048


def _views(batch: int, dim: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dim, generator=generator).requires_grad_() for _ in range(2)]


def _fwd_bwd(loss_fn, views):
    def run() -> None:
        for v in views:
            v.grad = None
        loss_fn(views).backward()

    return run


def test_bench_nt_xent(benchmark):
    benchmark.group = f"loss fwd+bwd B={BATCH} D={DIM}"
    run = _fwd_bwd(lambda v: nt_xent_loss(v, 0.2), _views(BATCH, DIM))
    run()
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("backend", ["group_sum", "columns", "diffsort"])
@pytest.mark.parametrize("n", [11, 51, 128, 256])
def test_bench_groco(benchmark, backend: str, n: int):
    # Two global views: both anchors' groups (2B rows) are sorted in one call.
    gib = skip_if_sort_too_big(backend, "odd_even", n, 2 * BATCH)
    benchmark.group = f"loss fwd+bwd B={BATCH} D={DIM}"
    benchmark.extra_info["group_size"] = n
    run = _fwd_bwd(lambda v: groco_loss(v, topk_neg=n - 1, backend=backend), _views(BATCH, DIM))
    run()
    benchmark.pedantic(run, rounds=5 if gib < 0.1 else 2, iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("network", ["odd_even", "bitonic"])
def test_bench_sorter_n512(benchmark, network: str):
    """GroCo's sorter at group size 512 on B = 256 rows (one positive rank)."""
    benchmark.group = "GroCo sorter n=512 B=256 group_sum fwd+bwd"
    x = torch.randn(256, 512, generator=torch.Generator().manual_seed(0)).mul_(0.3).requires_grad_()
    ranks = torch.arange(512) >= 511

    def run() -> None:
        x.grad = None
        rank_mass(x, ranks, network=network).sum().backward()

    run()
    benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("name", list_methods(trains=True))
def test_bench_train_step(benchmark, name: str):
    from eval.bench import method_step

    benchmark.group = "training step, digits default preset, B=256"
    run = method_step(name)
    run()
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("name", list_methods(trains=True))
def test_bench_train_step_resnet18(benchmark, name: str):
    """ResNet-18 (low-resolution stem), 32 px, B = 256: seconds per step on two cores."""
    from eval.bench import method_step

    benchmark.group = "training step, ResNet-18 32 px default preset (CIFAR-10 settings), B=256"
    run = method_step(name, "resnet18")
    run()
    benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=0)
