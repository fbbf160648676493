"""pytest-benchmark cases for the evaluation at real sizes (``pytest --benchmark-only``).

- the whole linear probe (7 λ on the hold-out + refit) on 60,000 × 96 features, 10 classes
  (Fashion-MNIST's train split at digits' feature width), and on 50,000 × 512 (CIFAR-10 with
  ResNet-18's pooled features); features from ``eval.bench.probe_features``;
- k-NN over a 50,000 bank × 10,000 queries × 512 at the record's two settings, next to the bare
  chunked bank × queries matmul that bounds it from below.

``python -m eval.bench --only eval`` measures the same things in one run, as ratios, for the README;
the two plain tests at the end check its targets and table on fixed numbers.
"""

from __future__ import annotations

import pytest
import torch

from eval.bench import (
    KNN_SETTINGS,
    KNN_SIZE,
    PROBE_SIZES,
    _bare_knn_matmul,
    extraction_backbone,
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


def _eval_results(probe_seconds: float, knn_ratios: tuple[float, float],
                  knn_size: tuple[int, int, int] = KNN_SIZE) -> dict:
    iterations = {"1e-07": 3, "1e-06": 5, "1e-05": 6, "1e-04": 7, "1e-03": 8, "1e-02": 9,
                  "1e-01": 9, "refit": 6}
    probe = [{"n": 60000, "dim": 96, "source": "fixture", "seconds": probe_seconds,
              "sklearn_one_fit": 10.0, "top1": 81.43, "lambda": 1e-5, "converged": True,
              "iterations": iterations, "hessian_products": {}},
             {"n": 50000, "dim": 512, "source": "fixture", "seconds": 100.0,
              "sklearn_one_fit": 50.0, "top1": 84.14, "lambda": 1e-3, "converged": False,
              "iterations": iterations, "hessian_products": {}}]
    bank, queries, dim = knn_size
    knn = [{"bank": bank, "queries": queries, "dim": dim, "k": k, "temperature": t,
            "seconds": 3.0 * ratio, "bare_seconds": 3.0, "ratio": ratio}
           for (k, t), ratio in zip(KNN_SETTINGS, knn_ratios, strict=True)]
    per_10k = {"label": "fixture", "extract": 50.0, "knn": 0.5, "probe": 10.0}
    return {"machine": "test", "eval": {"probe": probe, "knn": knn, "per_10k": per_10k}}


def test_eval_targets_probe_convergence_and_knn_ratio():
    from eval.bench import targets

    checks = {what: (measured, met) for what, measured, met in targets(_eval_results(8.0, (1.1, 1.4)))}
    assert checks["probe 60,000 × 96 ≤ 1.8× one sklearn fit (10× faster than before)"] == ("0.80×", True)
    assert checks["probe 60,000 × 96: converged at every λ"] == ("yes", True)
    assert checks["probe 50,000 × 512: converged at every λ"] == ("no", False)
    assert checks["k-NN k=20 ≤ 1.3× the bare matmul"] == ("1.10×", True)
    assert checks["k-NN k=200 ≤ 1.3× the bare matmul"] == ("1.40×", False)
    assert not any("50,000 × 512 ≤" in what for what in checks)  # no time target at 512
    # --quick sizes carry no k-NN target.
    quick = targets(_eval_results(8.0, (1.1, 1.9), knn_size=(10000, 2000, 512)))
    assert not any(what.startswith("k-NN") for what, _, _ in quick)


def test_eval_render_shows_iterations_ratios_and_per_10k():
    from eval.bench import render

    text = render(_eval_results(8.0, (1.1, 1.25)))
    assert ("| fixture | 60,000 × 96 | 8.0 | 10.0 | 81.43 | 1e-05 | yes | 3, 5, 6, 7, 8, 9, 9, 6 |"
            in text)
    assert "| fixture | 50,000 × 512 | 100.0 | 50.0 | 84.14 | 0.001 | **no** |" in text
    assert "| 20 | 0.07 | 3.30 | 1.10 |" in text and "| 200 | 0.1 | 3.75 | 1.25 |" in text
    assert "| 50.0 | 0.5 | 10.0 | 60.5 |" in text


def test_extraction_is_timed_in_the_engines_memory_layout(monkeypatch):
    """The per-10,000-images figure times the backbone as a run's evaluation holds it: the
    engine's ``trainer.channels_last=auto`` decides the layout."""
    import engine.train

    def conv_weights_channels_last(backbone: torch.nn.Module) -> set[bool]:
        # a 1 × 1 kernel is contiguous in both layouts: the 3 × 3 ones decide
        return {m.weight.is_contiguous(memory_format=torch.channels_last)
                for m in backbone.modules()
                if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)}

    backbone = extraction_backbone(32)
    assert not backbone.training and conv_weights_channels_last(backbone) == {True}
    monkeypatch.setattr(engine.train, "resolve_channels_last", lambda setting, backbone: False)
    assert conv_weights_channels_last(extraction_backbone(32)) == {False}
