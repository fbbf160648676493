"""The training-step section of ``python -m eval.bench``: FLOP counting, the step it times, the
rows, targets and README table it produces (fast checks; the timings themselves are benchmarks)."""

from __future__ import annotations

import os

import pytest
import torch

from eval import bench


def test_step_flops_counts_forward_and_backward_matmuls():
    # Linear 8 → 4 on 5 rows: forward 2·5·8·4 FLOP, backward twice that (input and weight grads).
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(5, 8, requires_grad=True)

    def step() -> None:
        layer(x).sum().backward()

    assert bench.step_flops(step) == 3 * 2 * 5 * 8 * 4


def test_sgemm_rate_is_flops_over_the_fastest_product(monkeypatch):
    monkeypatch.setattr(bench, "fastest_of_rounds", lambda fns, rounds, warmup=1: {"mm": 0.5})
    assert bench.sgemm_gflops(size=100) == 2 * 100**3 / 0.5 / 1e9


def test_step_time_is_the_fastest_round_against_the_higher_of_two_sgemm_rates(monkeypatch):
    import methods

    now, faulted = [0.0], [0]
    durations = {"simclr": iter([0.0, 0.3, 0.1, 0.2]), "nnclr": iter([0.0, 0.6, 0.5, 0.4])}
    faults = {"simclr": iter([900, 5, 1, 3]), "nnclr": iter([900, 40, 70, 50])}

    def make(name):
        def step() -> None:
            now[0] += next(durations[name])
            faulted[0] += next(faults[name])
        return step

    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(bench, "minor_page_faults", lambda: faulted[0])
    monkeypatch.setattr(methods, "list_methods", lambda trains: ["simclr", "nnclr"])
    monkeypatch.setattr(bench, "method_step", lambda name, scale: make(name))
    monkeypatch.setattr(bench, "step_flops", lambda step: step() or 10**9)  # the warm-up step
    rates = iter([100.0, 150.0])
    monkeypatch.setattr(bench, "sgemm_gflops", lambda: next(rates))
    monkeypatch.setitem(bench.STEP_SCALES["digits"], "repeats", (3, 1))
    rows = {r["method"]: r for r in bench.bench_train_steps(quick=False)}
    assert rows["simclr"]["seconds"] == pytest.approx(0.1)
    assert rows["nnclr"]["seconds"] == pytest.approx(0.4)
    assert rows["nnclr"]["ratio"] == pytest.approx(4.0)
    assert rows["nnclr"]["gflops"] == pytest.approx(1.0 / 0.4)
    assert rows["nnclr"]["sgemm_gflops"] == 150.0
    assert rows["simclr"]["sgemm_fraction"] == pytest.approx(10.0 / 150.0)
    # the median over the timed steps (the warm-up's 900 are not counted)
    assert rows["simclr"]["page_faults"] == 3 and rows["nnclr"]["page_faults"] == 50


def test_method_step_runs_the_optimiser_and_resolves_each_scale():
    method, step = bench.build_method_step("simclr")
    before = [p.detach().clone() for p in method.parameters()]
    step()
    assert any(not torch.equal(b, p) for b, p in zip(before, method.parameters(), strict=True))
    # channels-last as the engine's ``auto`` puts it for a convolutional backbone
    conv = next(m for m in method.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    # the ResNet-18 scale: the method's CIFAR-10 settings on a 3-channel low-resolution ResNet-18
    method, _ = bench.build_method_step("nnclr", "resnet18")
    assert method.queue.size == 65536 and method.feature_dim == 512
    assert method.backbone.conv1.in_channels == 3 and method.backbone.conv1.stride == (1, 1)


def _rows(scale: str, seconds: dict[str, float]) -> list[dict]:
    return [
        {"method": name, "scale": scale, "seconds": s, "ratio": s / seconds["simclr"],
         "gflop": 10.0, "gflops": 10.0 / s, "sgemm_gflops": 100.0, "sgemm_fraction": 0.1 / s,
         "repeats": 2, "load": (0.5, 1.5), "page_faults": 1234.0}
        for name, s in seconds.items()
    ]


def test_targets_digits_all4one_and_resnet18_per_method():
    from methods import get_method_class

    results = {
        "steps": _rows("digits", {"simclr": 0.2, "all4one": 0.5, "nnclr": 0.4}),
        "steps_resnet18": _rows("resnet18", {"simclr": 10.0, "all4one": 14.0, "nnclr": 13.0}),
    }
    checks = {what: (measured, met) for what, measured, met in bench.targets(results)}
    assert checks["all4one training step ≤ 2.0× SimCLR (digits)"] == ("2.50×", False)
    assert not any("nnclr" in what and "digits" in what for what in checks)
    a4 = get_method_class("all4one").step_time_vs_simclr
    nn = get_method_class("nnclr").step_time_vs_simclr
    assert checks[f"all4one training step ≤ {a4}× SimCLR (ResNet-18, 32 px)"] == ("1.40×", 1.4 <= a4)
    assert checks[f"nnclr training step ≤ {nn}× SimCLR (ResNet-18, 32 px)"] == ("1.30×", 1.3 <= nn)


def test_render_shows_time_ratio_flops_and_fraction_of_sgemm():
    results = {"machine": "test", "steps_resnet18": _rows("resnet18", {"simclr": 10.0, "cld": 12.0})}
    text = bench.render(results)
    assert "ResNet-18, low-resolution stem, 32 px" in text and "(100 GFLOP/s)" in text
    assert "load average 0.5 before, 1.5 after" in text
    assert "| cld | 12000 | 1.20 | 10.0 | 1 | 1% | 1,234 |" in text
    assert "| simclr | 10000 | 1.00 | 10.0 | 1 | 1% | 1,234 |" in text


def test_knn_times_are_the_fastest_of_interleaved_rounds(monkeypatch):
    import eval.knn

    now = [0.0]
    # the warm-up call of each, then 2 rounds: bare, k = 20, k = 200 in turn
    durations = iter([9.0, 9.0, 9.0, 2.0, 5.0, 2.5, 1.0, 1.2, 3.0])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])

    def tick(*args, **kwargs) -> None:
        now[0] += next(durations)

    monkeypatch.setattr(bench, "_bare_knn_matmul", tick)
    monkeypatch.setattr(eval.knn, "knn_evaluate", tick)
    monkeypatch.setattr(bench, "KNN_ROUNDS", 2)
    monkeypatch.setattr(bench, "KNN_SIZE", (64, 16, 8))
    rows = {r["k"]: r for r in bench.bench_knn(quick=False)}
    assert rows[20]["bare_seconds"] == 1.0 and rows[20]["rounds"] == 2
    assert rows[20]["seconds"] == pytest.approx(1.2) and rows[20]["ratio"] == pytest.approx(1.2)
    assert rows[200]["seconds"] == pytest.approx(2.5) and rows[200]["ratio"] == pytest.approx(2.5)


def test_fastest_of_rounds_warms_up_then_interleaves(monkeypatch):
    now, calls = [0.0], []
    durations = {"a": iter([9.0, 3.0, 1.0]), "b": iter([9.0, 2.0, 4.0])}

    def make(key):
        def fn() -> None:
            calls.append(key)
            now[0] += next(durations[key])
        return fn

    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])
    best = bench.fastest_of_rounds({"a": make("a"), "b": make("b")}, rounds=2)
    assert calls == ["a", "b", "a", "b", "a", "b"]  # warm-ups, then round after round
    assert best == {"a": 1.0, "b": 2.0}


def test_loss_times_are_the_fastest_of_interleaved_rounds(monkeypatch):
    import methods.groco
    import methods.simclr

    now, calls = [0.0], []
    # quick: NT-Xent, then GroCo (11 and 51) x (group_sum, columns, diffsort), in that order;
    # per call: the warm-up, then 2 rounds.
    durations = {
        "nt_xent": iter([9.0, 2.0, 1.0]),
        (11, "group_sum"): iter([9.0, 0.5, 0.2]), (11, "columns"): iter([9.0, 0.3, 0.4]),
        (11, "diffsort"): iter([9.0, 0.6, 0.6]), (51, "group_sum"): iter([9.0, 0.4, 0.3]),
        (51, "columns"): iter([9.0, 3.0, 2.0]), (51, "diffsort"): iter([9.0, 8.0, 6.0]),
    }

    def spend(key) -> torch.Tensor:
        calls.append(key)
        now[0] += next(durations[key])
        return torch.zeros((), requires_grad=True)

    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(methods.simclr, "nt_xent_loss", lambda views, t: spend("nt_xent"))
    monkeypatch.setattr(methods.groco, "groco_loss",
                        lambda views, topk_neg, backend: spend((topk_neg + 1, backend)))
    rows = bench.bench_losses(quick=True)
    assert calls[:7] == ["nt_xent", *list(durations)[1:]]  # warm-ups first, in table order
    assert calls[7:14] == calls[14:] == calls[:7]  # then the same order in every round
    by_key = {(r["n"], r["backend"]): r for r in rows}
    assert by_key[("–", "–")]["seconds"] == 1.0 and by_key[("–", "–")]["rounds"] == 2
    assert by_key[(11, "group_sum")]["ratio"] == pytest.approx(0.2)
    assert by_key[(51, "diffsort")]["seconds"] == pytest.approx(6.0)
    assert by_key[(51, "group_sum")]["ratio"] == pytest.approx(0.3)
    assert "fastest of 2 interleaved rounds" in bench.render({"machine": "m", "losses": rows})


def test_the_measuring_machine_is_named_by_cpu_model(monkeypatch):
    import engine.io

    monkeypatch.setattr(engine.io, "cpu_model", lambda: "Some CPU 9000 (AVX512)")
    text = bench.machine_description()
    assert text.startswith("Some CPU 9000 (AVX512), ")
    assert f"{os.cpu_count()} cores" in text and torch.__version__ in text
