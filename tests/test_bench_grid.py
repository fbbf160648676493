"""The default grid's wall time in ``eval.bench``: from the records, whether the runs went one
after another or side by side."""

from __future__ import annotations

import json

import pytest

from engine.config import resolve_run_config
from engine.train import run_dir_for
from eval.bench import build_method_step, grid_compute_floor, grid_wall_time, render, step_flops
from eval.grid import expand_sweep
from tests.conftest import compose_config


def _write(tmp_path, job, finished_at, train, evaluation, threads, **fields):
    config = resolve_run_config(compose_config(job))
    config["results_dir"] = str(tmp_path)
    path = run_dir_for(config) / "record.json"
    path.parent.mkdir(parents=True)
    record = {"status": "finished", "method": config["method"]["name"],
              "preset": config["method"].get("preset") or "default", "train_seconds": train,
              "eval_seconds": evaluation, "finished_at": finished_at, "threads": threads, **fields}
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


def test_the_compute_floor_is_the_recorded_steps_times_each_presets_step_flops(tmp_path):
    jobs, _ = expand_sweep([])
    by_choice = {dict(o.split("=", 1) for o in job)["method"]: job for job in jobs
                 if "seed=0" in job}
    _write(tmp_path, by_choice["simclr"], "2026-01-01T10:01:00Z", 50.0, 1.0, 1, steps=150)
    _write(tmp_path, by_choice["simclr_groco_baseline"], "2026-01-01T10:02:00Z", 50.0, 1.0, 1,
           steps=150)
    _write(tmp_path, by_choice["pixels"], "2026-01-01T10:02:01Z", 0.0, 1.0, 1, steps=0,
           reference=True)
    grid = grid_wall_time(tmp_path / "runs")
    assert grid["steps"] == {"simclr": 150, "simclr_groco_baseline": 150}  # no reference row
    floor = grid_compute_floor(grid["steps"], rate=100.0)
    solo = step_flops(build_method_step("simclr", "digits", "simclr")[1])
    baseline = step_flops(build_method_step("simclr", "digits", "simclr_groco_baseline")[1])
    assert 13e9 < solo < 17e9 and baseline != solo  # GroCo's baseline has its own projector
    assert floor["flop"] == 150 * (solo + baseline)
    assert floor["seconds"] == 150 * (solo + baseline) / 100e9
    text = render({"machine": "test", "grid": {**grid, "floor": floor}})
    assert f"the span is {grid['span'] / floor['seconds']:.2f}× that" in text
    assert f"{grid['span'] / 60:.1f} min ({grid['span'] / floor['seconds']:.2f}× its compute floor)" \
        in text


def test_a_preset_of_another_method_is_refused():
    with pytest.raises(ValueError, match="preset 'moco' is method 'moco', not 'simclr'"):
        build_method_step("simclr", "digits", "moco")


@pytest.fixture
def bench_main(monkeypatch):
    """``eval.bench.main`` without its process settings (threads, malloc), which would outlive the
    test, and with every measured section refused: the cases below must not reach them."""
    from eval import bench

    def measured(*args, **kwargs):
        raise AssertionError("a section was measured")

    monkeypatch.setattr(bench.torch, "set_num_threads", lambda threads: None)
    monkeypatch.setattr(bench, "configure_host_allocator", lambda: True)
    for name in ("bench_augmentation", "bench_losses", "bench_large_groups", "bench_train_steps",
                 "bench_eval"):
        monkeypatch.setattr(bench, name, measured)
    return bench


@pytest.mark.parametrize("argv, also", [
    (["--only", "grid"], ""),
    (["--write-readme"], "; --write-readme would leave the grid's figures out of the README"),
])
def test_the_grid_section_without_records_stops_before_measuring(tmp_path, bench_main, capsys,
                                                                 argv, also):
    readme = bench_main.README.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        bench_main.main([*argv, "--runs", str(tmp_path / "runs")])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert (f"error: no finished run of the default grid under {tmp_path / 'runs'}: run `python "
            f"-m eval.grid -m` first, or pass --runs DIR{also}") in err
    assert bench_main.README.read_bytes() == readme


def test_other_sections_are_measured_without_the_grid(tmp_path, bench_main, monkeypatch, capsys):
    rendered: dict = {}
    monkeypatch.setattr(bench_main, "bench_losses", lambda quick: ["losses measured"])
    monkeypatch.setattr(bench_main, "render", lambda results: rendered.update(results) or "table")
    bench_main.main(["--only", "losses", "grid", "--runs", str(tmp_path / "runs")])
    assert rendered["losses"] == ["losses measured"] and "grid" not in rendered
    out, err = capsys.readouterr()
    assert out == "table\n"
    assert err.splitlines()[-2] == (f"warning: no finished run of the default grid under "
                                    f"{tmp_path / 'runs'}: run `python -m eval.grid -m` first, "
                                    "or pass --runs DIR; the grid section is left out")
