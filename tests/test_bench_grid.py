"""The default grid's wall time in ``eval.bench``: from the records, whether the runs went one
after another or side by side."""

from __future__ import annotations

import json

from engine.config import resolve_run_config
from engine.train import run_dir_for
from eval.bench import grid_wall_time, render
from eval.grid import expand_sweep
from tests.conftest import compose_config


def _write(tmp_path, job, finished_at, train, evaluation, threads):
    config = resolve_run_config(compose_config(job))
    config["results_dir"] = str(tmp_path)
    path = run_dir_for(config) / "record.json"
    path.parent.mkdir(parents=True)
    record = {"status": "finished", "method": config["method"]["name"],
              "preset": config["method"].get("preset") or "default", "train_seconds": train,
              "eval_seconds": evaluation, "finished_at": finished_at, "threads": threads}
    path.write_text(json.dumps(record))


def test_side_by_side_runs_count_once_in_the_span_and_fully_in_the_sum(tmp_path):
    jobs, _ = expand_sweep([])
    # Two runs at once from 10:00:00: 100 s and 60 s; then a third, 30 s, from 10:01:40.
    _write(tmp_path, jobs[0], "2026-01-01T10:01:40Z", 90.0, 10.0, 1)
    _write(tmp_path, jobs[1], "2026-01-01T10:01:00Z", 50.0, 10.0, 1)
    _write(tmp_path, jobs[2], "2026-01-01T10:02:10Z", 25.0, 5.0, 1)
    (tmp_path / "runs" / "stray").mkdir()  # not a default-grid run: ignored
    grid = grid_wall_time(tmp_path / "runs")
    assert grid["runs"] == 3 and grid["jobs"] == len(jobs)
    assert grid["seconds"] == 190.0
    assert grid["span"] == 130.0
    assert grid["threads"] == [1]
    text = render({"machine": "test", "grid": grid})
    assert "2.2 min from the first run's start to the last run's end" in text
    assert "3.2 min of run time in all" in text


def test_no_records_no_grid(tmp_path):
    assert grid_wall_time(tmp_path / "runs") is None
