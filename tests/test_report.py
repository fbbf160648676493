"""The report over synthetic records with known numbers: tables, statistics, formats, problems."""

from __future__ import annotations

import copy
import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import eval.report as report_module
from eval.records import pack_bits
from eval.report import StaticPresets, build_report, main, render
from eval.stats import (
    benjamini_hochberg,
    binomial_se,
    bootstrap_ci,
    holm,
    paired_comparison,
    paired_t_mde,
    seeds_needed,
    t_interval,
)
from tests.tiny import make_record

PROVENANCE = {"git_commit": "4a2d4db3c1aa55e0b6c1d2e3f4a5b6c7d8e9f0a1", "threads": 2,
              "packages": {"torch": "2.14.1"}, "device": "cpu", "device_name": "x86_64"}
GROCO_DEFAULTS = {"method.topk_neg": 10, "method.sorter.network": "odd_even",
                  "method.temperature": 0.2}
PRESETS = StaticPresets(
    defaults={"simclr": "solo", "nnclr": "solo", "moco": "mocov2", "groco": "default"},
    configs={("groco", "default"): GROCO_DEFAULTS, ("moco", "mocov2"): {"method.temperature": 0.2},
             ("simclr", "solo"): {"method.temperature": 0.2},
             ("nnclr", "solo"): {"method.temperature": 0.2}},
)


def rec(method, preset, seed, knn20, linear, *, dataset="digits", reference=False, metrics=None,
        **kwargs):
    """make_record plus a dataset, the reference flag, extra metrics and a provenance."""
    record = make_record(method, preset, seed, knn20, linear, **kwargs)
    record["dataset"] = dataset
    record["config"]["dataset"]["name"] = dataset
    record["reference"] = reference
    record["metrics"].update(metrics or {})
    record.update(copy.deepcopy(PROVENANCE))
    return record


def write(runs: Path, record: dict, name: str) -> None:
    path = runs / name
    path.mkdir(parents=True)
    (path / "record.json").write_text(json.dumps(record))


@pytest.fixture
def runs(tmp_path):
    runs = tmp_path / "runs"
    # simclr: seeds 0,1,2 with knn 80, 82, 87 → mean 83, s = √13
    for seed, knn, lin in ((0, 80.0, 85.0), (1, 82.0, 86.0), (2, 87.0, 90.0)):
        write(runs, make_record("simclr", "solo", seed, knn, lin), f"simclr-{seed}")
    # nnclr (base simclr/solo) on seeds 0,1,3: seed 3 unmatched
    for seed, knn, lin in ((0, 85.0, 88.0), (1, 86.0, 88.5), (3, 90.0, 91.0)):
        write(runs, make_record("nnclr", "solo", seed, knn, lin, base="simclr/solo"), f"nnclr-{seed}")
    # a second protocol: never averaged with the first
    write(runs, make_record("simclr", "solo", 0, 50.0, 60.0, protocol="other-v0"), "simclr-other")
    # an ablation over temperature, one seed each
    for t, knn in ((0.1, 70.0), (0.5, 75.0)):
        write(runs, make_record("moco", "mocov2", 0, knn, 80.0, extra_method={"temperature": t}),
              f"moco-{t}")
    # a failed run, an unreadable record, an unfinished run
    failed = make_record("simclr", "solo", 9, 0.0, 0.0)
    failed.update(status="failed", error="non-finite loss nan in method simclr at epoch 3, step 2")
    write(runs, failed, "failed")
    (runs / "broken").mkdir()
    (runs / "broken" / "record.json").write_text("{not json")
    (runs / "unfinished").mkdir()
    (runs / "unfinished" / "checkpoint.pt").write_bytes(b"x")
    return runs


def section(text: str, title: str) -> list[str]:
    lines = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    return lines.splitlines()


def table_rows(lines: list[str]) -> list[dict[str, str]]:
    """The first markdown table in ``lines`` as dicts keyed by its header."""
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append(line)
    header = [c.strip() for c in table[0].strip("|").split("|")]
    return [dict(zip(header, [c.strip() for c in line.strip("|").split("|")], strict=True))
            for line in table[2:]]


def test_main_table_numbers(runs):
    """The checkout's own presets: simclr's default preset (solo) reads `default`."""
    text = "\n".join(section(render(build_report(runs, plots=False), "markdown"), "Main table"))
    half = stats.t.ppf(0.975, 2) * math.sqrt(13) / math.sqrt(3)
    row = next(line for line in text.splitlines()
               if line.startswith("| digits | simclr | default (solo)") and "| 3 |" in line)
    assert f"| 83.00 ± {half:.2f} (s {math.sqrt(13):.2f}) |" in row  # s: ddof = 1
    lin = t_interval([85.0, 86.0, 90.0])
    assert f"| {lin.mean:.2f} ± {lin.half_width:.2f} (s {lin.std:.2f}) |" in row
    assert "| 3 | 0,1,2 |" in row
    # the other protocol is its own row with n = 1 and a bootstrap interval
    other = [line for line in text.splitlines() if "| other-v0 |" in line]
    assert len(other) == 1 and "| groupbench-v1 |" in row
    mean, low, high = bootstrap_ci(np.arange(40) < 20)
    assert f"50.00 [{low:.2f}, {high:.2f}]†" in other[0]
    # top-5 is not shown on a 10-class dataset
    assert "linear top-5" not in text.split("\n\n")[3] and "Linear top-5 is not shown" in text


def test_deltas_use_matched_seeds_only(runs):
    report = build_report(runs, plots=False, presets=PRESETS)
    deltas = report.tables["deltas"]
    knn = deltas[(deltas["method"] == "nnclr") & (deltas["metric"] == "knn20_top1")].iloc[0]
    expected = paired_comparison({0: 85.0, 1: 86.0, 3: 90.0}, {0: 80.0, 1: 82.0, 2: 87.0})
    assert knn["n_matched"] == 2 and knn["per_seed"] == "0: +5.00; 1: +4.00"
    assert knn["mean_diff"] == pytest.approx(4.5)
    assert knn["p_value"] == pytest.approx(stats.ttest_rel([85, 86], [80, 82]).pvalue)
    assert knn["p_value"] == pytest.approx(expected.p_value)
    assert knn["unmatched"] == "method only: 3; base only: 2"
    # power: the MDE of a paired t-test with the observed SD of (5, 4) over 2 seeds
    assert knn["mde"] == pytest.approx(paired_t_mde(float(np.std([5.0, 4.0], ddof=1)), 2))
    assert knn["seeds_needed"] == seeds_needed(4.5, float(np.std([5.0, 4.0], ddof=1)))
    # Holm and BH over the table's two comparisons
    p = deltas["p_value"].to_numpy(dtype=float)
    np.testing.assert_allclose(deltas["p_holm"], holm(p))
    np.testing.assert_allclose(deltas["q_bh"], stats.false_discovery_control(p, method="bh"))
    assert set(deltas["family_size"]) == {2}
    text = render(report, "markdown")
    assert "+4.50 [" in text and "method only: 3; base only: 2" in text
    assert "Family: the 2 comparisons with a p-value in this table" in text


def _paired_grid(runs: Path) -> None:
    """simclr/solo base and two nnclr variants over seeds 0-3."""
    base_knn, base_lin = [80.0, 81.0, 82.0, 80.5], [85.0, 86.0, 87.0, 85.5]
    variants = {
        # a clear, consistent gain on k-NN and a noisy one on linear
        1: ([3.0, 3.1, 2.9, 3.05], [1.0, 2.0, 0.5, 1.4]),
        # a noisy gain on both
        2: ([1.0, 2.5, 0.2, 1.4], [0.5, -0.3, 1.2, 0.1]),
    }
    for seed in range(4):
        write(runs, rec("simclr", "solo", seed, base_knn[seed], base_lin[seed]), f"s-{seed}")
        for q, (dk, dl) in variants.items():
            write(runs, rec("nnclr", "solo", seed, base_knn[seed] + dk[seed],
                            base_lin[seed] + dl[seed], base="simclr/solo",
                            extra_method={"queue": q}), f"n{q}-{seed}")


def test_significance_marks_use_the_holm_adjusted_p(tmp_path):
    runs = tmp_path / "runs"
    _paired_grid(runs)
    report = build_report(runs, plots=False, presets=PRESETS)
    deltas = report.tables["deltas"]
    assert len(deltas) == 4 and set(deltas["family_size"]) == {4}
    raw = deltas["p_value"].to_numpy(dtype=float)
    adjusted = holm(raw)
    np.testing.assert_allclose(deltas["p_holm"], adjusted)
    np.testing.assert_allclose(deltas["q_bh"], benjamini_hochberg(raw))
    # this grid holds a comparison with raw p < 0.05 that Holm does not keep
    assert ((raw < 0.05) & (adjusted >= 0.05)).any() and (adjusted < 0.05).any()
    rows = table_rows(section(render(report, "markdown"), "Gain over each method's base"))
    assert len(rows) == 4
    for row in rows:
        metric = {"k-NN k=20": "knn20_top1", "linear top-1": "linear_top1"}[row["metric"]]
        match = deltas[(deltas["setting"] == (row["setting"] if row["setting"] != "–" else ""))
                       & (deltas["metric"] == metric)].iloc[0]
        assert row["p Holm"].endswith("*") == (match["p_holm"] < 0.05)
        assert not row["p"].endswith("*") and not row["q BH"].endswith("*")
        assert row["MDE"] == f"{match['mde']:.2f}"
    text = render(report, "markdown")
    survivors = int((adjusted < 0.05).sum())
    assert (f"{int((raw < 0.05).sum())} have raw p < 0.05, {survivors} survive Holm's correction"
            in text)


def _groco(runs: Path, topk: int, network: str, seeds=(0, 1, 2), base_knn=90.0) -> None:
    for seed in seeds:
        knn = base_knn + 0.1 * topk + (0.7 if network == "bitonic" else 0.0) + 0.3 * seed
        write(runs, rec("groco", "default", seed, knn, knn + 1, extra_method={
            "topk_neg": topk, "sorter": {"network": network}}), f"groco-{topk}-{network}-{seed}")


def test_ablation_tables_hold_only_cells_equal_in_every_other_key(tmp_path):
    """The committed table's fault: topk_neg = 5, 20, 50 sat in the network ablation."""
    runs = tmp_path / "runs"
    for k in (5, 10, 20, 50):
        _groco(runs, k, "odd_even")
    for network in ("bitonic", "bitonic_merge"):
        _groco(runs, 10, network)
    report = build_report(runs, plots=False, presets=PRESETS)
    network = report.tables["ablation:method.sorter.network"]
    assert network["value"].tolist() == ["bitonic", "bitonic_merge", "odd_even"]
    assert set(network["context"]) == {"method.topk_neg=10"}
    assert network["is_default"].tolist() == [False, False, True]
    topk = report.tables["ablation:method.topk_neg"]
    assert topk["value"].tolist() == [5, 10, 20, 50]
    assert set(topk["context"]) == {"method.sorter.network=odd_even"}
    assert topk["is_default"].tolist() == [False, True, False, False]
    # each value against the default value on matched seeds, one family per table
    versus = report.tables["ablation_vs_default:method.topk_neg"]
    assert sorted(set(versus["value"])) == [5, 20, 50] and set(versus["family_size"]) == {6}
    row = versus[(versus["value"] == 50) & (versus["metric"] == "knn20_top1")].iloc[0]
    assert row["mean_diff"] == pytest.approx(4.0) and row["n_matched"] == 3
    text = render(report, "markdown")
    topk_section = section(text, "Ablation `method.topk_neg`: digits, groco/default")
    assert "at method.sorter.network=odd_even" in topk_section[0]
    values = [r["method.topk_neg"] for r in table_rows(topk_section)]
    assert values == ["5", "**10** (default)", "20", "50"]
    network_rows = table_rows(section(text, "Ablation `method.sorter.network`: digits"))
    assert [r["method.sorter.network"] for r in network_rows] == [
        "bitonic", "bitonic_merge", "**odd_even** (default)"]
    # the main table names the values that differ from the default preset
    main_rows = table_rows(section(text, "Main table"))
    settings = sorted(r["setting"] for r in main_rows)
    assert "–" in settings and "method.topk_neg=50" in settings
    assert "method.sorter.network=bitonic" in settings


def test_two_way_sweep_gives_one_table_per_setting_of_the_other_key(tmp_path):
    runs = tmp_path / "runs"
    for k in (5, 10):
        for network in ("odd_even", "bitonic"):
            _groco(runs, k, network, seeds=(0, 1))
    report = build_report(runs, plots=False, presets=PRESETS)
    topk = report.tables["ablation:method.topk_neg"]
    assert sorted(set(topk["context"])) == ["method.sorter.network=bitonic",
                                            "method.sorter.network=odd_even"]
    for _, group in topk.groupby("context"):
        assert group["value"].tolist() == [5, 10]
    network = report.tables["ablation:method.sorter.network"]
    assert sorted(set(network["context"])) == ["method.topk_neg=10", "method.topk_neg=5"]
    text = render(report, "markdown")
    assert text.count("## Ablation `method.topk_neg`") == 2
    assert text.count("## Ablation `method.sorter.network`") == 2


def test_default_value_comes_from_the_methods_default_preset(tmp_path):
    """With this checkout's configs: GroCo's default preset has k = 10 and odd_even."""
    from engine.config import resolve_run_config
    from tests.conftest import compose_config

    groco = resolve_run_config(compose_config(["method=groco"]))
    runs = tmp_path / "runs"
    for k in (5, 10):
        for seed in (0, 1):
            record = rec("groco", "default", seed, 90.0 + k / 10 + seed, 91.0)
            record["config"] = copy.deepcopy(groco)
            record["config"]["seed"] = seed
            record["config"]["method"]["topk_neg"] = k
            write(runs, record, f"groco-{k}-{seed}")
    report = build_report(runs, plots=False)
    topk = report.tables["ablation:method.topk_neg"]
    assert topk["is_default"].tolist() == [False, True]
    main_table = report.tables["main"]
    assert set(main_table["preset_label"]) == {"default"}
    assert sorted(main_table["setting"]) == ["", "method.topk_neg=5"]


def test_a_long_run_is_labelled_by_the_defaults_of_its_own_length(tmp_path):
    """GroCo's learning rate, warm-up and decay depend on trainer.epochs: a 1000-epoch default
    run is `default`, not a variant of the preset resolved at the dataset's own 30 epochs."""
    from engine.config import resolve_run_config
    from tests.conftest import compose_config

    runs = tmp_path / "runs"
    for epochs, lr in ((1000, 0.1875), (30, 0.75)):
        config = resolve_run_config(compose_config(["method=groco", f"trainer.epochs={epochs}"]))
        assert config["method"]["optimizer"]["lr"] == lr
        for seed in (0, 1):
            record = rec("groco", "default", seed, 90.0 + seed, 91.0, epochs=epochs)
            record["config"] = copy.deepcopy(config)
            record["config"]["seed"] = seed
            write(runs, record, f"groco-{epochs}-{seed}")
    cells = build_report(runs, plots=False).cells
    assert sorted(cells["epochs"]) == [30, 1000]
    assert cells["method_diffs"].tolist() == [[], []]
    assert set(cells["preset_label"]) == {"default"} and set(cells["setting"]) == {""}


def test_intervals_are_clipped_and_marked(tmp_path):
    runs = tmp_path / "runs"
    for seed, knn in enumerate((97.5, 100.0, 100.0)):
        write(runs, rec("simclr", "solo", seed, knn, 99.0), f"s-{seed}")
    report = build_report(runs, plots=False, presets=PRESETS)
    row = report.tables["main"].iloc[0]
    s = t_interval([97.5, 100.0, 100.0])
    assert s.high > 100 and row["knn20_top1_ci_high"] == 100.0 and row["knn20_top1_ci_clipped"]
    assert row["knn20_top1_ci_low"] == pytest.approx(s.low)
    text = render(report, "markdown")
    assert f"{s.mean:.2f} [{s.low:.2f}, 100.00]‡" in text
    assert "‡ the 95% interval left [0, 100] and is clipped to it" in text


def test_top5_only_with_more_than_ten_classes(tmp_path):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        write(runs, rec("simclr", "solo", seed, 60.0 + seed, 62.0, dataset="cifar100",
                        metrics={"linear_top5": 85.0 + seed}), f"c-{seed}")
        write(runs, rec("simclr", "solo", seed, 80.0 + seed, 82.0), f"d-{seed}")
    text = render(build_report(runs, plots=False, presets=PRESETS), "markdown")
    cifar = table_rows(section(text, "Main table: cifar100"))
    digits = table_rows(section(text, "Main table: digits"))
    top5 = t_interval([85.0, 86.0])
    assert cifar[0]["linear top-5"] == f"85.50 ± {top5.half_width:.2f} (s {top5.std:.2f})"
    assert "linear top-5" not in digits[0]


def test_probe_flags_are_marked_and_explained(tmp_path):
    runs = tmp_path / "runs"
    flags = {
        0: {"linear_lambda": 1e-7, "linear_lambda_at_edge": True, "linear_converged": True},
        1: {"linear_lambda": 1e-4, "linear_lambda_at_edge": False, "linear_converged": False,
            "linear_iterations": {"1e-04": 1000, "refit": 1000}},
        2: {"linear_lambda": 1e-4, "linear_lambda_at_edge": False, "linear_converged": True},
    }
    for seed in range(3):
        write(runs, rec("simclr", "solo", seed, 80.0 + seed, 85.0 + seed, metrics=flags[seed]),
              f"s-{seed}")
    report = build_report(runs, plots=False, presets=PRESETS)
    lines = section(render(report, "markdown"), "Main table")
    [row] = table_rows(lines)
    assert row["linear top-1"].endswith(" λ-edge 1/3; not converged 1/3")
    assert "λ" not in row["k-NN k=20"] and "converged" not in row["k-NN k=20"]
    notes = "\n".join(lines)
    assert "seed 0: λ = 1e-07" in notes and "λ at an end of the grid 1e-07…0.1" in notes
    assert "seed 1: iterations 1e-04: 1000, refit: 1000" in notes


def test_column_names_the_k_actually_used(tmp_path):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        write(runs, rec("simclr", "solo", seed, 80.0, 85.0, metrics={
            "knn200_k_used": 150, "knn200_temperature": 0.1, "knn20_temperature": 0.07,
            "n_train": 150}), f"s-{seed}")
    text = render(build_report(runs, plots=False, presets=PRESETS), "markdown")
    header = next(line for line in section(text, "Main table") if line.startswith("| dataset"))
    assert "| k-NN k=20 T=0.07 |" in header and "| k-NN k=200 T=0.1 (k used: 150) |" in header


def _paper_csv(path: Path, rows: list[tuple]) -> Path:
    header = "method,dataset,backbone,epochs,batch_size,metric,protocol,value,source,verified\n"
    path.write_text(header + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def test_paper_join_needs_epochs_variant_and_metric_settings(tmp_path):
    runs = tmp_path / "runs"
    for seed in (0, 1, 2):
        for preset, extra in (("mocov2", None), ("mocov2", {"temperature": 0.5})):
            record = rec("moco", preset, seed, 60.0 + seed, 65.0, dataset="cifar10",
                         extra_method=extra, metrics={"knn20_temperature": 0.07,
                                                      "knn200_temperature": 0.1})
            record["backbone"] = "resnet18"
            record["config"]["backbone"]["name"] = "resnet18"
            write(runs, record, f"moco-{seed}-{bool(extra)}")
    knn = "kNN k=20 T=0.07 cosine on backbone features; final checkpoint"
    csv = _paper_csv(tmp_path / "paper.csv", [
        ("mocov2plus", "cifar10", "resnet18", 1000, 256, "knn_top1", knn, 92.9, "x", "yes"),
        ("moco", "cifar10", "resnet18", 30, 256, "knn_top1",
         "kNN k=20 T=0.1 cosine; final checkpoint", 61.0, "x", "yes"),
        ("moco", "cifar10", "resnet18", 30, 256, "knn_top1", knn, 60.5, "x", "yes"),
        ("moco (MLP head)", "cifar10", "resnet18", 30, 256, "knn_top1", knn, 60.0, "x", "yes"),
        ("moco", "cifar10", "resnet18", 30, 256, "knn_top1",
         "kNN k=20 T=0.07 cosine; max over epochs", 63.0, "x", "yes"),
        ("moco", "cifar10", "resnet18", 30, 256, "knn_top1",
         "kNN k=200 T=0.1 cosine; final checkpoint", 58.0, "x", "yes"),
        ("moco", "cifar10", "resnet18", 30, 256, "linear_top1",
         "linear SGD lr 30 100ep frozen", 70.0, "x", "yes"),
        ("moco", "cifar10", "resnet50", 30, 256, "knn_top1", knn, 60.0, "x", "yes"),
        ("moco", "cifar10", "resnet18", "", "", "knn_top1", knn, 60.0, "x", "yes"),
        ("moco", "imagenet1k", "resnet50", 200, 256, "knn_top1", knn, 60.0, "x", "yes"),
    ])
    report = build_report(runs, plots=False, paper_csv=csv, presets=PRESETS)
    paper = report.tables["paper_vs_reproduced"]
    assert len(paper) == 9  # the imagenet1k row is counted, not listed
    assert report.notes["paper_elsewhere"] == "imagenet1k (1)"
    by_value = {float(r["paper"]): r for _, r in paper.iterrows()}
    assert by_value[92.9]["ours"] == "no comparable run"
    assert "no run of 1000 epochs" in by_value[92.9]["why"]  # 30-epoch cell vs 1000-epoch row
    assert "T = 0.1" in by_value[61.0]["why"] and "0.07" in by_value[61.0]["why"]
    assert "variant (MLP head)" in paper[paper["paper method"] == "moco (MLP head)"].iloc[0]["why"]
    assert "maximum over epochs" in by_value[63.0]["why"]
    assert "not our logistic-regression probe" in by_value[70.0]["why"]
    resnet50 = paper[paper["backbone"] == "resnet50"].iloc[0]
    assert "not run with resnet50" in resnet50["why"]
    no_epochs = paper[paper["paper epochs"].isna()].iloc[0]
    assert "no epoch count" in no_epochs["why"]
    # the positive controls: same dataset, backbone, epochs, default preset, k and T
    assert by_value[60.5]["why"] == "" and by_value[60.5]["difference"] == pytest.approx(61.0 - 60.5)
    assert by_value[58.0]["why"] == "" and "k-NN k=200 T=0.1" in by_value[58.0]["our_protocol"]
    # only the unchanged default preset is joined: the temperature=0.5 cell never is
    matched = paper[paper["cell"].notna()]
    default_cell = report.cells[report.cells["setting"] == ""]["cell"].iloc[0]
    assert set(matched["cell"]) == {default_cell}
    text = render(report, "markdown")
    assert "no comparable run: no run of 1000 epochs" in text
    assert len(json.loads(render(report, "json"))["paper_vs_reproduced"]) == 9
    assert "paper_vs_reproduced" in set(pd.read_csv(io.StringIO(render(report, "csv")))["table"])


def test_paper_aliases_come_from_the_method_classes():
    import methods

    aliases = report_module.paper_aliases()
    for name in methods.list_methods():
        for alias in methods.get_method_class(name).paper_aliases:
            assert aliases[alias.lower()] == name
    assert not hasattr(report_module, "_PAPER_ALIASES")


def test_provenance_in_every_table_header(tmp_path):
    runs = tmp_path / "runs"
    _paired_grid(runs)
    text = render(build_report(runs, plots=False, presets=PRESETS), "markdown")
    line = ("commit 4a2d4db3c1; torch 2.14.1; threads 2; device cpu; device model x86_64.")
    for title in ("Main table", "Gain over each method's base"):
        assert line in "\n".join(section(text, title))
    # one run elsewhere: the tables say their provenance is mixed
    record = json.loads((runs / "s-0" / "record.json").read_text())
    record.update(git_commit="ffffffffffffffffffff-dirty", threads=16, device="cuda:0",
                  device_name="NVIDIA H100 80GB HBM3")
    (runs / "s-0" / "record.json").write_text(json.dumps(record))
    text = render(build_report(runs, plots=False, presets=PRESETS), "markdown")
    main_lines = "\n".join(section(text, "Main table"))
    assert "**Mixed provenance** (commit, threads, device, device model differ" in main_lines
    assert "ffffffffff (uncommitted changes) (1 runs)" in main_lines
    assert "NVIDIA H100 80GB HBM3 (1 runs)" in main_lines


def test_runs_csv_is_written_next_to_the_table(tmp_path, capsys):
    runs = tmp_path / "runs"
    _paired_grid(runs)
    out = tmp_path / "out"
    main(["--runs", str(runs), "--output", str(out / "table.md")])
    frame = pd.read_csv(out / "runs.csv")
    assert len(frame) == 12  # one row per run
    assert {"seed", "method", "preset", "config.method.queue", "metrics.knn20_top1",
            "metrics.linear_top1", "metrics.knn_curve.20", "commit", "torch", "threads", "device",
            "device_model"} <= set(frame.columns)
    assert "config.method.temperature" not in frame.columns  # the same in every run
    row = frame[(frame["method"] == "nnclr") & (frame["seed"] == 2)
                & (frame["config.method.queue"] == 1)].iloc[0]
    assert row["metrics.knn20_top1"] == pytest.approx(82.0 + 2.9)
    assert row["threads"] == 2 and row["torch"] == "2.14.1"
    # --runs-csv chooses another place; none skips it
    main(["--runs", str(runs), "--plots-dir", "none", "--runs-csv", str(tmp_path / "a.csv")])
    assert len(pd.read_csv(tmp_path / "a.csv")) == 12
    capsys.readouterr()


def test_runs_csv_holds_the_last_epochs_loss_and_diagnostics():
    history = [{"epoch": 1, "loss": 3.0, "diagnostics": {"nn_label_acc": 0.4}},
               {"epoch": 2, "loss": 2.5, "diagnostics": {"nn_label_acc": 0.6, "loss_nn": None}}]
    frame = report_module.runs_frame([
        make_record("nnclr", "solo", 0, 80.0, 85.0, history=history),
        make_record("simclr", "solo", 0, 81.0, 86.0),  # no diagnostics
    ])
    nnclr, simclr = (frame[frame["method"] == m].iloc[0] for m in ("nnclr", "simclr"))
    assert (nnclr["final_loss"], nnclr["diagnostics.nn_label_acc"]) == (2.5, 0.6)
    assert math.isnan(nnclr["diagnostics.loss_nn"])
    assert simclr["final_loss"] == 1.5 and math.isnan(simclr["diagnostics.nn_label_acc"])


def test_reference_rows_and_whether_methods_beat_them(tmp_path):
    runs = tmp_path / "runs"
    values = {
        ("pixels", "default", True): ([70.0, 70.0, 70.0], [75.0, 75.0, 75.0]),
        ("random_init", "default", True): ([50.0, 52.0, 51.0], [60.0, 61.0, 59.5]),
        ("simclr", "solo", False): ([80.0, 82.0, 81.0], [85.0, 86.5, 87.0]),
        ("moco", "mocov2", False): ([60.0, 61.0, 62.0], [76.0, 74.0, 77.0]),
    }
    for (method, preset, reference), (knn, lin) in values.items():
        for seed in range(3):
            write(runs, rec(method, preset, seed, knn[seed], lin[seed], reference=reference),
                  f"{method}-{seed}")
    report = build_report(runs, plots=False, presets=PRESETS)
    refs = report.tables["references"]
    assert len(refs) == 8 and set(refs["family_size"]) == {8}
    simclr_px = refs[(refs["method"] == "simclr") & (refs["reference"] == "pixels")
                     & (refs["metric"] == "knn20_top1")].iloc[0]
    assert simclr_px["p_value"] == pytest.approx(stats.ttest_rel([80, 82, 81], [70, 70, 70]).pvalue)
    np.testing.assert_allclose(refs["p_holm"], holm(refs["p_value"].to_numpy(dtype=float)))
    assert simclr_px["verdict"] == ("beats" if simclr_px["p_holm"] < 0.05 else "not resolved")
    text = render(report, "markdown")
    rows = table_rows(section(text, "Main table"))
    assert [r["method"] for r in rows[:2]] == ["pixels", "random_init"]  # references first
    assert all(r["preset"] == "reference" and r["budget"] == "not trained" for r in rows[:2])
    # simclr is above both references on both metrics, every p Holm < 0.05 (8 comparisons);
    # moco is below the pixels on k-NN and within noise of them on linear (p = 0.53)
    assert (refs[refs["method"] == "simclr"]["verdict"] == "beats").all()
    moco_lin_px = refs[(refs["method"] == "moco") & (refs["reference"] == "pixels")
                       & (refs["metric"] == "linear_top1")].iloc[0]
    assert moco_lin_px["verdict"] == "not resolved" and moco_lin_px["p_holm"] > 0.05
    simclr = next(r for r in rows if r["method"] == "simclr")
    assert simclr["beats refs (k-NN / linear)"] == "yes / yes"
    moco = next(r for r in rows if r["method"] == "moco")
    assert moco["beats refs (k-NN / linear)"] == "no (pixels) / not resolved"
    assert "## Methods vs the reference rows: digits" in text


def test_reference_without_matched_seeds_and_on_another_backbone(tmp_path):
    runs = tmp_path / "runs"
    write(runs, rec("random_init", "default", 0, 70.0, 75.0, reference=True), "ri")
    other = rec("pixels", "default", 1, 40.0, 50.0, reference=True)
    other["config"]["backbone"]["name"] = "resnet18"  # not the methods' backbone
    write(runs, other, "px")
    knn = [78.0, 80.0, 79.0]
    for seed in (1, 2, 3):
        write(runs, rec("simclr", "solo", seed, knn[seed - 1], 80.0 + seed), f"s-{seed}")
    report = build_report(runs, plots=False, presets=PRESETS)
    refs = report.tables["references"]
    assert set(refs["reference"]) == {"random_init"}  # the pixels ran on another backbone
    row = refs[refs["metric"] == "knn20_top1"].iloc[0]
    assert row["test"] == "one-sample t" and row["n_matched"] == 0
    assert row["p_value"] == pytest.approx(stats.ttest_1samp(knn, 70.0).pvalue)
    assert row["unmatched"] == "method only: 1,2,3; base only: 0"
    [simclr] = [r for r in table_rows(section(render(report, "markdown"), "Main table"))
                if r["method"] == "simclr"]
    assert simclr["beats refs (k-NN / linear)"].endswith("(pixels not comparable)")


def test_a_seed_invariant_reference_run_stands_for_every_seed(tmp_path):
    """One pixels run (seed-invariant) is paired with all three seeds of a method: a one-sample
    t-test against its value, not a bootstrap of the one seed both share; random_init's one run
    (its weights come from the seed) is paired with seed 0 alone."""
    runs = tmp_path / "runs"
    write(runs, rec("pixels", "default", 0, 70.0, 75.0, reference=True), "px")
    write(runs, rec("random_init", "default", 0, 50.0, 60.0, reference=True), "ri")
    knn, lin = [78.0, 80.0, 83.0], [80.0, 81.0, 85.0]
    for seed in range(3):
        write(runs, rec("simclr", "solo", seed, knn[seed], lin[seed]), f"s-{seed}")
    refs = build_report(runs, plots=False, presets=PRESETS).tables["references"]
    pixels = refs[(refs["reference"] == "pixels") & (refs["metric"] == "knn20_top1")].iloc[0]
    assert pixels["test"] == "paired t" and pixels["n_matched"] == 3
    assert pixels["p_value"] == pytest.approx(stats.ttest_1samp(knn, 70.0).pvalue)
    assert pixels["mean_diff"] == pytest.approx(np.mean(knn) - 70.0)
    assert pixels["per_seed"] == "0: +8.00; 1: +10.00; 2: +13.00"
    assert pixels["unmatched"] == ""
    assert pixels["note"] == ("paired t-test over 3 matched seeds; pixels is seed-invariant: "
                              "its seed-0 run stands for seeds 1,2")
    linear = refs[(refs["reference"] == "pixels") & (refs["metric"] == "linear_top1")].iloc[0]
    assert linear["p_value"] == pytest.approx(stats.ttest_1samp(lin, 75.0).pvalue)
    # the Holm family counts the three-seed tests; random_init's one-seed rows have no p-value
    assert set(refs["family_size"]) == {2}
    random_init = refs[(refs["reference"] == "random_init")
                       & (refs["metric"] == "knn20_top1")].iloc[0]
    assert random_init["test"] == "paired bootstrap" and random_init["n_matched"] == 1
    assert random_init["unmatched"] == "method only: 1,2"


def test_seed_invariance_is_not_assumed_where_the_runs_disagree_or_for_one_seed(tmp_path):
    """Two pixels runs that differ (another CPU's rounding) are paired seed by seed only; a
    method run only with seed 1 is compared with pixels' seed-0 run by the paired bootstrap
    over the test images of that run."""
    runs = tmp_path / "runs"
    write(runs, rec("pixels", "default", 0, 70.0, 75.0, reference=True), "px0")
    write(runs, rec("pixels", "default", 1, 72.5, 75.0, reference=True), "px1")
    for seed, knn in ((0, 78.0), (1, 80.0), (2, 83.0)):
        write(runs, rec("simclr", "solo", seed, knn, 80.0), f"s-{seed}")
    refs = build_report(runs, plots=False, presets=PRESETS).tables["references"]
    row = refs[refs["metric"] == "knn20_top1"].iloc[0]
    assert row["n_matched"] == 2 and row["unmatched"] == "method only: 2"
    assert row["p_value"] == pytest.approx(stats.ttest_rel([78.0, 80.0], [70.0, 72.5]).pvalue)

    runs = tmp_path / "runs_one_seed"
    write(runs, rec("pixels", "default", 0, 70.0, 75.0, reference=True), "px")
    write(runs, rec("moco", "mocov2", 1, 80.0, 80.0), "m1")
    refs = build_report(runs, plots=False, presets=PRESETS).tables["references"]
    row = refs[refs["metric"] == "knn20_top1"].iloc[0]
    assert row["test"] == "paired bootstrap" and row["n_matched"] == 1
    assert row["mean_diff"] == pytest.approx(10.0)  # 32 against 28 of 40 test images
    assert row["note"].endswith("pixels is seed-invariant: its seed-0 run stands for seed 1")
    assert row["unmatched"] == ""


def test_only_the_pixels_reference_is_seed_invariant():
    from methods import get_method_class, list_methods

    assert [m for m in list_methods() if get_method_class(m).seed_invariant] == ["pixels"]


def test_dataset_filter(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        write(runs, rec("simclr", "solo", seed, 80.0 + seed, 85.0), f"digits/s-{seed}")
        write(runs, rec("simclr", "solo", seed, 70.0 + seed, 75.0, dataset="fashion_mnist",
                        n_test=360), f"fashion_mnist/s-{seed}")
    (runs / "digits" / "unfinished").mkdir()
    (runs / "digits" / "unfinished" / "checkpoint.pt").write_bytes(b"x")
    main(["--runs", str(runs), "--dataset", "fashion_mnist", "--plots-dir", "none"])
    text = capsys.readouterr().out
    assert "## Main table: fashion_mnist" in text and "digits" not in text
    assert f"`python -m eval.report --runs {runs} --dataset fashion_mnist`" in text
    # noise floor of the chosen dataset: 360 test images
    noise = "\n".join(section(text, "How to read this: fashion_mnist"))
    assert "N_test = 360 images" in noise and "One test image is worth 0.278 points" in noise
    assert f"is {binomial_se(70.5, 360):.2f} points" in noise
    with pytest.raises(SystemExit) as exit_code:
        main(["--runs", str(runs), "--dataset", "fashion", "--plots-dir", "none"])
    assert exit_code.value.code == 2
    err = capsys.readouterr().err
    assert "unknown dataset fashion" in err and "fashion_mnist" in err
    # a dataset with no records here says which datasets the directory does hold
    main(["--runs", str(runs), "--dataset", "cifar10", "--plots-dir", "none"])
    text = capsys.readouterr().out
    assert ("No finished runs yet. The directory's other records are of digits, fashion_mnist."
            in text.splitlines())
    (tmp_path / "empty").mkdir()
    main(["--runs", str(tmp_path / "empty"), "--plots-dir", "none"])
    assert "No finished runs yet." in capsys.readouterr().out.splitlines()


def test_one_seed_comparison_uses_the_bootstrap_for_power(tmp_path):
    runs = tmp_path / "runs"
    write(runs, rec("simclr", "solo", 0, 50.0, 50.0, n_test=200), "s")
    write(runs, rec("nnclr", "solo", 0, 60.0, 60.0, n_test=200, base="simclr/solo"), "n")
    report = build_report(runs, plots=False, presets=PRESETS)
    row = report.tables["deltas"].iloc[0]
    assert row["test"] == "paired bootstrap" and math.isnan(row["p_value"])
    assert set(report.tables["deltas"]["note"]) == {
        "single matched seed: paired bootstrap over test images"}
    from eval.stats import bootstrap_mde, paired_bootstrap_diffs

    observed, diffs = paired_bootstrap_diffs(np.arange(200) < 120, np.arange(200) < 100)
    mde, se = bootstrap_mde(diffs)
    assert row["mean_diff"] == pytest.approx(10.0) and row["mde"] == pytest.approx(mde)
    text = render(report, "markdown")
    knn = next(r for r in table_rows(section(text, "Gain over each method's base"))
               if r["metric"] == "k-NN k=20")
    assert knn["MDE"] == f"{mde:.2f}†" and knn["p"] == "–"


def test_csv_round_trips_into_pandas(runs):
    report = build_report(runs, plots=False, presets=PRESETS)
    csv = render(report, "csv")
    frame = pd.read_csv(io.StringIO(csv))
    main_rows = frame[frame["table"] == "main"]
    assert len(main_rows) == len(report.tables["main"])
    assert sorted(main_rows["knn20_top1_mean"].round(6)) == sorted(
        report.tables["main"]["knn20_top1_mean"].round(6))
    data = json.loads(render(report, "json"))
    assert set(data) >= {"main", "deltas", "problems", "neighbour_agreement", "noise"}


def test_plots_are_written_next_to_the_markdown(runs, tmp_path, capsys):
    main(["--runs", str(runs), "--plots-dir", str(tmp_path / "out")])
    text = capsys.readouterr().out
    assert (tmp_path / "out" / "knn_vs_k.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "out" / "training_loss.png").exists()
    assert (tmp_path / "out" / "ablation_method_temperature.png").exists()
    assert (tmp_path / "out" / "runs.csv").exists()
    assert "](knn_vs_k.png)" in text


def test_plots_stay_within_0_and_100(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    for k in (5, 10):
        for seed, knn in enumerate((97.0, 100.0, 100.0)):
            record = rec("groco", "default", seed, knn, 99.0, extra_method={"topk_neg": k})
            record["metrics"]["knn_curve"] = {"1": knn, "20": knn, "200": 100.0}
            write(runs, record, f"g-{k}-{seed}")
    limits = []

    def spy(fig):
        limits.append(fig.axes[0].get_ylim())
        return b"png"

    monkeypatch.setattr(report_module, "_png", spy)
    report = build_report(runs, presets=PRESETS)
    assert {"accuracy_vs_group_size.png", "knn_vs_k.png"} <= set(report.plots)
    assert len(limits) >= 2 and all(0.0 <= low < high <= 100.0 for low, high in limits)


def test_every_curve_of_a_plot_has_its_own_colour_and_marker(tmp_path, monkeypatch):
    """Twelve cells on one k-NN-vs-k plot: matplotlib's cycle alone repeats a colour after ten
    (both with marker "o"), which made two legend entries of the Fashion-MNIST plot identical."""
    runs = tmp_path / "runs"
    for i in range(12):
        write(runs, rec("moco", "mocov2", 0, 70.0 + i, 80.0,
                        extra_method={"temperature": 0.05 * (i + 1)}), f"m-{i}")
    styles = {}

    def spy(fig):
        ax = fig.axes[0]
        lines = [container.lines[0] for container in ax.containers]  # one per errorbar curve
        styles[ax.get_xlabel()] = [(line.get_color(), line.get_marker()) for line in lines]
        return b"png"

    monkeypatch.setattr(report_module, "_png", spy)
    build_report(runs, presets=PRESETS)
    knn = styles["k (T = 0.07)"]
    assert len(knn) == 12 and len(set(knn)) == 12
    assert {marker for _, marker in knn} == {"o", "s"}
    swept = styles["method.temperature"]
    assert len(swept) == 1  # one curve over the swept values
    assert report_module.curve_style(10) == {"color": "C0", "marker": "s"}
    assert len({tuple(report_module.curve_style(i).values()) for i in range(60)}) == 60


def test_the_knn_plot_legend_leaves_every_curve_visible(tmp_path, monkeypatch):
    """Sixteen cells: an inner legend covered most of the Fashion-MNIST k-NN-vs-k curves."""
    runs = tmp_path / "runs"
    for i in range(16):
        write(runs, rec("moco", "mocov2", 0, 70.0 + i, 80.0,
                        extra_method={"temperature": 0.05 * (i + 1)}), f"m-{i}")
    boxes, labels = {}, {}

    def spy(fig):
        ax = fig.axes[0]
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        boxes[ax.get_xlabel()] = (ax.get_window_extent(renderer),
                                  ax.get_legend().get_window_extent(renderer))
        labels[ax.get_xlabel()] = [t.get_text() for t in ax.get_legend().get_texts()]
        return b"png"

    monkeypatch.setattr(report_module, "_png", spy)
    build_report(runs, presets=PRESETS)
    axes_box, legend_box = boxes["k (T = 0.07)"]
    assert legend_box.x0 >= axes_box.x1  # wholly to the right of the plotting area
    assert legend_box.height > 0
    # one dataset: its name would only lengthen every entry
    assert len(labels["k (T = 0.07)"]) == 16
    assert all(t.startswith("moco/mocov2") for t in labels["k (T = 0.07)"])


def test_curve_labels_name_the_dataset_only_where_a_plot_holds_several():
    assert report_module.curve_label("digits", "groco", "default", "method.topk_neg=5",
                                     with_dataset=False) == "groco/default method.topk_neg=5"
    assert report_module.curve_label("digits", "simclr", "solo", "",
                                     with_dataset=True) == "digits simclr/solo"


def test_group_size_plot_for_topk_sweep(tmp_path):
    runs = tmp_path / "runs"
    for k, knn in ((5, 60.0), (10, 65.0), (50, 62.0)):
        for seed in (0, 1):
            write(runs, make_record("groco", "default", seed, knn + seed, 70.0,
                                    extra_method={"topk_neg": k}), f"groco-{k}-{seed}")
    report = build_report(runs, presets=PRESETS)
    assert "accuracy_vs_group_size.png" in report.plots
    assert "![method.topk_neg](accuracy_vs_group_size.png)" in render(report, "markdown")


def test_every_report_output_goes_through_the_atomic_writer(runs, tmp_path, capsys, monkeypatch):
    import engine.io

    main(["--runs", str(runs), "--plots-dir", str(tmp_path / "elsewhere")])
    printed = capsys.readouterr().out
    out = tmp_path / "out"
    written = []
    real_write = engine.io.atomic_write_bytes

    def spy(path, data, **kwargs):
        written.append(Path(path))
        real_write(path, data, **kwargs)

    monkeypatch.setattr(engine.io, "atomic_write_bytes", spy)
    main(["--runs", str(runs), "--output", str(out / "table.md")])
    assert capsys.readouterr().out == ""  # the report went to the file, not to stdout
    files = sorted(p for p in out.iterdir())
    assert sorted(written) == files  # the markdown, runs.csv and every plot, each through the writer
    assert {p.name for p in files} >= {"table.md", "runs.csv", "knn_vs_k.png", "training_loss.png"}
    command = f"python -m eval.report --runs {runs}"
    assert (out / "table.md").read_text() == printed.replace(
        f"`{command}`", f"`{command} --output {out / 'table.md'}`")
    # --format outputs too, byte for byte what stdout would get
    main(["--runs", str(runs), "--format", "csv"])
    csv_printed = capsys.readouterr().out
    main(["--runs", str(runs), "--format", "csv", "--output", str(out / "table.csv")])
    assert written[-1] == out / "table.csv"
    assert (out / "table.csv").read_text() == csv_printed
    main(["--runs", str(runs), "--format", "json", "--output", str(out / "table.json")])
    assert set(json.loads((out / "table.json").read_text())) >= {"main", "deltas", "problems"}


def test_interrupted_report_write_keeps_the_previous_files(runs, tmp_path, capsys, monkeypatch):
    import engine.io

    out = tmp_path / "out"
    out.mkdir()
    (out / "table.md").write_text("previous report\n")
    (out / "knn_vs_k.png").write_bytes(b"previous plot")
    real_replace = engine.io.os.replace

    def crash(src, dst):  # as if the process died between writing the temp file and the rename
        if Path(dst).parent == out:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(engine.io.os, "replace", crash)
    with pytest.raises(SystemExit) as exit_code:
        main(["--runs", str(runs), "--output", str(out / "table.md")])
    assert exit_code.value.code == 2
    assert f"cannot write plots to {out}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--runs", str(runs), "--plots-dir", "none", "--output", str(out / "table.md")])
    assert f"cannot write the report to {out / 'table.md'}" in capsys.readouterr().err
    assert (out / "table.md").read_text() == "previous report\n"
    assert (out / "knn_vs_k.png").read_bytes() == b"previous plot"
    assert sorted(p.name for p in out.iterdir()) == ["knn_vs_k.png", "table.md"]  # no temp files


def test_correctness_bits_feed_the_bootstrap(tmp_path):
    """A one-seed cell's interval is the percentile bootstrap of the packed correctness bits of
    the run that holds the metric (a run without it once lent its bits)."""
    runs = tmp_path / "runs"
    without = rec("simclr", "solo", 0, 75.0, 80.0, n_test=40)
    del without["metrics"]["knn20_top1"]
    without["correct"]["knn20"] = pack_bits(np.zeros(40, dtype=bool))
    write(runs, without, "s0")
    record = rec("simclr", "solo", 1, 75.0, 80.0, n_test=40)
    bits = np.arange(40) % 4 != 0  # 30 of 40
    record["correct"]["knn20"] = pack_bits(bits)
    write(runs, record, "s1")
    row = build_report(runs, plots=False, presets=PRESETS).tables["main"].iloc[0]
    _, low, high = bootstrap_ci(bits)
    assert (row["knn20_top1_ci_low"], row["knn20_top1_ci_high"]) == (low, high)
    assert row["knn20_top1_ci_kind"] == "bootstrap" and math.isnan(row["knn20_top1_sd"])


def test_a_run_stored_twice_counts_once_and_is_listed(tmp_path):
    """A copied run folder once doubled n (seeds 0,0,1,1,2,2) and shrank the interval 2.6×."""
    runs = tmp_path / "runs"
    for seed, knn, lin in ((0, 80.0, 85.0), (1, 82.0, 86.0), (2, 87.0, 90.0)):
        original = rec("simclr", "solo", seed, knn, lin)
        original["finished_at"] = f"2026-01-0{seed + 1}T00:00:00Z"
        write(runs, original, f"simclr-{seed}")
        copy_ = copy.deepcopy(original)
        copy_["finished_at"] = f"2026-02-0{seed + 1}T00:00:00Z"  # the copy finished later
        write(runs, copy_, f"copy/simclr-{seed}")
    report = build_report(runs, plots=False, presets=PRESETS)
    row = report.tables["main"].iloc[0]
    assert (row["n"], row["seeds"]) == (3, "0,1,2")
    want = t_interval([80.0, 82.0, 87.0])
    assert row["knn20_top1_ci_high"] - row["knn20_top1_mean"] == pytest.approx(want.half_width)
    assert row["knn20_top1_sd"] == pytest.approx(math.sqrt(13))
    problems = report.tables["problems"]
    assert sorted(problems["status"]) == ["duplicate"] * 3
    assert sorted(problems["run"]) == [str(runs / f"simclr-{s}") for s in range(3)]
    kept = {r["run_dir"] for r in report.records}
    assert kept == {str(runs / "copy" / f"simclr-{s}") for s in range(3)}
    assert problems["detail"].iloc[0].startswith("the same cell and seed 0 as ")
