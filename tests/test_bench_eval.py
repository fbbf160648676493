"""pytest-benchmark cases for the evaluation at real sizes (``pytest --benchmark-only``).

- the whole linear probe (7 λ on the hold-out + refit) on 60,000 × 96 features, 10 classes
  (Fashion-MNIST's train split at digits' feature width), and on 50,000 × 512 (CIFAR-10 with
  ResNet-18's pooled features); features from ``eval.bench.probe_features``;
- k-NN over a 50,000 bank × 10,000 queries × 512 at the record's two settings, next to the bare
  chunked bank × queries matmul that bounds it from below.

``python -m eval.bench --only eval`` measures the same things in one run, as ratios, for the README.
"""

from __future__ import annotations

import pytest
import torch

from eval.bench import (
    KNN_SETTINGS,
    KNN_SIZE,
    PROBE_SIZES,
    _bare_knn_matmul,
    probe_features,
)
from eval.knn import knn_evaluate
from eval.linear import linear_probe

CHUNK = 1024


@pytest.mark.parametrize("n_train,dim", PROBE_SIZES)
def test_bench_linear_probe(benchmark, n_train: int, dim: int):
    benchmark.group = "linear probe, 7 λ + refit"
    x_train, y_train, x_test, y_test, source = probe_features(n_train, dim)
    benchmark.extra_info["features"] = source
    result = benchmark.pedantic(
        lambda: linear_probe(x_train, y_train, x_test, y_test), rounds=1, iterations=1
    )
    benchmark.extra_info["iterations"] = result.iterations
    assert result.converged and all(result.holdout_converged.values())


def _knn_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n_bank, n_query, dim = KNN_SIZE
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(n_bank, dim, generator=generator)
    queries = torch.randn(n_query, dim, generator=generator)
    y_bank = torch.randint(0, 100, (n_bank,), generator=generator)
    y_query = torch.randint(0, 100, (n_query,), generator=generator)
    return bank, y_bank, queries, y_query


def test_bench_knn_bare_matmul(benchmark):
    benchmark.group = "k-NN 50,000 bank × 10,000 queries × 512"
    bank, _, queries, _ = _knn_inputs()
    benchmark.pedantic(lambda: _bare_knn_matmul(bank, queries, CHUNK), rounds=3, iterations=1,
                       warmup_rounds=1)


@pytest.mark.parametrize("k,temperature", KNN_SETTINGS)
def test_bench_knn(benchmark, k: int, temperature: float):
    benchmark.group = "k-NN 50,000 bank × 10,000 queries × 512"
    bank, y_bank, queries, y_query = _knn_inputs()
    benchmark.pedantic(
        lambda: knn_evaluate(bank, y_bank, queries, y_query, k=k, temperature=temperature,
                             chunk_size=CHUNK),
        rounds=3, iterations=1, warmup_rounds=1,
    )
