"""The report over synthetic records with known numbers: tables, statistics, formats, problems."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from eval.records import pack_bits
from eval.report import build_report, main, render
from eval.stats import bootstrap_ci, paired_comparison, t_interval


def make_record(method, preset, seed, knn20, linear, *, base=None, protocol="groupbench-v1",
                epochs=30, extra_method=None, n_test=40, history=None):
    method_cfg = {"name": method, "preset": preset, "base": base, "temperature": 0.2}
    method_cfg.update(extra_method or {})
    config = {
        "seed": seed, "results_dir": "results",
        "dataset": {"name": "digits", "root": None},
        "backbone": {"name": "test_resnet", "stem": "lowres_pool"},
        "trainer": {"epochs": epochs, "batch_size": 256, "device": "cpu"},
        "method": method_cfg,
    }
    correct = np.zeros(n_test, dtype=bool)
    correct[: int(round(knn20 / 100 * n_test))] = True
    return {
        "status": "finished", "protocol": protocol, "seed": seed, "config": config,
        "method": method, "preset": preset, "dataset": "digits", "backbone": "test_resnet",
        "epochs": epochs, "batch_size": 256, "train_seconds": 10.0, "images_per_second": 100.0,
        "metrics": {
            "knn20_top1": knn20, "knn200_top1": knn20 - 5, "linear_top1": linear,
            "linear_top5": 99.0, "n_test": n_test,
            "neighbour_agreement": {"1": knn20, "5": 80.0, "20": 70.0, "50": 60.0, "200": 40.0},
            "knn_curve": {"1": knn20 - 1, "20": knn20, "200": knn20 - 5},
        },
        "correct": {"knn20": pack_bits(correct), "linear": pack_bits(correct)},
        "history": history or [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5}],
    }


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


def test_main_table_numbers(runs):
    text = "\n".join(section(render(build_report(runs, plots=False), "markdown"), "Main table"))
    half = stats.t.ppf(0.975, 2) * math.sqrt(13) / math.sqrt(3)
    row = next(line for line in text.splitlines()
               if line.startswith("| digits | simclr | solo") and "| 3 |" in line)
    assert f"| 83.00 ± {half:.2f} |" in row
    lin = t_interval([85.0, 86.0, 90.0])
    assert f"| {lin.mean:.2f} ± {lin.half_width:.2f} |" in row
    assert "| 3 | 0,1,2 |" in row
    # the other protocol is its own row with n = 1 and a bootstrap interval
    other = [line for line in text.splitlines() if "| other-v0 |" in line]
    assert len(other) == 1 and "| groupbench-v1 |" in row
    mean, low, high = bootstrap_ci(np.arange(40) < 20)
    assert f"50.00 [{low:.2f}, {high:.2f}]†" in other[0]


def test_deltas_use_matched_seeds_only(runs):
    report = build_report(runs, plots=False)
    deltas = report.tables["deltas"]
    knn = deltas[(deltas["method"] == "nnclr") & (deltas["metric"] == "knn20_top1")].iloc[0]
    expected = paired_comparison({0: 85.0, 1: 86.0, 3: 90.0}, {0: 80.0, 1: 82.0, 2: 87.0})
    assert knn["n_matched"] == 2 and knn["per_seed"] == "0: +5.00; 1: +4.00"
    assert knn["mean_diff"] == pytest.approx(4.5)
    assert knn["p_value"] == pytest.approx(stats.ttest_rel([85, 86], [80, 82]).pvalue)
    assert knn["p_value"] == pytest.approx(expected.p_value)
    assert knn["unmatched"] == "method only: 3; base only: 2"
    text = render(report, "markdown")
    assert "+4.50 [" in text and "method only: 3; base only: 2" in text


def test_ablation_table_and_problems(runs):
    report = build_report(runs, plots=False)
    assert "ablation:method.temperature" in report.tables
    ablation = report.tables["ablation:method.temperature"]
    assert ablation["value"].tolist() == [0.1, 0.5]
    assert ablation["knn20_top1_mean"].tolist() == [70.0, 75.0]
    text = render(report, "markdown")
    assert "## Ablation: `method.temperature`" in text
    problems = report.tables["problems"]
    assert sorted(problems["status"]) == ["failed", "unfinished", "unreadable"]
    assert "non-finite loss" in text and "broken" in text and "unfinished" in text


def test_csv_round_trips_into_pandas(runs):
    report = build_report(runs, plots=False)
    csv = render(report, "csv")
    frame = pd.read_csv(io.StringIO(csv))
    main = frame[frame["table"] == "main"]
    assert len(main) == len(report.tables["main"])
    assert sorted(main["knn20_top1_mean"].round(6)) == sorted(report.tables["main"]["knn20_top1_mean"].round(6))
    data = json.loads(render(report, "json"))
    assert set(data) >= {"main", "deltas", "problems", "neighbour_agreement"}


def test_plots_are_written_next_to_the_markdown(runs, tmp_path, capsys):
    main(["--runs", str(runs), "--plots-dir", str(tmp_path / "out")])
    text = capsys.readouterr().out
    assert (tmp_path / "out" / "knn_vs_k.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "out" / "training_loss.png").exists()
    assert (tmp_path / "out" / "ablation_method_temperature.png").exists()
    assert "](knn_vs_k.png)" in text


def test_group_size_plot_for_topk_sweep(tmp_path):
    runs = tmp_path / "runs"
    for k, knn in ((5, 60.0), (10, 65.0), (50, 62.0)):
        for seed in (0, 1):
            write(runs, make_record("groco", "default", seed, knn + seed, 70.0,
                                    extra_method={"topk_neg": k}), f"groco-{k}-{seed}")
    report = build_report(runs)
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
    assert sorted(written) == files  # the markdown and every plot, each through the writer
    assert {p.name for p in files} >= {"table.md", "knn_vs_k.png", "training_loss.png"}
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

