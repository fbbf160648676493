"""The real command lines: grid validation errors, a 2 × 2 × 1-epoch grid, then the report."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from engine.config import resolve_run_config
from eval.records import run_hash
from methods import get_method_class, list_methods
from tests.conftest import REPO, compose_config, run_cli

FAST = ["trainer.progress=false", "trainer.epochs=1", "trainer.max_steps_per_epoch=2"]


def test_misspelt_key_fails_naming_it(tmp_path):
    result = run_cli(["eval.grid", f"results_dir={tmp_path}", "trainer.epochz=1"])
    assert result.returncode != 0
    assert "epochz" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_unknown_method_in_a_sweep_fails_before_any_training(tmp_path):
    result = run_cli(["eval.grid", "-m", f"results_dir={tmp_path}", "method=simclr,mocco", *FAST])
    assert result.returncode == 2
    assert "mocco" in result.stderr and "simclr" in result.stderr and "moco" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_bad_value_in_last_sweep_job_fails_before_training(tmp_path):
    result = run_cli(
        ["eval.grid", "-m", f"results_dir={tmp_path}", "method.temperature=0.2,-1", *FAST]
    )
    assert result.returncode == 2
    assert "method.temperature=-1" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_default_sweep_covers_every_registered_method():
    from eval.grid import expand_sweep
    from methods import default_grid_presets

    config = yaml.safe_load((REPO / "configs" / "config.yaml").read_text())
    # the method list comes from the registry, never from a list kept in the config
    assert set(config["hydra"]["sweeper"]["params"]) == {"seed"}
    assert str(config["hydra"]["sweeper"]["params"]["seed"]) == "0,1,2"
    presets = default_grid_presets()
    jobs, world = expand_sweep([])
    assert world == 1 and len(jobs) == 3 * len(presets)
    assert sorted(jobs) == sorted([f"seed={s}", f"method={p}"] for s in range(3) for p in presets)
    names = {compose_config([f"method={p}"]).method.name for p in presets}
    assert names == set(list_methods())


@pytest.mark.slow
def test_grid_then_report_end_to_end(tmp_path):
    grid = run_cli(
        ["eval.grid", "-m", "method=simclr,moco", "seed=0,1", f"results_dir={tmp_path}", *FAST],
        timeout=900,
    )
    assert grid.returncode == 0, grid.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "runs").rglob("record.json"))]
    assert len(records) == 4
    assert {(r["method"], r["seed"]) for r in records} == {
        ("simclr", 0), ("simclr", 1), ("moco", 0), ("moco", 1)
    }
    # Plots go to tmp_path: the default (results/) is the repository's committed report.
    report = run_cli(["eval.report", "--runs", str(tmp_path / "runs"), "--plots-dir", str(tmp_path)])
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "knn_vs_k.png").exists()
    main_section = report.stdout.split("## Main table", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in main_section.splitlines() if line.startswith("| digits")]
    assert len(rows) == 2
    header_line = next(line for line in main_section.splitlines() if line.startswith("| dataset"))
    header = [c.strip() for c in header_line.strip("|").split("|")]

    def column(prefix):
        return next(i for i, name in enumerate(header) if name.startswith(prefix))

    def interval(values):
        # mean ± t half-width, then the sample SD; an interval that leaves [0, 100] is printed
        # clipped, with its mark
        mean, sd = np.mean(values), np.std(values, ddof=1)
        half = stats.t.ppf(0.975, len(values) - 1) * sd / np.sqrt(len(values))
        if mean - half < 0 or mean + half > 100:
            return (f"{mean:.2f} [{max(mean - half, 0):.2f}, {min(mean + half, 100):.2f}]‡"
                    f" (s {sd:.2f})")
        return f"{mean:.2f} ± {half:.2f} (s {sd:.2f})"

    for method in ("moco", "simclr"):
        row = next(r for r in rows if r.split("|")[2].strip() == method)
        cells = [c.strip() for c in row.strip("|").split("|")]
        values = [r["metrics"]["knn20_top1"] for r in records if r["method"] == method]
        assert cells[column("k-NN k=20 ")] == interval(values)
        linear = [r["metrics"]["linear_top1"] for r in records if r["method"] == method]
        # (a probe flag, e.g. "λ-edge 1/2", may follow the interval)
        assert cells[column("linear top-1")].startswith(interval(linear))
        assert cells[column("n")] == "2" and cells[column("seeds")] == "0,1"
        assert np.mean(values) > 20.0  # one epoch is already well above the 10% chance level
    # re-running the same grid trains nothing
    again = run_cli(
        ["eval.grid", "-m", "method=simclr,moco", "seed=0,1", f"results_dir={tmp_path}", *FAST],
        timeout=900,
    )
    assert again.returncode == 0
    assert again.stdout.count("skipping finished run") == 4


def test_report_without_records_says_so(tmp_path):
    result = run_cli(["eval.report", "--runs", str(Path(tmp_path) / "nothing")])
    assert result.returncode == 2 and "does not exist" in result.stderr


# Per-method settings the digits preset must resolve to (docs/recipes.md §6).
DIGITS_SETTINGS = {
    "ascl": {"queue_size": 1024, "bn_splits": 8},
    "cld": {"queue_size": 1024, "clusters": 200},
    "nnclr": {"queue_size": 1024},
    "all4one": {"queue_size": 1024},
    "moco": {"queue_size": 1024},
}


@pytest.fixture(scope="module")
def one_epoch_grid(tmp_path_factory) -> tuple[Path, str]:
    """Every registered method's default preset, one epoch of 2 steps on digits, as one grid
    through the CLI (one process: the imports once, not once per method)."""
    results = tmp_path_factory.mktemp("one_epoch_grid")
    presets = ",".join(get_method_class(name).default_preset for name in list_methods())
    result = run_cli(["eval.grid", "-m", f"method={presets}", "seed=0", "trainer.epochs=1",
                      "trainer.progress=false", "trainer.max_steps_per_epoch=2",
                      f"results_dir={results}"], timeout=900)
    return results, "" if result.returncode == 0 else result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("name", list_methods())
def test_every_method_trains_one_epoch_on_digits_through_the_cli(one_epoch_grid, name):
    results, failure = one_epoch_grid
    assert not failure, failure
    records = [json.loads(p.read_text()) for p in (results / "runs" / "digits").rglob("record.json")]
    (record,) = [r for r in records if r["method"] == name]
    assert record["status"] == "finished" and record["seed"] == 0
    for key, value in DIGITS_SETTINGS.get(name, {}).items():
        assert record["config"]["method"][key] == value, key
    scores = {k: v for k, v in record["metrics"].items() if k.endswith(("_top1", "_top5"))}
    assert {"knn20_top1", "linear_top1"} <= set(scores)
    assert all(math.isfinite(v) and 0 <= v <= 100 for v in scores.values())
    assert all(math.isfinite(v) for v in record["metrics"].values() if isinstance(v, float))
    assert all(math.isfinite(h["loss"]) for h in record["history"])


@pytest.mark.slow
def test_joblib_launcher_runs_a_grid_side_by_side_one_thread_each(tmp_path):
    """hydra/launcher=joblib: every run of the grid finishes, in its own process with
    cores/n_jobs threads (recorded), and is the same run (same hash) as under the default
    launcher."""
    grid = run_cli(
        ["eval.grid", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "method=simclr",
         "seed=0,1", f"results_dir={tmp_path}", *FAST],
        timeout=900,
    )
    assert grid.returncode == 0, grid.stderr[-3000:]
    assert "is validated against ConfigStore schema" not in grid.stderr
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "runs").rglob("record.json"))]
    assert sorted(r["seed"] for r in records) == [0, 1]
    assert all(r["status"] == "finished" for r in records)
    assert {r["threads"] for r in records} == {max(1, (os.cpu_count() or 1) // 2)}
    hashes = {r["seed"]: r["config_hash"] for r in records}
    for seed, got in hashes.items():
        resolved = resolve_run_config(compose_config([f"seed={seed}", "method=simclr", *FAST]))
        assert run_hash(resolved) == got
