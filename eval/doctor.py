"""``python -m eval.doctor``: is this machine ready for a grid? Run it (and a smoke test of the
grid, ``smoke=true``) before a large launch, on the machine or partition the grid will run on.

    python -m eval.doctor                                   # the environment
    python -m eval.doctor -m method=groco dataset=cifar10 seed=0,1,2   # ... and that grid's pre-flight
    python -m eval.doctor --ddp                             # a 2-process DDP step even without 2 GPUs

It reports the devices (CUDA, bf16 support, what ``trainer.precision=auto`` and
``trainer.compile=auto`` resolve to), the distributed backends (NCCL, gloo) and a 2-process DDP step
on two or more GPUs, the threads, the versions of torch, torchvision and timm against the ranges
groupbench was installed with, the data root and which datasets it finds there. Given grid
overrides it also pre-flights that grid (``eval.grid``'s checks: every dataset, backbone, method and
batch size). Each line says ``ok``, ``warn`` or ``FAIL``; the exit status is 1 when anything a grid
needs would fail, else 0.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.io import cpu_model

# The packages whose versions decide whether a run works; their ranges come from groupbench's
# installed metadata (pyproject.toml's dependencies), never from a copy here.
CHECKED_PACKAGES = ("torch", "torchvision", "timm")
DATASET_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "dataset"


@dataclass
class Report:
    lines: list[tuple[str, str]] = field(default_factory=list)  # (status, text)

    def add(self, status: str, text: str) -> None:
        self.lines.append((status, text))
        print(f"{status:4s}  {text}", flush=True)

    def ok(self, text: str) -> None:
        self.add("ok", text)

    def warn(self, text: str) -> None:
        self.add("warn", text)

    def fail(self, text: str) -> None:
        self.add("FAIL", text)

    def section(self, title: str) -> None:
        print(f"\n== {title}", flush=True)

    @property
    def failures(self) -> list[str]:
        return [text for status, text in self.lines if status == "FAIL"]


# --------------------------------------------------------------------------------------------
# platform and threads
# --------------------------------------------------------------------------------------------
def check_platform(report: Report) -> None:
    report.section("platform")
    report.ok(f"python {platform.python_version()} on {platform.platform()}")
    report.ok(f"CPU: {cpu_model()}")
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    report.ok(f"CPU cores: {cores} ({usable} usable by this process)")
    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK") if k in os.environ}
    described = ", ".join(f"{k}={v}" for k, v in env.items()) or "OMP_NUM_THREADS not set"
    report.ok(f"torch threads: {torch.get_num_threads()} intra-op, "
              f"{torch.get_num_interop_threads()} inter-op ({described})")
    if usable and torch.get_num_threads() > usable:
        report.warn(f"{torch.get_num_threads()} intra-op threads on {usable} usable cores: "
                    "oversubscribed (set OMP_NUM_THREADS to the cores you have)")


# --------------------------------------------------------------------------------------------
# devices, precision, compile
# --------------------------------------------------------------------------------------------
def _cpu_bf16_works() -> str | None:
    """None when a bf16-autocast matmul runs on the CPU and gives a finite bf16 result."""
    try:
        x = torch.randn(8, 8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = x @ x
        if y.dtype != torch.bfloat16 or not torch.isfinite(y).all():
            return f"bf16 autocast gave {y.dtype}"
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return f"{type(exc).__name__}: {exc}"
    return None


def check_devices(report: Report) -> None:
    from engine.train import resolve_compile

    report.section("devices")
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        report.ok(f"CUDA {torch.version.cuda}: {count} GPU(s)")
        for i in range(count):
            props = torch.cuda.get_device_properties(i)
            report.ok(f"cuda:{i} {props.name}, compute capability {props.major}.{props.minor}, "
                      f"{props.total_memory / 2**30:.0f} GiB")
        if torch.cuda.is_bf16_supported():
            report.ok("bf16 supported: trainer.precision=auto trains under bf16 autocast")
        else:
            report.warn("no bf16 on this GPU: trainer.precision=auto trains under fp16 autocast "
                        "with gradient scaling")
    else:
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build"
        report.ok(f"CUDA not available (torch is {built}): runs train on the CPU, "
                  "trainer.precision=auto is fp32")
    problem = _cpu_bf16_works()
    if problem is None:
        report.ok("CPU bf16 autocast works (trainer.precision=bf16 on the CPU)")
    else:
        report.warn(f"CPU bf16 autocast does not work ({problem}): use trainer.precision=fp32 "
                    "on the CPU")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        compiled = resolve_compile("auto", device)
    except Exception as exc:  # noqa: BLE001
        report.fail(f"trainer.compile=auto cannot be resolved: {exc}")
        return
    if not compiled:
        why = "off on the CPU" if device.type == "cpu" else "torch.compile is not supported here"
        report.ok(f"trainer.compile=auto: {why}")
        return
    if importlib.util.find_spec("triton") is None:
        report.fail("trainer.compile=auto compiles on CUDA with inductor, which needs triton, and "
                    "triton is not installed: install it or run with trainer.compile=false")
    else:
        report.ok(f"trainer.compile=auto: inductor on {device} (triton "
                  f"{importlib.metadata.version('triton')})")


# --------------------------------------------------------------------------------------------
# distributed
# --------------------------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, backend: str, init_file: str, out_dir: str) -> None:
    """One process of the DDP check: a step of a DDP-wrapped Linear; rank r's input is r + 1, so
    the averaged gradient is known."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    try:
        torch.set_num_threads(1)
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                                world_size=world)
        device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        layer = torch.nn.Linear(4, 1, bias=False).to(device)
        torch.nn.init.ones_(layer.weight)
        model = DistributedDataParallel(layer, device_ids=[rank] if device.type == "cuda" else None)
        model(torch.full((2, 4), float(rank + 1), device=device)).sum().backward()
        # d/dW of sum(W·x) over 2 rows of value r+1 is 2(r+1); DDP averages over the processes.
        expected = 2.0 * sum(r + 1 for r in range(world)) / world
        got = layer.weight.grad.flatten().tolist()
        if any(abs(g - expected) > 1e-5 for g in got):
            raise RuntimeError(f"averaged gradient {got}, expected {expected} everywhere")
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    # The check has passed. The interpreter's own teardown can still abort the process with
    # SIGABRT ("terminate called without an active exception", from the gloo group's threads,
    # after destroy_process_group has returned): a few runs in a hundred here, and the parent
    # would report a working DDP step as failed. Leave without that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def ddp_step(backend: str, world: int = 2, timeout_s: float = 120.0) -> str | None:
    """Run the 2-process DDP step; None when it worked, else the first error line."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="groupbench-doctor-") as tmp:
        init_file = os.path.join(tmp, "init")
        context = mp.start_processes(_ddp_worker, args=(world, backend, init_file, tmp),
                                     nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not context.join(timeout=1):
                if time.monotonic() > deadline:
                    for process in context.processes:
                        process.kill()
                    return f"no result within {timeout_s:.0f} s (a process hangs in a collective)"
        except Exception as exc:  # noqa: BLE001 - a process failed: its own error says why
            for path in sorted(Path(tmp).glob("rank*.err")):
                lines = [x for x in path.read_text().strip().splitlines() if x.strip()]
                if lines:
                    return f"{path.stem}: {lines[-1].strip()}"
            return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
    return None


def check_distributed(report: Report, force_ddp: bool) -> None:
    import torch.distributed as dist

    report.section("distributed")
    if not dist.is_available():
        report.warn("torch.distributed is not available in this build: one process per run only")
        return
    nccl, gloo = dist.is_nccl_available(), dist.is_gloo_available()
    report.ok(f"backends: nccl {'yes' if nccl else 'no'}, gloo {'yes' if gloo else 'no'}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend = "nccl" if gpus else "gloo"
    if not (nccl if backend == "nccl" else gloo):
        report.fail(f"multi-process runs on this machine use {backend}, which this torch lacks")
        return
    if gpus >= 2 or force_ddp:
        start = time.monotonic()
        problem = ddp_step(backend)
        where = "2 GPUs" if backend == "nccl" else "the CPU"
        if problem is None:
            report.ok(f"2-process DDP step with {backend} on {where}: ok "
                      f"({time.monotonic() - start:.1f} s)")
        else:
            report.fail(f"2-process DDP step with {backend} on {where} failed: {problem}")
    else:
        report.ok(f"multi-process runs would use {backend} (the DDP step runs on >= 2 GPUs, or "
                  "with --ddp)")


# --------------------------------------------------------------------------------------------
# versions
# --------------------------------------------------------------------------------------------
def compatible_ranges() -> dict[str, str] | None:
    """{package: specifier} of groupbench's installed requirements; None when not installed."""
    from packaging.requirements import Requirement

    try:
        requires = importlib.metadata.requires("groupbench") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    ranges = {}
    for line in requires:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            ranges[requirement.name.lower()] = str(requirement.specifier)
    return ranges


def check_versions(report: Report) -> None:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    report.section("versions")
    ranges = compatible_ranges()
    if ranges is None:
        report.warn("groupbench is not installed (pip install -e .), so its compatible ranges are "
                    "unknown here")
    for name in CHECKED_PACKAGES:
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            report.fail(f"{name} is not installed (needed: {(ranges or {}).get(name) or 'any'})")
            continue
        wanted = (ranges or {}).get(name)
        if not wanted:
            report.ok(f"{name} {installed}")
            continue
        try:
            inside = SpecifierSet(wanted).contains(Version(installed), prereleases=True)
        except InvalidVersion:
            inside = False
        if inside:
            report.ok(f"{name} {installed} (compatible: {wanted})")
        else:
            report.fail(f"{name} {installed} is outside groupbench's compatible range {wanted}")


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def dataset_roots() -> dict[str, str | None]:
    """Each registered dataset's ``root`` as its config file resolves it here (environment
    variables included), without composing a run."""
    from omegaconf import OmegaConf

    import datasets

    roots = {}
    for name in datasets.list_datasets():
        path = DATASET_CONFIGS / f"{name}.yaml"
        root = OmegaConf.load(path).get("root") if path.exists() else None
        roots[name] = None if root is None else str(root)
    return roots


def check_data(report: Report) -> None:
    import datasets

    report.section("data")
    default = os.environ.get("GROUPBENCH_DATA")
    where = f"$GROUPBENCH_DATA = {default}" if default else "./data ($GROUPBENCH_DATA is not set)"
    root = Path(default or "data")
    status = "exists" if root.is_dir() else "does not exist"
    report.ok(f"data root: {where}, {status}")
    found = []
    for name, dataset_root in dataset_roots().items():
        try:
            datasets.check_dataset(name, dataset_root)
        except Exception as exc:  # noqa: BLE001 - a dataset it cannot find is a line, not an error
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            report.add("-", f"{name}: not found ({first})")
            continue
        found.append(name)
        report.ok(f"{name}: found" + (f" under {dataset_root}" if dataset_root else ""))
    report.ok(f"{len(found)} dataset(s) ready: {', '.join(found) or 'none'}")


# --------------------------------------------------------------------------------------------
# a grid
# --------------------------------------------------------------------------------------------
def check_grid(report: Report, argv: list[str]) -> None:
    from hydra.errors import HydraException

    from eval.grid import (
        USER_ERRORS,
        GridError,
        _is_multirun,
        _launcher,
        _plan_sweep,
        _user_overrides,
        launcher_problems,
        sweep_problems,
    )
    from eval.grid import check_grid as preflight_grid

    report.section("grid")
    overrides = _user_overrides(argv)
    multirun = _is_multirun(argv)
    launcher_name = _launcher(overrides)
    if multirun:
        for problem in launcher_problems(launcher_name):
            report.fail(problem)
    try:
        if multirun:
            jobs, world, launcher = _plan_sweep(overrides)
            for problem in sweep_problems(launcher_name, jobs, launcher):
                report.fail(problem)
        else:
            jobs, world = [overrides], 1
        # with CUDA here, the devices are checked as for a run on this machine (GPU indices)
        configs = preflight_grid(jobs, world, multirun=multirun,
                                 devices_here=torch.cuda.is_available())
    except GridError as exc:
        for line in exc.problems:
            report.fail(line)
        return
    except (HydraException, *USER_ERRORS) as exc:
        report.fail(str(exc))
        return
    devices = sorted({c["trainer"]["device"] for _, c in configs})
    report.ok(f"{len(configs)} run(s) pre-flighted: datasets, backbones, methods and batch sizes "
              f"(trainer.device: {', '.join(devices)})")
    if torch.cuda.is_available():
        return
    wanted = [d for d in devices if d.startswith("cuda")]
    if wanted:
        report.fail(f"the grid asks for trainer.device={wanted[0]} and this machine has no CUDA; "
                    "run the doctor on the GPU nodes (e.g. through srun) or use trainer.device=auto")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval.doctor",
        description="Check this machine (and optionally a grid: pass its overrides, with -m for "
        "a sweep) before a large launch; exit status 1 when a grid would fail.",
    )
    parser.add_argument("--ddp", action="store_true",
                        help="run the 2-process DDP step even with fewer than 2 GPUs (gloo on CPU)")
    parser.add_argument("-m", "--multirun", action="store_true", help="the overrides are a sweep")
    parser.add_argument("overrides", nargs="*", help="grid overrides, as for python -m eval.grid")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    report = Report()
    check_platform(report)
    check_devices(report)
    check_distributed(report, args.ddp)
    check_versions(report)
    check_data(report)
    if args.overrides or args.multirun:
        check_grid(report, [*(["-m"] if args.multirun else []), *args.overrides])
    failures = report.failures
    print(f"\n{len(failures)} problem(s)" + (": a grid would fail here" if failures else
                                               ": ready for a grid"), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    from engine.distributed import skip_exit_collection

    skip_exit_collection()
    sys.exit(main())
