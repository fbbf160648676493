"""Pre-flight of a grid (eval.grid): what can fail at the start of a run is found before the first
run or SLURM submission, one clear line per problem, exit status 2, nothing written."""

from __future__ import annotations

import pytest

import eval.grid as grid
from eval.grid import GridError, check_grid, preflight, resolve_jobs
from tests.conftest import run_cli


def _configs(jobs: list[list[str]], results, world: int = 1):
    configs, problems = resolve_jobs([[f"results_dir={results}", *job] for job in jobs], world)
    assert problems == []
    return configs


# --------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------
def test_a_wrong_data_path_prints_one_line_and_writes_nothing(tmp_path):
    missing = tmp_path / "nonexistent" / "cifar"
    result = run_cli(["eval.grid", "dataset=cifar10", f"dataset.root={missing}",
                      f"results_dir={tmp_path / 'results'}"])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: cifar10 root ") and str(missing) in lines[0]
    assert "cifar-10-batches-py" in lines[0]  # what was expected
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "results").exists()  # no run record, no hydra run directory


def test_a_grid_reports_every_problem_once_before_any_run(tmp_path):
    # 2 datasets × 2 methods × 2 seeds: cifar10's root is wrong (one line for its 4 jobs) and the
    # batch exceeds digits' 1,437 training images (one line for digits' 4 jobs).
    result = run_cli(["eval.grid", "-m", "dataset=digits,cifar10", "method=simclr,moco",
                      "seed=0,1", f"dataset.root={tmp_path / 'nowhere'}",
                      "trainer.batch_size=2048", f"results_dir={tmp_path / 'results'}"])
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, result.stderr
    dataset, batch = sorted(errors, key=lambda line: "cifar10 root" not in line)
    assert "cifar10 root" in dataset and "nowhere" in dataset and "and 3 more)" in dataset
    assert batch.startswith("error: trainer.batch_size=2048 exceeds the 1437 pre-training "
                            "images of digits; use at most 1437 (grid job ")
    assert batch.endswith("and 3 more)")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "results").exists()


def test_a_missing_cuda_device_is_one_line_before_any_run(tmp_path):
    # the run itself would find it only in its hydra job, as a traceback
    result = run_cli(["eval.grid", "trainer.device=cuda", f"results_dir={tmp_path / 'results'}"],
                     env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: trainer.device='cuda' but no CUDA device is available; use auto or cpu"]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "results").exists()


# --------------------------------------------------------------------------------------------
# in process: what is checked, and how often
# --------------------------------------------------------------------------------------------
def test_method_limits_and_batch_are_checked_against_the_dataset(tmp_path):
    configs = _configs([
        ["method=groco", "trainer.batch_size=8"],  # top-k 10 needs 11 images per batch
        ["method=moco", "method.queue_size=2048"],  # a queue larger than digits' 1,437 images
        ["method=simclr", "trainer.batch_size=64"],  # fine
    ], tmp_path)
    problems = preflight(configs)
    assert len(problems) == 2, problems
    assert problems[0].startswith("method.topk_neg=10 needs more negatives than batch_size=8")
    assert "grid job " in problems[0] and "method=groco" in problems[0]
    assert problems[1].startswith("method.queue_size=2048 exceeds the 1437 pre-training images")
    assert not (tmp_path / "runs").exists()


def test_the_per_process_batch_is_checked_for_the_launchers_processes(tmp_path):
    # 96 splits into 3 micro-batches, but not once split over 3 processes (32 each).
    configs = _configs([["trainer.batch_size=96", "trainer.grad_accum_steps=3"]], tmp_path,
                       world=3)
    [problem] = preflight(configs, world=3)
    assert "per-process batch 32 (trainer.batch_size=96 over 3 processes)" in problem
    assert preflight(_configs([["trainer.batch_size=96", "trainer.grad_accum_steps=3"]],
                              tmp_path)) == []


def test_each_distinct_dataset_backbone_and_method_is_built_once(tmp_path, monkeypatch):
    import backbones
    import datasets
    import methods

    calls = {"check": 0, "load": 0, "backbone": 0, "method": 0}

    def counting(key, fn):
        def wrapped(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(datasets, "check_dataset", counting("check", datasets.check_dataset))
    monkeypatch.setattr(datasets, "load_dataset", counting("load", datasets.load_dataset))
    monkeypatch.setattr(backbones, "build_backbone", counting("backbone", backbones.build_backbone))
    monkeypatch.setattr(methods, "build_method", counting("method", methods.build_method))
    jobs = [[f"method={m}", f"seed={s}"] for m in ("simclr", "moco") for s in (0, 1, 2)]
    assert preflight(_configs(jobs, tmp_path)) == []
    assert calls == {"check": 1, "load": 1, "backbone": 1, "method": 2}


def test_a_dataset_problem_skips_what_depends_on_it_and_names_the_dataset(tmp_path):
    configs = _configs([["dataset=cifar10", f"dataset.root={tmp_path / 'none'}"]], tmp_path)
    with pytest.raises(GridError) as err:
        check_grid([[f"results_dir={tmp_path}", "dataset=cifar10",
                     f"dataset.root={tmp_path / 'none'}"]], multirun=False)
    [line] = err.value.problems
    assert line.startswith("cifar10 root ") and "grid job" not in line  # one run: no job label
    assert preflight(configs) == [f"{line} (grid job results_dir={tmp_path} dataset=cifar10 "
                                  f"dataset.root={tmp_path / 'none'})"]


def test_config_errors_of_many_jobs_are_one_line(tmp_path):
    jobs = [[f"results_dir={tmp_path}", f"seed={s}", "method.temperature=-1"] for s in range(3)]
    configs, problems = resolve_jobs(jobs)
    assert configs == []
    assert problems == [f"invalid method.temperature=-1; it must be > 0 (grid job "
                        f"results_dir={tmp_path} seed=0 method.temperature=-1 and 2 more)"]


def test_an_unexpected_build_error_is_a_problem_line_naming_its_type(tmp_path, monkeypatch):
    import backbones

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory\nsecond line")

    monkeypatch.setattr(backbones, "build_backbone", broken)
    [line] = preflight(_configs([[]], tmp_path))
    assert line.startswith("backbone test_resnet (stem lowres_pool) on digits's 1-channel 16 px "
                           "images: RuntimeError: out of memory (grid job")
    assert "second line" not in line


def test_devices_are_checked_where_the_runs_start(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    configs = _configs([["trainer.device=cuda", "seed=0"], ["trainer.device=cuda", "seed=1"],
                        ["trainer.device=cpu"]], tmp_path)
    assert preflight(configs) == []  # jobs for other machines (SLURM): their nodes have the GPUs
    assert preflight(configs, devices_here=True) == [
        "trainer.device='cuda' but no CUDA device is available; use auto or cpu (grid job "
        f"results_dir={tmp_path} trainer.device=cuda seed=0 and 1 more)"]


def _download_jobs(data, batch_size: int = 8) -> list[list[str]]:
    return [["dataset=cifar10", f"dataset.root={data}", "dataset.download=true", "method=simclr",
             f"trainer.batch_size={batch_size}", f"seed={seed}"] for seed in (0, 1)]


def test_a_download_happens_once_in_the_preflight_and_is_then_checked(tmp_path, monkeypatch):
    from pathlib import Path

    import torchvision.datasets as tvd

    from tests.test_datasets import _write_cifar10

    calls: list[str] = []

    class FakeCIFAR10:  # torchvision's: fetches what is missing, verifies what is there
        def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
            calls.append(root)
            if not (Path(root) / "cifar-10-batches-py").exists():
                _write_cifar10(Path(root))  # 20 pre-training images

    monkeypatch.setattr(tvd, "CIFAR10", FakeCIFAR10)
    data = tmp_path / "data"
    configs = _configs(_download_jobs(data), tmp_path)
    assert preflight(configs) == [] and calls == []  # eval.doctor's way: a root is enough
    assert preflight(configs, downloads=True) == [] and calls == [str(data)]  # once, two jobs
    # downloaded, the dataset is checked like any other: 20 images cannot fill a batch of 32
    assert preflight(_configs(_download_jobs(data, 32), tmp_path), downloads=True) == [
        "trainer.batch_size=32 exceeds the 20 pre-training images of cifar10; use at most 20 "
        f"(grid job results_dir={tmp_path} dataset=cifar10 dataset.root={data} "
        "dataset.download=true method=simclr trainer.batch_size=32 seed=0 and 1 more)"]


def test_a_failed_download_is_one_line_before_any_run(tmp_path, monkeypatch, capsys):
    import sys
    from urllib.error import URLError

    import torchvision.datasets as tvd

    class OfflineCIFAR10:
        def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
            raise URLError("[Errno -3] Temporary failure in name resolution")

    launched: list[list[str]] = []
    monkeypatch.setattr(tvd, "CIFAR10", OfflineCIFAR10)
    monkeypatch.setattr(grid, "_hydra_main", lambda: launched.append(list(sys.argv[1:])))
    data, results = tmp_path / "data", tmp_path / "results"
    with pytest.raises(SystemExit) as exit_info:
        grid.main(["-m", f"results_dir={results}", *_download_jobs(data)[0][:-1], "seed=0,1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: cifar10: download into '{data}' failed (<urlopen error [Errno -3] Temporary "
        f"failure in name resolution>) (grid job seed=0 results_dir={results} dataset=cifar10 "
        f"dataset.root={data} dataset.download=True method=simclr trainer.batch_size=8 and 1 "
        "more)"]
    assert launched == [] and not results.exists()


@pytest.mark.filterwarnings("ignore:\\s*'hydra/launcher/(joblib|submitit_\\w+)' is validated")
@pytest.mark.parametrize("launcher, runs_here", [("basic", True), ("joblib", True),
                                                 ("submitit_local", True),
                                                 ("submitit_slurm", False)])
def test_only_slurm_grids_leave_the_device_to_the_nodes(tmp_path, monkeypatch, capsys, launcher,
                                                        runs_here):
    import sys

    import torch

    launched: list[list[str]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(grid.shutil, "which", lambda command: f"/usr/bin/{command}")  # SLURM's
    monkeypatch.setattr(grid, "start_joblib_workers", lambda node: (pid for pid in ()))
    monkeypatch.setattr(grid, "_hydra_main", lambda: launched.append(list(sys.argv[1:])))
    monkeypatch.setattr(sys, "argv", ["grid"])
    argv = ["-m", f"hydra/launcher={launcher}", "method=simclr", "seed=0", "trainer.device=cuda",
            f"results_dir={tmp_path}"]
    if runs_here:
        with pytest.raises(SystemExit) as exit_info:
            grid.main(argv)
        assert exit_info.value.code == 2
        assert "error: trainer.device='cuda' but no CUDA device is available" in (
            capsys.readouterr().err)
        assert launched == []
    else:
        grid.main(argv)
        assert len(launched) == 1


@pytest.mark.filterwarnings("ignore:\\s*'hydra/launcher/submitit_slurm' is validated")
def test_a_slurm_grid_without_slurm_commands_is_one_line_before_anything(tmp_path, monkeypatch,
                                                                        capsys):
    import sys

    launched: list[list[str]] = []
    monkeypatch.setattr(grid.shutil, "which",
                        lambda command: None if command == "srun" else f"/usr/bin/{command}")
    monkeypatch.setattr(grid, "_hydra_main", lambda: launched.append(list(sys.argv[1:])))
    with pytest.raises(SystemExit) as exit_info:
        grid.main(["-m", "hydra/launcher=submitit_slurm", "method=simclr", "seed=0",
                   f"results_dir={tmp_path}"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: hydra/launcher=submitit_slurm needs SLURM's srun on PATH; run the grid on the "
        "cluster's login node, or on this machine with hydra/launcher=joblib or submitit_local"]
    assert launched == [] and not (tmp_path / "runs").exists()
    assert grid.launcher_problems("joblib") == grid.launcher_problems("submitit_local") == []


@pytest.mark.filterwarnings("ignore:\\s*'hydra/launcher/(joblib|submitit_\\w+)' is validated")
@pytest.mark.parametrize("argv, line", [
    (["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=-1", "seed=0"],
     "invalid hydra.launcher.timeout_min=-1; it must be a whole number >= 1"),
    (["hydra/launcher=joblib", "hydra.launcher.n_jobs=0", "seed=0,1"],
     "invalid hydra.launcher.n_jobs=0; it must be a whole number other than 0 (runs at a time; "
     "-1: one per CPU core)"),
    (["seed=range(0)"],
     "the sweep expands to no runs: a swept key has an empty list of values (such as "
     "seed=range(0)); give each swept key at least one value"),
], ids=["local-timeout", "joblib-n_jobs", "empty-sweep"])
def test_bad_launcher_settings_and_empty_sweeps_are_one_line_before_anything(
        tmp_path, monkeypatch, capsys, argv, line):
    import sys

    started: list[str] = []
    monkeypatch.setattr(grid, "start_joblib_workers", lambda node: started.append("pool"))
    monkeypatch.setattr(grid, "_hydra_main", lambda: started.append(" ".join(sys.argv[1:])))
    with pytest.raises(SystemExit) as exit_info:
        grid.main(["-m", "method=pixels", *argv, f"results_dir={tmp_path}"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {line}"]
    assert started == [] and list(tmp_path.iterdir()) == []


def test_launcher_setting_problems_take_null_and_name_each_bad_value():
    from eval.grid import launcher_setting_problems

    defaults = {"timeout_min": 240, "nodes": 1, "tasks_per_node": 1, "cpus_per_task": None,
                "gpus_per_node": 0, "mem_gb": None, "array_parallelism": 256,
                "signal_delay_s": 0, "max_num_timeout": 0}
    assert launcher_setting_problems("submitit_slurm", defaults) == []
    bad = {**defaults, "array_parallelism": 0, "mem_gb": 0, "nodes": True, "signal_delay_s": -1}
    assert launcher_setting_problems("submitit_slurm", bad) == [
        "invalid hydra.launcher.nodes=True; it must be a whole number >= 1",
        "invalid hydra.launcher.mem_gb=0; it must be a whole number >= 1",
        "invalid hydra.launcher.array_parallelism=0; it must be a whole number >= 1",
        "invalid hydra.launcher.signal_delay_s=-1; it must be a whole number >= 0"]
    # submitit_local has no SLURM-only settings; joblib's n_jobs may be negative, not 0
    assert launcher_setting_problems("submitit_local", {"array_parallelism": 0}) == []
    assert launcher_setting_problems("joblib", {"n_jobs": -1}) == []
    assert launcher_setting_problems("basic", {}) == []


def test_a_cuda_index_beyond_the_devices_is_refused(monkeypatch):
    import torch

    from engine.distributed import DistributedError, pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    assert pick_device("cuda", local_rank=3) == torch.device("cuda", 1)
    with pytest.raises(DistributedError) as error:
        pick_device("cuda:2")
    assert str(error.value) == ("trainer.device='cuda:2' but this machine has 2 CUDA device(s); "
                                "valid: auto, cpu, cuda, cuda:0 to cuda:1")


def test_smoke_is_a_flag_outside_the_run_hash(tmp_path):
    from engine.config import ConfigError, resolve_run_config
    from eval.records import run_dir_for
    from tests.conftest import compose_config

    plain = resolve_run_config(compose_config([f"results_dir={tmp_path}"]))
    smoke = resolve_run_config(compose_config([f"results_dir={tmp_path}", "smoke=true"]))
    assert plain["smoke"] is False and smoke["smoke"] is True
    assert run_dir_for(plain) == run_dir_for(smoke)
    with pytest.raises(ConfigError, match=r"invalid smoke='yes'; it must be true or false"):
        resolve_run_config(compose_config(["smoke=yes"]))


def test_grid_module_keeps_a_single_entry_point():
    # submitit pickles run_one by reference: it must stay importable under eval.grid
    assert grid.run_one.__module__ == "eval.grid"


# --------------------------------------------------------------------------------------------
# smoke mode
# --------------------------------------------------------------------------------------------
def test_smoke_of_one_run_prints_its_line_and_writes_no_run(tmp_path):
    result = run_cli(["eval.grid", "method=moco", "smoke=true", "trainer.batch_size=64",
                      f"results_dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = [x for x in result.stdout.splitlines() if x.startswith("[smoke] ")][:-1]
    assert line.startswith("[smoke] ok    method=moco trainer.batch_size=64 results_dir=")
    assert "ms/step, peak " in line and line.endswith("MiB (cpu, fp32)")
    assert "[smoke] 1 config(s): 1 ok, 0 error" in result.stdout
    assert not (tmp_path / "runs").exists()


def test_smoke_error_is_one_line_and_a_failing_exit_status(tmp_path, monkeypatch, capsys):
    import engine.train
    from tests.conftest import compose_config

    def failing(cfg, steps=3):
        return {"status": "error", "error": "RuntimeError: CUDA out of memory", "step_ms": None,
                "peak_mb": 80000.0, "device": "cuda:0", "precision": "bf16", "compile": True}

    monkeypatch.setattr(engine.train, "smoke_run", failing)
    monkeypatch.setattr(grid, "_smoke_here", [])
    result = grid.run_one(compose_config([f"results_dir={tmp_path}", "smoke=true"]))
    assert result["status"] == "error"
    assert grid.smoke_summary(1, None) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == ["[smoke] error run: RuntimeError: CUDA out of memory (cuda:0, bf16, compiled)",
                   "[smoke] 1 config(s): 0 ok, 1 error"]
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_smoke_of_the_default_grid(tmp_path, capsys):
    """Every config of the default grid, a few steps and a small evaluation each (2 cores: about
    a minute, under the 2-minute target)."""
    import time

    from eval.grid import default_grid_override, expand_sweep

    jobs, _ = expand_sweep([default_grid_override([])])
    start = time.monotonic()
    result = run_cli(["eval.grid", "-m", "smoke=true", f"results_dir={tmp_path}"], timeout=900)
    wall = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-3000:]
    ok = [line for line in result.stdout.splitlines() if line.startswith("[smoke] ok ")]
    assert len(ok) == len(jobs) >= 30
    assert f"[smoke] {len(jobs)} config(s): {len(jobs)} ok, 0 error" in result.stdout
    assert not (tmp_path / "runs").exists()
    with capsys.disabled():
        print(f"\n[smoke] default grid, {len(jobs)} configs: {wall:.0f} s wall")


def test_smoke_summary_repeats_job_lines_only_for_launchers_that_print_elsewhere(tmp_path, capsys,
                                                                                 monkeypatch):
    import json

    assert grid._launcher(["method=simclr", "hydra/launcher=joblib"]) == "joblib"
    assert grid._launcher(["method=simclr"]) == "basic"
    assert grid._launcher(["hydra/launcher=submitit_slurm"]) == "submitit_slurm"
    result = {"status": "ok", "job": "seed=0", "step_ms": 12.0, "peak_mb": 100.0, "device": "cpu",
              "precision": "fp32", "compile": False}
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / grid.SMOKE_FILE).write_text(json.dumps(result))
    monkeypatch.setattr(grid, "_smoke_here", [])
    assert grid.smoke_summary(1, tmp_path, echo=False) == 0
    assert capsys.readouterr().out.splitlines() == ["[smoke] 1 config(s): 1 ok, 0 error"]
    assert grid.smoke_summary(1, tmp_path, echo=True) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[smoke] ok    seed=0: 12 ms/step") and len(out) == 2


# --------------------------------------------------------------------------------------------
# job order under the joblib launcher: the longest runs first
# --------------------------------------------------------------------------------------------
def test_preflight_sizes_each_job_by_its_methods_parameters(tmp_path):
    jobs = [[f"method={m}", "seed=0"] for m in ("pixels", "simclr", "all4one", "nnclr")]
    sizes: dict[str, int] = {}
    configs = _configs(jobs, tmp_path)
    assert preflight(configs, sizes=sizes) == []
    size = {label.split("method=")[1].split()[0]: n for label, n in sizes.items()}
    assert set(size) == {"pixels", "simclr", "all4one", "nnclr"}
    assert size["pixels"] == 0  # a reference row trains nothing
    # digits' test_resnet (0.37 M) with SimCLR's 2048-wide projector; NNCLR's adds a 4096-wide
    # predictor; All4One's two predictors, transformer and momentum copy
    assert 1.0e6 < size["simclr"] < 1.2e6
    assert 7.0e6 < size["nnclr"] < 8.0e6
    assert 1.5e7 < size["all4one"] < 1.7e7


def test_method_choice_is_the_last_method_override_of_a_job():
    assert grid.method_choice(["seed=0", "method=moco", "+method=moco_cld_base"]) == "moco_cld_base"
    assert grid.method_choice(["seed=0", "method.temperature=0.2"]) is None


def test_longest_first_orders_the_method_sweep_and_nothing_else():
    jobs = [[f"seed={s}", f"method={m}"] for s in (0, 1) for m in ("pixels", "simclr", "all4one",
                                                                   "moco")]
    sizes = {f"seed={s} method={m}": n for s in (0, 1)
             for m, n in (("pixels", 0), ("simclr", 1_095_600), ("all4one", 16_402_016),
                          ("moco", 1_095_600))}
    argv = ["-m", "hydra/launcher=joblib", "method=pixels,simclr,all4one,moco", "seed=0,1",
            "trainer.epochs=1"]
    assert grid.longest_first(argv, jobs, sizes) == [
        "-m", "hydra/launcher=joblib", "method=all4one,simclr,moco,pixels", "seed=0,1",
        "trainer.epochs=1",  # equal sizes (simclr, moco) keep their order
    ]
    assert grid.longest_first(["-m", "method=simclr", "seed=0,1"], jobs, sizes) == [
        "-m", "method=simclr", "seed=0,1"]  # no method sweep: unchanged
    assert grid.longest_first(["-m", "+method=simclr,all4one"], jobs, sizes) == [
        "-m", "+method=all4one,simclr"]


# eval.grid silences hydra's notice that our joblib.yaml is merged onto the plugin's schema;
# pytest resets warning filters for each test, so the test says it again.
@pytest.mark.filterwarnings("ignore:\\s*'hydra/launcher/joblib' is validated")
@pytest.mark.parametrize("launcher, expected", [("joblib", "method=all4one,nnclr,simclr"),
                                                ("basic", "method=simclr,nnclr,all4one")])
def test_the_joblib_launcher_gets_the_largest_methods_first(tmp_path, monkeypatch, launcher,
                                                            expected):
    import sys

    launched: list[list[str]] = []
    started: list[str] = []

    def start_workers(node):  # the pool itself: test_the_joblib_pool_started_early_runs_the_jobs
        started.append(node._target_)
        return (pid for pid in ())

    monkeypatch.setattr(grid, "start_joblib_workers", start_workers)
    monkeypatch.setattr(grid, "_hydra_main", lambda: launched.append(list(sys.argv[1:])))
    monkeypatch.setattr(sys, "argv", ["grid"])
    grid.main(["-m", f"hydra/launcher={launcher}", "method=simclr,nnclr,all4one", "seed=0,1",
               f"results_dir={tmp_path}"])
    assert len(launched) == 1
    assert [a for a in launched[0] if a.startswith("method=")] == [expected]
    assert [t.rsplit(".", 1)[-1] for t in started] == (["JoblibLauncher"] if launcher == "joblib"
                                                        else [])
    assert not (tmp_path / "runs").exists()


# the pool of the joblib launcher is started, and one worker's imports done, during pre-flight
_POOL_SCRIPT = """
import json, os, sys, time
from hydra.utils import instantiate
from hydra_plugins.hydra_joblib_launcher._core import process_joblib_cfg
from joblib import Parallel, delayed
from eval.grid import _plan_sweep, start_joblib_workers, stop_workers, wait_for_workers

_, _, node = _plan_sweep(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "method=pixels"])
wait_for_workers(start_joblib_workers(node))

def probe():
    time.sleep(0.5)
    return os.getpid(), "engine.train" in sys.modules

settings = instantiate(node).joblib  # what the launcher hands to Parallel (its launch())
settings["backend"] = "loky"
process_joblib_cfg(settings)
results = Parallel(**settings)(delayed(probe)() for _ in range(4))
# a grid that fails its pre-flight stops the pool at once
tic = time.perf_counter()
stop_workers(start_joblib_workers(node))
stopped_in = time.perf_counter() - tic
alive = []
for pid, _ in results:
    try:
        os.kill(pid, 0)
        alive.append(pid)
    except ProcessLookupError:
        pass
print(json.dumps([results, alive, stopped_in]))
"""


def test_the_joblib_pool_started_early_runs_the_jobs():
    # in its own process: the pool would outlive the test in this one
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    done = subprocess.run([sys.executable, "-c", _POOL_SCRIPT], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    results, alive, stopped_in = json.loads(done.stdout.strip().splitlines()[-1])
    # the launcher's Parallel reused the pool: a worker already holds a run's imports
    assert any(imported for _, imported in results), results
    assert len({pid for pid, _ in results}) <= 2
    assert alive == [] and stopped_in < 2.0  # not after the worker's imports (~4 s)


@pytest.mark.filterwarnings("ignore:\\s*'hydra/launcher/joblib' is validated")
def test_one_job_at_a_time_starts_no_pool(monkeypatch):
    import joblib

    def refuse(*args, **kwargs):
        raise AssertionError("no pool for n_jobs=1")

    monkeypatch.setattr(joblib, "Parallel", refuse)
    _, _, node = grid._plan_sweep(["hydra/launcher=joblib", "hydra.launcher.n_jobs=1",
                                   "method=pixels"])
    workers = grid.start_joblib_workers(node)
    assert list(workers) == []
    grid.stop_workers(workers)


# hydra's sweeper does not compose again the jobs that check_grid composed
def test_hydra_validates_only_the_jobs_that_check_grid_did_not(monkeypatch):
    from hydra.core.plugins import Plugins

    Plugins.instance()  # hydra executes its plugin modules anew on the first call
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    seen: list[list[list[str]]] = []
    monkeypatch.setattr(BasicSweeper, "validate_batch_is_legal",
                        lambda self, batch: seen.append([list(job) for job in batch]))
    jobs = [["hydra/launcher=joblib", "seed=0", "method=simclr"],
            ["hydra/launcher=joblib", "seed=1", "method=simclr"]]
    other = ["seed=2", "method=simclr"]
    with grid.skip_revalidation(jobs):
        # hydra's own job lists hold the task overrides only
        BasicSweeper.validate_batch_is_legal(None, [["seed=1", "method=simclr"], other,
                                                    ["seed=0", "method=simclr"]])
    assert seen == [[other]]
    BasicSweeper.validate_batch_is_legal(None, [other])  # restored on exit
    assert seen[-1] == [other]
    swept = [["hydra.launcher.n_jobs=1", "seed=0"], ["hydra.launcher.n_jobs=2", "seed=0"]]
    with grid.skip_revalidation(swept):  # a swept hydra setting: every job validated by hydra
        BasicSweeper.validate_batch_is_legal(None, [["seed=0"], ["seed=0"]])
    assert seen[-1] == [["seed=0"], ["seed=0"]]



_REVALIDATION_SCRIPT = """
import sys
from hydra.core.plugins import Plugins
Plugins.instance()  # hydra executes its plugin modules anew on the first call
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
import eval.grid as grid

revalidated, ran = [], []
BasicSweeper.validate_batch_is_legal = lambda self, batch: revalidated.extend(batch)
grid.run_one = lambda cfg: ran.append(cfg.seed)
grid.main(["-m", "method=pixels,random_init", "seed=0,1", "trainer.epochs=2", "dataset=digits", "hydra/launcher=basic",
           "results_dir=" + sys.argv[1]])
print(len(revalidated), sorted(ran))
"""


def test_hydra_sweeper_launches_the_jobs_check_grid_composed(tmp_path):
    # the real sweeper's job lists are check_grid's, so none is composed a second time
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    done = subprocess.run([sys.executable, "-c", _REVALIDATION_SCRIPT, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "0 [0, 0, 1, 1]"
