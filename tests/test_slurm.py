"""Scale-out through hydra-submitit-launcher: a real SLURM cluster, and grid hygiene.

The ``slurm`` tests need a reachable SLURM (``sinfo`` answers) with partitions ``debug`` and
``low`` (``low`` preemptible by ``debug``), as ``bash slurm/local-cluster.sh start``
provides on one machine; ``.ci/run`` starts it. Without one they are skipped, saying why. Budgets
are tiny (1-10 short epochs of digits) and every job asks for at most the 2 CPUs of that node.

- a 2-method × 2-seed grid as one job array on ``debug``, then ``python -m eval.report``;
- a run on ``low`` preempted by a job on ``debug``: it checkpoints, requeues, resumes and ends
  with the metrics of an uninterrupted run;
- a 2-task job (``tasks_per_node=2``, gloo): one run with world size 2.

The grid-hygiene test needs no cluster (submitit's local executor): a run that fails leaves a
``failed`` record with its job id and log that the report lists, and submitting the grid again
trains only that run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, compose_config, run_cli

TINY = [
    "dataset=digits", "trainer.progress=false", "trainer.batch_size=64", "eval.linear=false",
]
# one CPU per task, so that two array tasks run at once on the 2-CPU test node
DEBUG = [
    "hydra/launcher=submitit_slurm", "hydra.launcher.partition=debug",
    "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2",
]


def _slurm() -> tuple[str | None, set[str]]:
    """(why SLURM cannot be used or None, its partitions)."""
    if shutil.which("sinfo") is None:
        return "no SLURM: `sinfo` is not on PATH (start one: bash slurm/local-cluster.sh start)", set()
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no SLURM reachable: sinfo failed ({exc})", set()
    if out.returncode != 0:
        return f"no SLURM reachable: `sinfo` exited {out.returncode}: {out.stderr.strip()[:300]}", set()
    return None, {p.rstrip("*") for p in out.stdout.split()}


SLURM_MISSING, PARTITIONS = _slurm()


def _records(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((results / "runs").rglob("record.json"))]


# submitit hands back a task's result as soon as the task has pickled it, while SLURM still
# counts the task as RUNNING until its batch script exits; wait for the accounting to settle.
_UNSETTLED = {"PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED", "RESIZING", "SUSPENDED"}


def _accounted_states(job_id: str, settle_s: float = 60.0) -> list[str] | None:
    """Final sacct states of every task of ``job_id``; None when no accounting answers."""
    deadline = time.monotonic() + settle_s
    while True:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode != 0 or not out.stdout.strip():
            return None
        states = [s.split()[0] for s in out.stdout.split("\n") if s.strip()]
        if not _UNSETTLED.intersection(states) or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


def _require_partitions(*names: str) -> None:
    missing = [n for n in names if n not in PARTITIONS]
    if missing:
        pytest.skip(f"SLURM has no partition {', '.join(missing)} (has: {', '.join(sorted(PARTITIONS))})")


# --------------------------------------------------------------------------------------------
# (a) a grid as one job array
# --------------------------------------------------------------------------------------------
@pytest.mark.slurm
@pytest.mark.skipif(SLURM_MISSING is not None, reason=str(SLURM_MISSING))
def test_grid_runs_as_one_job_array(tmp_path, capsys):
    _require_partitions("debug")
    start = time.monotonic()
    grid = run_cli(
        ["eval.grid", "-m", "method=simclr,moco", "seed=0,1", f"results_dir={tmp_path}",
         "trainer.epochs=1", "trainer.max_steps_per_epoch=3", *TINY, *DEBUG],
        timeout=900,
    )
    wall = time.monotonic() - start
    assert grid.returncode == 0, grid.stderr[-3000:]
    with capsys.disabled():
        print(f"\n[slurm] 4-run grid on partition debug: {wall:.1f} s wall")
    records = _records(tmp_path)
    assert {(r["method"], r["seed"]) for r in records} == {
        ("simclr", 0), ("simclr", 1), ("moco", 0), ("moco", 1)
    }
    assert all(r["status"] == "finished" and r["world_size"] == 1 for r in records)
    # one sbatch array: job ids <array id>_<task>, one submission script for all of them
    array_ids = {r["job"]["id"].split("_")[0] for r in records}
    assert len(array_ids) == 1 and all("_" in r["job"]["id"] for r in records), records[0]["job"]
    [array_id] = array_ids
    [script] = list((tmp_path / "submitit").glob(f"*/{array_id}_submission.sh"))
    text = script.read_text()
    assert "#SBATCH --partition=debug" in text and "#SBATCH --array=0-3" in text
    assert all(Path(r["job"]["stdout"]).exists() for r in records)
    states = _accounted_states(array_id)
    if states is not None:
        assert set(states) == {"COMPLETED"}, states
    report = run_cli(["eval.report", "--runs", str(tmp_path / "runs"), "--plots-dir", "none"])
    assert report.returncode == 0, report.stderr[-3000:]
    rows = [line for line in report.stdout.splitlines() if line.startswith("| digits")]
    for method in ("simclr", "moco"):
        assert any(row.startswith(f"| digits | {method} |") for row in rows), report.stdout
    problems = report.stdout.split("## Failed, unfinished, unreadable or duplicate runs")[-1]
    assert problems.strip().startswith("None."), problems


# --------------------------------------------------------------------------------------------
# (b) preemption: checkpoint, requeue, resume, same result
# --------------------------------------------------------------------------------------------
# Short epochs: each one is a checkpoint, and after the first the job has 11 more to go when the
# preempting job arrives (SLURM preempts within about a second on the test node).
PREEMPTED_RUN = ["method=moco", "seed=0", "trainer.epochs=12", "trainer.max_steps_per_epoch=4",
                 "trainer.batch_size=32", "trainer.progress=false", "eval.linear=false",
                 "trainer.checkpoint_every_s=0"]


def _checkpoint_epoch(results: Path) -> int:
    for path in (results / "runs").rglob("checkpoint.pt"):
        try:
            return int(torch.load(path, map_location="cpu", weights_only=False)["epoch"])
        except Exception:  # being replaced right now: try again
            return 0
    return 0


@pytest.mark.slurm
@pytest.mark.skipif(SLURM_MISSING is not None, reason=str(SLURM_MISSING))
def test_preempted_run_requeues_and_resumes_to_the_same_result(tmp_path):
    _require_partitions("debug", "low")
    from engine.train import run

    results = tmp_path / "preempted"
    # the whole node (2 CPUs), so that any job on `debug` has to preempt it
    grid = subprocess.Popen(
        [sys.executable, "-m", "eval.grid", "-m", f"results_dir={results}", *PREEMPTED_RUN,
         "hydra/launcher=submitit_slurm", "hydra.launcher.partition=low",
         "hydra.launcher.cpus_per_task=2", "hydra.launcher.mem_gb=2"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while _checkpoint_epoch(results) < 1:
            assert grid.poll() is None, f"the grid ended before its first checkpoint:\n{grid.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
        preemptor = subprocess.run(
            ["sbatch", "--parsable", "-p", "debug", "-c", "2", "--mem=256M", "-o", "/dev/null",
             "-J", "preemptor", "--wrap", "sleep 2"],
            capture_output=True, text=True, timeout=30,
        )
        assert preemptor.returncode == 0, preemptor.stderr
        # the uninterrupted reference, meanwhile, in this process (2 threads, as the job)
        torch.set_num_threads(2)
        reference = run(compose_config([f"results_dir={tmp_path / 'straight'}", *PREEMPTED_RUN]))
        output, _ = grid.communicate(timeout=600)
    finally:
        if grid.poll() is None:
            grid.kill()
    assert grid.returncode == 0, output[-3000:]
    [record] = _records(results)
    log = Path(record["job"]["stdout"]).read_text()
    assert "this job is preempted" in log and "Requeued job" in log, log[-3000:]
    assert record["resumed_from"] and record["resumed_from"][0] >= 1, (
        f"the run was not resumed (resumed_from={record['resumed_from']}): it finished before the "
        "preempting job started"
    )
    assert record["metrics"] == reference["metrics"]
    assert [h["loss"] for h in record["history"]] == [h["loss"] for h in reference["history"]]


# --------------------------------------------------------------------------------------------
# (c) two tasks, one run
# --------------------------------------------------------------------------------------------
@pytest.mark.slurm
@pytest.mark.skipif(SLURM_MISSING is not None, reason=str(SLURM_MISSING))
def test_two_task_job_trains_one_run_with_world_size_two(tmp_path):
    _require_partitions("debug")
    grid = run_cli(
        ["eval.grid", "-m", "method=moco", "seed=0", f"results_dir={tmp_path}",
         "trainer.epochs=1", "trainer.max_steps_per_epoch=3", *TINY, *DEBUG,
         "hydra.launcher.tasks_per_node=2"],
        timeout=600,
    )
    assert grid.returncode == 0, grid.stderr[-3000:]
    [record] = _records(tmp_path)
    assert record["status"] == "finished" and record["world_size"] == 2
    assert record["distributed"]["launcher"] == "submitit"
    assert record["distributed"]["backend"] == "gloo"
    assert record["distributed"]["per_process_batch"] == 32
    assert record["shuffle_bn"] is True and record["distributed"]["per_process_bn"] == ["key_encoder"]
    assert record["config"]["trainer"]["world_size"] == 2
    job = record["job"]["id"]
    rank1 = list((tmp_path / "submitit").glob(f"*/{job}_1_log.out"))
    assert rank1 and "Job completed successfully" in rank1[0].read_text()


# --------------------------------------------------------------------------------------------
# grid hygiene (no cluster needed)
# --------------------------------------------------------------------------------------------
def test_failed_run_is_recorded_and_a_resubmission_reruns_only_it(tmp_path):
    from engine.config import resolve_run_config
    from engine.train import run_dir_for
    from eval.records import load_records

    args = ["eval.grid", "-m", "method=simclr", "seed=0,1", f"results_dir={tmp_path}",
            "trainer.epochs=1", "trainer.max_steps_per_epoch=2", *TINY,
            "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"]
    cfg = compose_config([a for a in args[3:] if not a.startswith("hydra")
                          and not a.startswith("seed")] + ["seed=1"])
    broken = run_dir_for(resolve_run_config(cfg))
    broken.mkdir(parents=True)
    (broken / "checkpoint.pt").write_bytes(b"not a checkpoint")  # seed 1 fails when it resumes

    first = run_cli(args, timeout=600)
    assert first.returncode != 0
    failed = json.loads((broken / "record.json").read_text())
    assert failed["status"] == "failed" and "not a complete torch archive" in failed["error"]
    assert failed["job"]["id"] and failed["seed"] == 1
    problems = load_records(tmp_path / "runs").problems
    [problem] = problems
    assert problem.status == "failed" and problem.job_id == failed["job"]["id"]
    assert problem.log_tail and "not a complete torch archive" in problem.log_tail
    report = run_cli(["eval.report", "--runs", str(tmp_path / "runs"), "--plots-dir", "none"])
    assert report.returncode == 0, report.stderr[-2000:]
    assert "failed" in report.stdout and failed["job"]["id"] in report.stdout
    [finished] = [r for r in _records(tmp_path) if r["status"] == "finished"]

    (broken / "checkpoint.pt").unlink()
    again = run_cli(args, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(1 already finished)" in again.stderr
    records = {r["seed"]: r for r in _records(tmp_path)}
    assert records[0] == finished  # untouched: skipped, not trained again
    assert records[1]["status"] == "finished"


def _fake_slurm(bin_dir: Path, sbatch_says: str, status: int) -> dict[str, str]:
    """SLURM's three commands as scripts: an sbatch that prints ``sbatch_says`` to stderr and
    exits ``status``, an srun that does nothing, an sinfo that lists partitions debug (the
    default) and low; the environment that puts them first on PATH."""
    bin_dir.mkdir()
    scripts = {
        "sbatch": f"cat >&2 <<'EOF'\n{sbatch_says}\nEOF\nexit {status}\n",
        "srun": "exit 0\n",
        "sinfo": "printf 'debug*\\nlow\\nlow\\n'\n",
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}")
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_a_submission_sbatch_refuses_is_one_line(tmp_path):
    refusal = ("sbatch: error: invalid partition specified: gpu\n"
               "sbatch: error: Batch job submission failed: Invalid partition name specified")
    env = _fake_slurm(tmp_path / "bin", refusal, 1)
    result = run_cli(["eval.grid", "-m", "method=simclr", "seed=0,1", f"results_dir={tmp_path}",
                      *TINY, "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"],
                     env=env, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "sbatch: error" not in result.stdout
    assert result.stderr.splitlines() == [
        "[groupbench] grid of 2 runs validated",
        "error: sbatch refused the grid's 2-job array, so nothing was submitted: sbatch: error: "
        "invalid partition specified: gpu; sbatch: error: Batch job submission failed: Invalid "
        "partition name specified (the hydra.launcher.* settings go to sbatch; SLURM's "
        "partitions: debug (the default), low)",
    ]
    assert not (tmp_path / "runs").exists()


def test_slurm_refusals_leaves_other_failures_and_the_executor_as_they_were(monkeypatch):
    from submitit.core.utils import FailedJobError, FailedSubmissionError
    from submitit.slurm.slurm import SlurmExecutor

    from eval.grid import SubmissionRefused, slurm_refusals

    original = SlurmExecutor._submit_command
    on_stdout = FailedJobError("")
    on_stdout.__cause__ = subprocess.CalledProcessError(1, ["sbatch"], output="QOSMaxWallDuration")
    outcomes = iter([FailedSubmissionError("could not parse"), FailedJobError(""), on_stdout])

    def fake_submit(self, command):
        raise next(outcomes)

    monkeypatch.setattr(SlurmExecutor, "_submit_command", fake_submit)
    monkeypatch.setattr("eval.grid._slurm_partitions", lambda: None)
    with slurm_refusals(3):
        # sbatch answered but submitit could not read a job id: a job may exist, not a refusal
        with pytest.raises(FailedSubmissionError):
            SlurmExecutor._submit_command(None, "x")
        with pytest.raises(SubmissionRefused) as refused:
            SlurmExecutor._submit_command(None, "x")
        with pytest.raises(SubmissionRefused) as refused_on_stdout:
            SlurmExecutor._submit_command(None, "x")
    assert refused.value.problems == [
        "sbatch refused the grid's 3-job array, so nothing was submitted: it gave no message "
        "(the hydra.launcher.* settings go to sbatch)"]
    assert refused_on_stdout.value.problems == [
        "sbatch refused the grid's 3-job array, so nothing was submitted: QOSMaxWallDuration "
        "(the hydra.launcher.* settings go to sbatch)"]
    assert SlurmExecutor._submit_command is fake_submit
    monkeypatch.undo()
    assert SlurmExecutor._submit_command is original


@pytest.mark.slurm
@pytest.mark.skipif(SLURM_MISSING is not None, reason=str(SLURM_MISSING))
def test_an_unknown_partition_is_refused_in_one_line_naming_the_partitions(tmp_path):
    result = run_cli(["eval.grid", "-m", "method=simclr", "seed=0", f"results_dir={tmp_path}",
                      *TINY, *DEBUG, "hydra.launcher.partition=no_such_partition"], timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert line.startswith("error: sbatch refused the grid's 1-job array, so nothing was submitted")
    assert "partition" in line.lower() and "no_such_partition" in line
    assert "SLURM's partitions: " in line and "debug" in line.split("SLURM's partitions: ")[1]
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------
# smoke mode through the launchers: each job smoke-tests its config, the submitting process
# prints every job's line and the total; no run is written
# --------------------------------------------------------------------------------------------
SMOKE_GRID = ["eval.grid", "-m", "method=simclr,moco", "seed=0", "smoke=true",
              "trainer.batch_size=64", "trainer.progress=false"]


def _assert_smoke_output(result, tmp_path: Path, n: int) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("[smoke] ok ")]
    assert len(lines) == n, result.stdout[-3000:]
    assert all("ms/step" in line and "MiB (cpu, fp32)" in line for line in lines), lines
    assert f"[smoke] {n} config(s): {n} ok, 0 error" in result.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.slurm
@pytest.mark.skipif(SLURM_MISSING is not None, reason=str(SLURM_MISSING))
def test_smoke_grid_runs_through_slurm(tmp_path):
    _require_partitions("debug")
    result = run_cli([*SMOKE_GRID, f"results_dir={tmp_path}", *DEBUG], timeout=600)
    _assert_smoke_output(result, tmp_path, 2)


@pytest.mark.slow
def test_smoke_grid_runs_through_submitit(tmp_path):
    result = run_cli([*SMOKE_GRID, f"results_dir={tmp_path}", "hydra/launcher=submitit_local",
                      "hydra.launcher.timeout_min=10"], timeout=600)
    _assert_smoke_output(result, tmp_path, 2)
