"""``python -m eval.grid``: one run from the config defaults, or a grid with ``-m``.

    python -m eval.grid                                   # one run: simclr on digits, seed 0
    python -m eval.grid -m                                # the default grid (configs/config.yaml)
    python -m eval.grid -m method=simclr,moco seed=0,1,2  # any key can be swept

Before the first run (or SLURM submission), one run or a whole sweep, every config is composed and
validated and the grid is pre-flighted on the CPU: each distinct dataset located and its files
checked, each backbone and method built once, each batch size checked against its dataset. Any
problem stops it with one line per problem and exit status 2, before anything is written under
``results_dir``. A dataset with ``dataset.download=true`` is downloaded then, once for the grid.
Errors that only training can find still leave a failed run record.

``smoke=true`` runs each config of the grid for a few steps and a small evaluation on its real
device, precision and compile settings instead (through any launcher, SLURM included), prints one
line per config and writes no run:

    python -m eval.grid -m method=groco,simclr dataset=cifar10 smoke=true hydra/launcher=submitit_slurm

On a cluster, ``hydra/launcher=submitit_slurm`` submits the grid as one SLURM job array (one task
per run) and ``hydra/launcher=submitit_local`` runs it through submitit on this machine; their
settings are ``hydra.launcher.*`` overrides (configs/hydra/launcher/, slurm/README.md).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import sys
import warnings
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

import methods  # noqa: F401  (registers every method's defaults node before hydra composes)

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)
# configs/hydra/launcher/{submitit_*,joblib}.yaml set our defaults over the plugin's configs of
# the same name, which hydra 1.3 merges onto the plugin's schema (what we want) with a deprecation
# notice.
warnings.filterwarnings(
    "ignore",
    message=r"\s*'hydra/launcher/(submitit_\w+|joblib)' is validated against ConfigStore schema",
)
# Launchers whose jobs print to this process's terminal: the smoke summary does not repeat them.
_SAME_TERMINAL_LAUNCHERS = ("basic", "joblib")
# Launchers whose jobs run on other machines: their trainer.device is not checked here.
_REMOTE_LAUNCHERS = ("submitit_slurm",)


class GridError(ValueError):
    """Problems that stop a grid before its first run: one line each in ``problems``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def _is_multirun(argv: list[str]) -> bool:
    return any(a in ("-m", "--multirun") for a in argv)


def _user_overrides(argv: list[str]) -> list[str]:
    return [a for a in argv if "=" in a and not a.startswith("-")]


def _is_hydra_override(override: str) -> bool:
    """``hydra.launcher.partition=x``, ``+hydra.launcher.additional_parameters.y=z`` or a hydra
    config group such as ``hydra/launcher=submitit_slurm``: launcher settings, not run settings."""
    return re.match(r"[+~]*hydra[./]", override) is not None


def default_grid_override(overrides: list[str]) -> str | None:
    """``method=<the default grid's presets>`` when ``overrides`` choose no method, else None.

    The default grid's presets come from the method registry (``methods.default_grid_presets``:
    every method's default preset, its base presets and the reference rows), never from a list
    kept by hand, so a newly registered method joins the grid by itself.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    if any(p.get_key_element().lstrip("+~") == "method" for p in parsed):
        return None
    from methods import default_grid_presets

    return f"method={','.join(default_grid_presets())}"


def expand_sweep(overrides: list[str]) -> tuple[list[list[str]], int]:
    """Every job's override list of the sweep hydra's basic sweeper would launch, and the number
    of processes each run will have (``tasks_per_node`` × ``nodes`` of a submitit launcher).
    Without a ``method=`` override the sweep is the default grid (``default_grid_override``)."""
    jobs, world, _ = _plan_sweep(overrides)
    return jobs, world


def _plan_sweep(overrides: list[str]) -> tuple[list[list[str]], int, DictConfig]:
    """``expand_sweep``'s jobs and processes per run, and the sweep's ``hydra.launcher`` node."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    default = default_grid_override(overrides)
    overrides = [*overrides, default] if default else list(overrides)
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    fixed = [p.input_line for p in parsed if not p.is_sweep_override()]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        base = compose("config", overrides=fixed, return_hydra_config=True)
    params = OmegaConf.to_container(base.hydra.sweeper.params) or {}
    merged: dict[str, str] = {k: f"{k}={v}" for k, v in params.items()}
    for override in parsed:
        merged[override.get_key_element()] = override.input_line
    parsed_all = parser.parse_overrides(list(merged.values()))
    batches = BasicSweeper.split_arguments(parsed_all, max_batch_size=None)
    launcher = base.hydra.launcher
    world = int(launcher.get("tasks_per_node") or 1) * int(launcher.get("nodes") or 1)
    return [job for batch in batches for job in batch], world, launcher


@contextmanager
def skip_revalidation(jobs: list[list[str]]) -> Iterator[None]:
    """While active, hydra's basic sweeper skips the second composition of the ``jobs`` that
    ``check_grid`` composed and validated (``BasicSweeper.validate_batch_is_legal``, about 80 ms
    a job, 3 s before the default grid's first run). Any other job is still validated, and so is
    every job when a hydra setting is swept, since check_grid composes a job's own config
    without its hydra overrides (the fixed ones are composed with the sweep's base config)."""
    from hydra.core.plugins import Plugins

    Plugins.instance()  # its first call executes the plugin modules anew: their classes change
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    def own(job: Sequence[str]) -> tuple[str, ...]:  # hydra's jobs hold the task overrides only
        return tuple(o for o in job if not _is_hydra_override(o))

    hydra_parts = {tuple(o for o in job if _is_hydra_override(o)) for job in jobs}
    validated = {own(job) for job in jobs} if len(hydra_parts) <= 1 else set()
    original = BasicSweeper.validate_batch_is_legal

    def validate(self: BasicSweeper, batch: Sequence[Sequence[str]]) -> None:
        rest = [job for job in batch if own(job) not in validated]
        if rest:
            original(self, rest)

    BasicSweeper.validate_batch_is_legal = validate  # type: ignore[method-assign]
    try:
        yield
    finally:
        BasicSweeper.validate_batch_is_legal = original  # type: ignore[method-assign]


def _prepare_worker() -> int:
    import engine.train  # noqa: F401  (torch, timm and the methods: a run's imports)

    return os.getpid()


def start_joblib_workers(launcher: DictConfig) -> Generator[int, None, None]:
    """Start the joblib launcher's process pool, one worker with a run's imports done, and return
    at once: a generator that ends when that worker is ready.

    hydra's joblib launcher calls ``joblib.Parallel`` with its settings, and joblib reuses the
    process pool of an earlier ``Parallel`` with the same settings, so the workers started here
    run the grid's jobs. One of them imports what a run needs (about 4 s) while this process
    composes and pre-flights the grid, so the first run starts without that delay. Only one: on
    a machine with two cores, more importing processes would slow the pre-flight by as much.
    Before the launch, ``wait_for_workers``; if nothing is launched, ``stop_workers``. With one
    job at a time joblib runs the jobs in this process, and nothing is started.
    """
    from hydra_plugins.hydra_joblib_launcher._core import process_joblib_cfg
    from joblib import Parallel, delayed, effective_n_jobs

    settings = OmegaConf.to_container(launcher, resolve=True)
    assert isinstance(settings, dict)
    settings.pop("_target_", None)
    settings["backend"] = "loky"  # as the launcher does
    process_joblib_cfg(settings)
    if effective_n_jobs(settings.get("n_jobs")) < 2:
        return (pid for pid in ())
    return Parallel(**settings, return_as="generator")([delayed(_prepare_worker)()])


def wait_for_workers(workers: Generator[int, None, None]) -> None:
    """Wait until ``start_joblib_workers``' worker is ready. A failure there only loses the head
    start: the launcher then starts its own workers and reports any real error."""
    try:
        for _ in workers:
            pass
    except Exception:  # noqa: BLE001  (an optimisation only)
        pass


def stop_workers(workers: Generator[int, None, None]) -> None:
    """Stop ``start_joblib_workers``' pool now (joblib terminates the workers of a generator
    closed early) rather than at exit, after the worker's imports."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # joblib's notice that the task was cancelled
        workers.close()


def _label(job: list[str]) -> str:
    return " ".join(o for o in job if not _is_hydra_override(o))


def _dedupe(found: dict[str, list[str]]) -> list[str]:
    """One line per distinct problem, naming the first grid job it was found in (and how many
    more) where the problem came from a job of a multirun."""
    lines = []
    for message, labels in found.items():
        where = [label for label in labels if label]
        if where:
            more = f" and {len(where) - 1} more" if len(where) > 1 else ""
            message = f"{message} (grid job {where[0]}{more})"
        lines.append(message)
    return lines


def resolve_jobs(
    jobs: list[list[str]], world: int = 1, *, multirun: bool = True
) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """Compose and resolve every job; (label, resolved config) of the valid ones and one line per
    distinct problem of the others (unknown keys and names, invalid values)."""
    from engine.config import resolve_run_config

    resolved: list[tuple[str, dict[str, Any]]] = []
    found: dict[str, list[str]] = {}
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for job in jobs:
            label = _label(job) if multirun else ""
            try:
                cfg = compose("config", overrides=[o for o in job if not _is_hydra_override(o)])
                config = resolve_run_config(cfg)
            except (*USER_ERRORS, HydraException) as exc:
                found.setdefault(" ".join(str(exc).split()), []).append(label)  # one line
                continue
            if world > 1:  # as engine.train.run keys the run
                config["trainer"]["world_size"] = world
            resolved.append((label, config))
    return resolved, _dedupe(found)


def _frozen(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def preflight(
    configs: list[tuple[str, dict[str, Any]]], world: int = 1, sizes: dict[str, int] | None = None,
    devices_here: bool = False, downloads: bool = False,
) -> list[str]:
    """What can fail at the start of a run, checked once per distinct setting, on the CPU, before
    the first run (or SLURM submission): each dataset is located and its files checked
    (``datasets.check_dataset``), each backbone built for its dataset's images, each method built
    on it, each batch size checked against the dataset, the processes and the method
    (``engine.train.check_batch_fits``), each method's augmentations resolved for the dataset.
    Returns one line per distinct problem (the bad value and what was expected); nothing is
    written under ``results_dir``.

    ``downloads``: a dataset with ``dataset.download=true`` is downloaded here, once for the grid
    (torchvision skips files already there and intact), and then checked like any other: the runs
    find it in place instead of each fetching it, side by side into the same folder, and a
    failed download is one problem line before any run. Without it (``eval.doctor``), such a
    dataset is only checked for a root: its size, and so its batch checks, are unknown.

    ``sizes``, when given, receives each job's (label's) parameter count of its method built on
    its backbone, momentum copies included, and 0 for a reference row (``longest_first``).

    ``devices_here``: the runs start on this machine, so each ``trainer.device`` must exist here
    (``pick_device``). Off for jobs sent to other machines: a login node has no GPUs."""
    import torch

    import datasets
    from backbones import build_backbone
    from datasets.views import view_config
    from engine.config import method_options
    from engine.distributed import DistributedError, pick_device
    from engine.train import TrainingError, check_batch_fits, resolve_compile
    from methods import build_method

    found: dict[str, list[str]] = {}
    done: dict[str, tuple[Any, str | None]] = {}  # key -> (what was built, its problem)

    def once(key: str, label: str, build: Any, what: str = "") -> Any:
        """``build()`` the first time ``key`` is seen; every job that meets a failed key is
        counted against its one problem line."""
        if key not in done:
            try:
                done[key] = (build(), None)
            except Exception as exc:  # noqa: BLE001 - every failure is reported, none raised
                text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                if not isinstance(exc, (*USER_ERRORS, TrainingError, DistributedError)):
                    text = f"{type(exc).__name__}: {text}"  # not one of ours: name its type
                done[key] = (None, f"{what}{text}")
        built, message = done[key]
        if message is not None:
            found.setdefault(message, []).append(label)
        return built

    def load(data: dict[str, Any]) -> Any:
        name, options = data["name"], data.get("options") or {}
        download = bool(data.get("download"))
        datasets.check_dataset(name, data.get("root"), download, **options)
        if download and not downloads:
            return None  # loading would download it
        return datasets.load_dataset(name, data.get("root"), download, **options)

    by_method: dict[str, list[tuple[str, dict[str, Any], Any, Any, str]]] = {}
    with torch.random.fork_rng(devices=[]):  # the runs seed themselves; leave no trace anyway
        for label, config in configs:
            data, trainer = config["dataset"], config["trainer"]
            if trainer["compile"] is True:
                once("compile", label, lambda: resolve_compile(True, torch.device("cpu")))
            if devices_here:
                once(_frozen(["device", trainer["device"]]), label,
                     lambda device=trainer["device"]: pick_device(device))
            data_key = _frozen(["dataset", data["name"], data.get("root"),
                                bool(data.get("download")), data.get("options") or {}])
            # DatasetError messages name the dataset and the root they were given
            bundle = once(data_key, label, lambda data=data: load(data))
            if bundle is None:
                continue
            spec = config["backbone"]
            backbone_key = _frozen(["backbone", spec, bundle.channels, bundle.image_size])
            backbone = once(
                backbone_key, label,
                lambda spec=spec, bundle=bundle: build_backbone(
                    spec["name"], in_chans=bundle.channels, stem=spec["stem"],
                    image_size=bundle.image_size, patch_size=spec.get("patch_size"),
                    **(spec.get("kwargs") or {}),
                ),
                f"backbone {spec['name']} (stem {spec['stem']}) on {bundle.name}'s "
                f"{bundle.channels}-channel {bundle.image_size} px images: ",
            )
            if backbone is None:
                continue
            method_key = _frozen(["method", config["method"], backbone_key, data_key,
                                  config["augment"]])
            by_method.setdefault(method_key, []).append((label, config, bundle, backbone, data_key))

        # One method at a time, each built once on its own copy of the backbone (a method may
        # rework it: split BN) and dropped once its jobs' batch sizes are checked.
        for method_key, jobs in by_method.items():
            label, config, bundle, backbone, _ = jobs[0]
            method_cfg = config["method"]
            augment = config["augment"]

            def make_method(method_cfg=method_cfg, backbone=backbone, bundle=bundle,
                            augment=augment) -> Any:
                method = build_method(
                    method_cfg["name"], copy.deepcopy(backbone), **method_options(method_cfg)
                )
                for kind in method.augmentation_kinds(augment, bundle.name):
                    view_config(bundle.name, kind, bundle.image_size)
                return method

            what = f"method {method_cfg['name']} (preset {method_cfg.get('preset')}): "
            for label, config, bundle, _, _ in jobs:
                method = once(method_key, label, make_method, what)
                if method is None:
                    continue
                trains = getattr(method, "trains", True)
                if sizes is not None:
                    sizes[label] = sum(p.numel() for p in method.parameters()) if trains else 0
                if not trains:
                    continue  # a reference row (pixels, random_init) takes no training batch
                trainer = config["trainer"]
                batch_key = _frozen(["batch", method_key, trainer["batch_size"],
                                     trainer["grad_accum_steps"]])
                once(batch_key, label, lambda method=method, trainer=trainer, bundle=bundle:
                     check_batch_fits(method, trainer, len(bundle.pretrain), bundle.name, world))
            if done[method_key][1] is None:
                done[method_key] = (None, None)  # keep the verdict, not the model
    return _dedupe(found)


def check_grid(
    jobs: list[list[str]], world: int = 1, *, multirun: bool = True,
    sizes: dict[str, int] | None = None, devices_here: bool = False, downloads: bool = False,
) -> list[tuple[str, dict[str, Any]]]:
    """Resolve every job and pre-flight the grid (``resolve_jobs``, ``preflight``, which fills
    ``sizes``, checks the devices when ``devices_here`` and downloads when ``downloads``); the
    (label, resolved config) of every job, or GridError with one line per distinct problem."""
    configs, problems = resolve_jobs(jobs, world, multirun=multirun)
    problems += preflight(configs, world, sizes, devices_here, downloads)
    if problems:
        raise GridError(problems)
    return configs


def method_choice(job: list[str]) -> str | None:
    """The ``method=`` choice of one job's overrides (the last one wins, as in hydra), or None."""
    values = [o.split("=", 1)[1] for o in job if o.split("=", 1)[0].lstrip("+~") == "method"]
    return values[-1] if values else None


def longest_first(argv: list[str], jobs: list[list[str]], sizes: dict[str, int]) -> list[str]:
    """``argv`` with its swept method list in decreasing order of the methods' parameter counts
    (``sizes``, per job label, from ``preflight``); equal counts keep their order.

    hydra's joblib launcher starts the jobs in sweep order as its workers free up, so a grid
    ends sooner when its longest runs start first rather than last (longest-processing-time-first
    scheduling). A method's parameter count, heads and momentum copies included, stands in for
    its run time: on the default digits grid All4One (16 M parameters) takes 6× a SimCLR run
    (1.1 M), NNCLR (7.4 M) 2×, and the reference rows (0) a second or two."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cost: dict[str, int] = {}
    for job in jobs:
        value = method_choice(job)
        if value is not None:
            cost[value] = max(cost.get(value, 0), sizes.get(_label(job), 0))
    parser = OverridesParser.create()
    ordered = list(argv)
    for i, arg in enumerate(argv):
        if "=" not in arg or arg.startswith("-"):
            continue
        override = parser.parse_override(arg)
        if override.get_key_element().lstrip("+~") != "method" or not (
            override.is_sweep_override() and override.is_discrete_sweep()
        ):
            continue
        values = list(override.sweep_string_iterator())
        values.sort(key=lambda v: -cost.get(v, 0))
        ordered[i] = f"{arg.split('=', 1)[0]}={','.join(values)}"
    return ordered


def count_finished(configs: list[tuple[str, dict[str, Any]]]) -> int:
    """How many of the grid's runs already have a finished record (they will be skipped)."""
    from eval.records import finished_record, run_dir_for

    return sum(finished_record(run_dir_for(config)) is not None for _, config in configs)


# --------------------------------------------------------------------------------------------
# smoke mode (smoke=true): a few steps and a small evaluation per config, nothing written to runs/
# --------------------------------------------------------------------------------------------
SMOKE_FILE = "smoke.json"  # each job's result, in its hydra output directory
_smoke_here: list[dict[str, Any]] = []  # results of the smoke jobs run in this process


def smoke_line(label: str, result: dict[str, Any]) -> str:
    """One line per config: ok/error, step time, peak memory, and where and how it ran."""
    how = f"{result.get('device')}, {result.get('precision')}" + (
        ", compiled" if result.get("compile") else ""
    )
    label = label or "run"
    if result.get("status") == "ok":
        step = result.get("step_ms")
        steps = f"{step:.0f} ms/step" if step is not None else "no training step (reference)"
        peak = result.get("peak_mb")
        memory = f"peak {peak:.0f} MiB" if peak is not None else "peak memory unknown"
        return f"[smoke] ok    {label}: {steps}, {memory} ({how})"
    return f"[smoke] error {label}: {result.get('error')} ({how})"


def _job_label() -> str:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return ""
    return " ".join(o for o in HydraConfig.get().overrides.task
                    if not (_is_hydra_override(o) or o.startswith("smoke=")))


def _smoke_one(cfg: DictConfig) -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig

    from engine.io import atomic_write_json
    from engine.train import smoke_run

    label = _job_label()
    try:
        result = dict(smoke_run(cfg))
    except Exception as exc:  # noqa: BLE001 - a smoke test reports, it does not stop the grid
        error = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        result = {"status": "error", "error": f"{type(exc).__name__}: {error}", "step_ms": None,
                  "peak_mb": None, "device": None, "precision": None, "compile": None}
    result["job"] = label
    print(smoke_line(label, result), flush=True)
    _smoke_here.append(result)
    if HydraConfig.initialized():
        atomic_write_json(Path(HydraConfig.get().runtime.output_dir) / SMOKE_FILE, result)
    return result


def smoke_summary(n_jobs: int, sweep_dir: Path | None, echo: bool = True) -> int:
    """Print the jobs' lines (with ``echo``: jobs whose output went elsewhere, submitit's) and a
    total; the exit status."""
    if sweep_dir is not None and len(_smoke_here) < n_jobs:
        results = []
        for path in sorted(sweep_dir.glob(f"*/{SMOKE_FILE}"), key=lambda p: int(p.parent.name)
                           if p.parent.name.isdigit() else 0):
            try:
                results.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        for result in results if echo else ():
            print(smoke_line(result.get("job", ""), result))
    else:
        results = list(_smoke_here)
    errors = sum(r.get("status") != "ok" for r in results)
    missing = n_jobs - len(results)
    summary = f"[smoke] {n_jobs} config(s): {len(results) - errors} ok, {errors} error"
    if missing > 0:
        where = f" (see the job logs under {sweep_dir})" if sweep_dir is not None else ""
        summary += f", {missing} without a result{where}"
    print(summary, flush=True)
    return 1 if errors or missing > 0 else 0


def _launcher(overrides: list[str]) -> str:
    """The hydra/launcher chosen on the command line (``basic`` when none is)."""
    chosen = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~")
              == "hydra/launcher" and "=" in o]
    return chosen[-1] if chosen else "basic"


def launcher_problems(launcher: str) -> list[str]:
    """What stops ``hydra/launcher=<launcher>`` on this machine before anything is submitted:
    SLURM's commands, which submitit calls, must be on PATH."""
    if launcher != "submitit_slurm":
        return []
    missing = [command for command in ("sbatch", "srun") if shutil.which(command) is None]
    if not missing:
        return []
    return [f"hydra/launcher=submitit_slurm needs SLURM's {' and '.join(missing)} on PATH; run "
            "the grid on the cluster's login node, or on this machine with "
            "hydra/launcher=joblib or submitit_local"]


class SubmissionRefused(BaseException):
    """sbatch refused the grid's submission; ``problems`` are its lines. A BaseException because
    hydra turns every Exception its launcher raises into a traceback and exit status 1; this one
    passes through to ``main``, which prints one error and exits 2."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _slurm_partitions() -> str | None:
    """SLURM's partitions as ``sinfo`` lists them, or None when it does not answer."""
    import subprocess

    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True,
                             timeout=15)
    except (OSError, subprocess.SubprocessError):
        return None
    names = list(dict.fromkeys(out.stdout.split())) if out.returncode == 0 else []
    return ", ".join(f"{n[:-1]} (the default)" if n.endswith("*") else n for n in names) or None


@contextmanager
def slurm_refusals(n_jobs: int) -> Iterator[None]:
    """While active, an ``sbatch`` that exits non-zero (an unknown partition, a time limit or
    account the cluster refuses, an unreachable controller) raises ``SubmissionRefused`` with
    sbatch's own message and the cluster's partitions, instead of submitit printing that message
    and hydra a traceback. The grid is one job array, so nothing was submitted."""
    import io
    from contextlib import redirect_stderr

    from submitit.core.utils import FailedJobError
    from submitit.slurm.slurm import SlurmExecutor

    submit = SlurmExecutor._submit_command

    def checked(self: SlurmExecutor, command: str) -> Any:
        printed = io.StringIO()  # submitit prints sbatch's stderr itself before raising
        try:
            with redirect_stderr(printed):
                job = submit(self, command)
        except FailedJobError as exc:
            # sbatch's stderr, else its stdout (the CalledProcessError submitit raised from)
            text = str(exc) or getattr(exc.__cause__, "output", None) or printed.getvalue()
            said = [line.strip() for line in str(text).splitlines() if line.strip()] or [
                "it gave no message"]
            partitions = _slurm_partitions()
            where = f"; SLURM's partitions: {partitions}" if partitions else ""
            raise SubmissionRefused(
                [f"sbatch refused the grid's {n_jobs}-job array, so nothing was submitted: "
                 f"{'; '.join(said)} (the hydra.launcher.* settings go to sbatch{where})"]
            ) from exc
        except BaseException:
            sys.stderr.write(printed.getvalue())
            raise
        sys.stderr.write(printed.getvalue())
        return job

    SlurmExecutor._submit_command = checked  # type: ignore[method-assign]
    try:
        yield
    finally:
        SlurmExecutor._submit_command = submit  # type: ignore[method-assign]


# The launchers' whole-number settings that they pass on unchecked, with their least valid value
# (null, where the schema allows it, leaves the choice to the cluster). Out of range, a local
# submitit job is killed at once (timeout_min=0) and sbatch refuses or misreads the array.
_SUBMITIT_MINIMA = {"timeout_min": 1, "nodes": 1, "tasks_per_node": 1, "cpus_per_task": 1,
                    "gpus_per_node": 0, "mem_gb": 1}
_LAUNCHER_MINIMA: dict[str, dict[str, int]] = {
    "submitit_local": _SUBMITIT_MINIMA,
    "submitit_slurm": {**_SUBMITIT_MINIMA, "gpus_per_task": 0, "cpus_per_gpu": 1,
                       "array_parallelism": 1, "signal_delay_s": 0, "max_num_timeout": 0},
}


def launcher_setting_problems(launcher: str, settings: DictConfig | dict[str, Any]) -> list[str]:
    """One line per ``hydra.launcher.*`` value of ``launcher`` (its composed ``settings``) that is
    out of range: the submitit launchers' whole numbers (``_LAUNCHER_MINIMA``), joblib's
    ``n_jobs`` (not 0)."""
    problems = []
    if launcher == "joblib":
        n_jobs = settings.get("n_jobs")
        if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs == 0:
            problems.append(f"invalid hydra.launcher.n_jobs={n_jobs!r}; it must be a whole "
                            "number other than 0 (runs at a time; -1: one per CPU core)")
    for key, least in _LAUNCHER_MINIMA.get(launcher, {}).items():
        value = settings.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            problems.append(f"invalid hydra.launcher.{key}={value!r}; it must be a whole number "
                            f">= {least}")
    return problems


def sweep_problems(launcher: str, jobs: list[list[str]], settings: DictConfig) -> list[str]:
    """What stops a planned sweep (``_plan_sweep``) before anything starts: its launcher's
    settings out of range (``launcher_setting_problems``) and a sweep of no job at all."""
    problems = launcher_setting_problems(launcher, settings)
    if not jobs:
        problems.append("the sweep expands to no runs: a swept key has an empty list of values "
                        "(such as seed=range(0)); give each swept key at least one value")
    return problems


def _sweep_dir(overrides: list[str]) -> str:
    """hydra.sweep.dir resolved once (its ${now:...} included), so that every job of the sweep and
    this process agree on it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    fixed = [p.input_line for p in parsed if not p.is_sweep_override()]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        base = compose("config", overrides=fixed, return_hydra_config=True)
    return str(OmegaConf.select(base, "hydra.sweep.dir"))


def run_one(cfg: DictConfig) -> float | dict[str, Any] | None:
    if cfg.get("smoke"):
        return _smoke_one(cfg)
    from engine.train import run

    record = run(cfg)
    return record["metrics"].get("knn20_top1")


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def _hydra_main(cfg: DictConfig) -> float | dict[str, Any] | None:
    return run_one(cfg)


# hydra's own commands (help, config printing, ...): nothing runs, so nothing is pre-flighted
_HYDRA_COMMANDS = {"-h", "--help", "--hydra-help", "-i", "--info", "-c", "--cfg", "-sc",
                   "--shell-completion"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if _HYDRA_COMMANDS.intersection(argv):
        sys.argv = [sys.argv[0], *argv]
        _hydra_main()
        return
    workers: Generator[int, None, None] | None = None
    try:
        multirun = _is_multirun(argv)
        # a single run runs here, in this process
        launcher_name = _launcher(_user_overrides(argv)) if multirun else "basic"
        joblib = launcher_name == "joblib"
        if multirun:
            problems = launcher_problems(launcher_name)
            if problems:
                raise GridError(problems)
            # hydra's sweeper launches the default grid's methods only when they are on the
            # command line (configs/config.yaml sweeps the seeds alone)
            default = default_grid_override(_user_overrides(argv))
            argv = [*argv, default] if default else argv
            jobs, world, launcher = _plan_sweep(_user_overrides(argv))
            problems = sweep_problems(launcher_name, jobs, launcher)
            if problems:
                raise GridError(problems)
            if joblib:
                workers = start_joblib_workers(launcher)
        else:
            jobs, world = [_user_overrides(argv)], int(os.environ.get("WORLD_SIZE") or 1)
        # Every config resolved and pre-flighted before the first run or SLURM submission; the
        # devices too unless the jobs go to SLURM's nodes; downloads done here, once (on a
        # cluster, the login node's network and the shared data root).
        sizes: dict[str, int] = {}
        configs = check_grid(jobs, world, multirun=multirun, sizes=sizes,
                             devices_here=launcher_name not in _REMOTE_LAUNCHERS, downloads=True)
        if joblib:
            argv = longest_first(argv, jobs, sizes)
        smoke = any(config.get("smoke") for _, config in configs)
        sweep_dir = None
        if multirun and smoke:
            sweep_dir = Path(_sweep_dir(_user_overrides(argv)))
            argv = [a for a in argv if not a.startswith("hydra.sweep.dir=")]
            argv.append(f"hydra.sweep.dir={sweep_dir}")
            print(f"[groupbench] grid of {len(jobs)} configs validated; smoke test of each "
                  "(no run is written)", file=sys.stderr)
        elif multirun:
            n_finished = count_finished(configs)
            done = f" ({n_finished} already finished)" if n_finished else ""
            print(f"[groupbench] grid of {len(jobs)} runs validated{done}", file=sys.stderr)
        if workers is not None:
            wait_for_workers(workers)
        sys.argv = [sys.argv[0], *argv]
        refusals = slurm_refusals(len(jobs)) if launcher_name == "submitit_slurm" else (
            nullcontext())
        with skip_revalidation(jobs), refusals:
            _hydra_main()
        if smoke:
            echo = launcher_name not in _SAME_TERMINAL_LAUNCHERS
            sys.exit(smoke_summary(len(jobs), sweep_dir, echo=echo))
    except (GridError, SubmissionRefused) as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    except HydraException as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        if workers is not None:
            stop_workers(workers)  # no-op once they were waited for


if __name__ == "__main__":
    # Run the copy of this module imported under its own name rather than ``__main__``: submitit
    # then pickles the task by reference (``eval.grid.run_one``), so a job imports this module,
    # and its warning filter, before hydra composes the job's config.
    from engine.distributed import skip_exit_collection
    from eval.grid import main as _main

    skip_exit_collection()
    _main()
