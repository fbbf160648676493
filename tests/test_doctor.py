"""``python -m eval.doctor``: the environment report, and a non-zero exit where a grid would fail."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest
import torch

import eval.doctor as doctor
from engine.io import cpu_model
from tests.conftest import REPO, run_cli


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    status = doctor.main(argv)
    return status, capsys.readouterr().out


def _write_idx(path: Path, magic: int, dims: tuple[int, ...]) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    count = 1
    for d in dims:
        count *= d
    path.write_bytes(header + bytes(count))


def test_reports_devices_threads_versions_and_data(capsys):
    status, out = _run(capsys, [])
    assert status == 0, out
    assert f"torch threads: {torch.get_num_threads()} intra-op" in out
    assert f"ok    CPU: {cpu_model()}\n" in out
    if not torch.cuda.is_available():
        assert "CUDA not available" in out and "trainer.precision=auto is fp32" in out
        assert "trainer.compile=auto: off on the CPU" in out
    assert "backends: nccl " in out and "gloo yes" in out
    ranges = doctor.compatible_ranges()
    for name in ("torch", "torchvision", "timm"):
        version = importlib.metadata.version(name)
        assert f"ok    {name} {version} (compatible: {ranges[name]})" in out
    assert "ok    digits: found" in out
    assert out.rstrip().endswith("0 problem(s): ready for a grid")


def test_cpu_model_names_the_model_and_the_kernels_instruction_set(tmp_path, monkeypatch):
    """Records once named every CPU "x86_64", so two machines whose kernels round differently
    (the same commit giving other accuracies) looked the same in a table's provenance."""
    capability = torch.backends.cpu.get_cpu_capability()
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Fancy CPU 9000  \n"
                       "processor\t: 1\nmodel name\t: Fancy CPU 9000\n")
    assert cpu_model(cpuinfo) == f"Fancy CPU 9000 ({capability})"
    import platform

    monkeypatch.setattr(platform, "processor", lambda: "")
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    assert cpu_model(tmp_path / "missing") == f"arm64 ({capability})"


def test_the_ranges_are_the_installed_groupbench_requirements():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = {Requirement(d).name: Requirement(d).specifier for d in declared}
    ranges = doctor.compatible_ranges()
    for name in ("torch", "torchvision", "timm"):
        assert SpecifierSet(ranges[name]) == wanted[name], name


def test_a_version_outside_its_range_fails(capsys, monkeypatch):
    ranges = {**doctor.compatible_ranges(), "torch": ">=99"}
    monkeypatch.setattr(doctor, "compatible_ranges", lambda: ranges)
    status, out = _run(capsys, [])
    assert status == 1
    version = importlib.metadata.version("torch")
    assert f"FAIL  torch {version} is outside groupbench's compatible range >=99" in out
    assert out.rstrip().endswith("1 problem(s): a grid would fail here")


def test_lists_the_datasets_found_under_the_data_root(capsys, monkeypatch, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 3), ("t10k", 2)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", 0x803, (n, 28, 28))
        _write_idx(raw / f"{split}-labels-idx1-ubyte", 0x801, (n,))
    monkeypatch.setenv("GROUPBENCH_DATA", str(tmp_path))
    status, out = _run(capsys, [])
    assert status == 0  # a dataset it cannot find is listed, not a failure
    assert f"data root: $GROUPBENCH_DATA = {tmp_path}, exists" in out
    assert f"ok    mnist: found under {tmp_path}" in out
    assert "-     kmnist: not found (kmnist: " in out
    assert "-     cifar10: not found (cifar10: " in out


def test_a_grid_that_would_fail_exits_non_zero(tmp_path):
    result = run_cli(["eval.doctor", "-m", "method=simclr,moco", "dataset=cifar10",
                      f"dataset.root={tmp_path / 'missing'}", f"results_dir={tmp_path / 'out'}"])
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    [line] = [x for x in result.stdout.splitlines() if x.startswith("FAIL")]
    assert line.startswith(f"FAIL  cifar10 root '{tmp_path / 'missing'}' is not a directory")
    assert line.endswith("and 5 more)")  # 2 methods × the default 3 seeds: one line
    assert not (tmp_path / "out").exists()


def test_a_grid_asking_for_cuda_on_a_cpu_machine_fails(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    status, out = _run(capsys, ["trainer.device=cuda", f"results_dir={tmp_path}"])
    assert status == 1
    assert "FAIL  the grid asks for trainer.device=cuda and this machine has no CUDA" in out


def test_a_grid_asking_for_a_gpu_index_the_machine_lacks_fails(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    report = doctor.Report()
    doctor.check_grid(report, ["-m", "trainer.device=cuda:0,cuda:5", "seed=0",
                               f"results_dir={tmp_path}"])
    [failure] = report.failures  # cuda:0 exists
    assert failure.startswith("trainer.device='cuda:5' but this machine has 2 CUDA device(s); "
                              "valid: auto, cpu, cuda, cuda:0 to cuda:1 (grid job ")
    assert "trainer.device=cuda\\:5" in failure and "trainer.device=cuda\\:0" not in failure


@pytest.mark.filterwarnings("ignore:\\s*'hydra/launcher/submitit_slurm' is validated")
def test_a_slurm_grid_without_slurm_commands_fails(tmp_path, monkeypatch):
    import eval.grid as grid

    monkeypatch.setattr(grid.shutil, "which", lambda command: None)
    report = doctor.Report()
    doctor.check_grid(report, ["-m", "hydra/launcher=submitit_slurm", "seed=0",
                               f"results_dir={tmp_path}"])
    assert report.failures == ["hydra/launcher=submitit_slurm needs SLURM's sbatch and srun on "
                               "PATH; run the grid on the cluster's login node, or on this "
                               "machine with hydra/launcher=joblib or submitit_local"]


@pytest.mark.filterwarnings("ignore:\\s*'hydra/launcher/submitit_local' is validated")
def test_out_of_range_launcher_settings_and_an_empty_sweep_fail(tmp_path):
    report = doctor.Report()
    doctor.check_grid(report, ["-m", "hydra/launcher=submitit_local",
                               "hydra.launcher.timeout_min=0", "method=pixels", "seed=range(0)",
                               f"results_dir={tmp_path}"])
    assert report.failures == [
        "invalid hydra.launcher.timeout_min=0; it must be a whole number >= 1",
        "the sweep expands to no runs: a swept key has an empty list of values (such as "
        "seed=range(0)); give each swept key at least one value"]


@pytest.mark.slow
def test_two_process_ddp_step():
    assert doctor.ddp_step("gloo") is None
    if not torch.cuda.is_available():
        problem = doctor.ddp_step("nccl")  # no GPU: the processes fail, and the doctor says how
        assert problem is not None and problem.startswith("rank"), problem


@pytest.mark.filterwarnings("ignore:Device capability of no_such_backend")
def test_ddp_worker_skips_interpreter_teardown_after_a_passing_check(tmp_path, monkeypatch):
    """A passing worker leaves by os._exit(0), after destroying its group: the interpreter's
    teardown could still abort it (gloo's threads) and turn a passing check into a failure.
    A failing check still raises. One process, world size 1, in this process."""
    exits: list[int] = []

    def fake_exit(code: int) -> None:
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(doctor.os, "_exit", fake_exit)
    threads = torch.get_num_threads()  # the worker sets one thread: restored for later tests
    try:
        with pytest.raises(SystemExit):
            doctor._ddp_worker(0, 1, "gloo", str(tmp_path / "init"), str(tmp_path))
        assert exits == [0] and not torch.distributed.is_initialized()
        assert not list(tmp_path.glob("rank*.err"))

        with pytest.raises(Exception, match="no_such_backend"):  # fails before any collective
            doctor._ddp_worker(0, 1, "no_such_backend", str(tmp_path / "init2"), str(tmp_path))
        assert exits == [0] and (tmp_path / "rank0.err").exists()
    finally:
        torch.set_num_threads(threads)


def test_doctor_is_a_module_entry_point():
    assert Path(doctor.__file__).name == "doctor.py" and "eval.doctor" in sys.modules
