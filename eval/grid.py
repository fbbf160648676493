"""``python -m eval.grid``: one run from the config defaults, or a grid with ``-m``.

    python -m eval.grid                                   # one run: simclr on digits, seed 0
    python -m eval.grid -m                                # the default grid (configs/config.yaml)
    python -m eval.grid -m method=simclr,moco seed=0,1,2  # any key can be swept

Before a multirun starts, every config of the sweep is composed and validated, so a typo in the
last value of a sweep fails before the first run trains.

On a cluster, ``hydra/launcher=submitit_slurm`` submits the grid as one SLURM job array (one task
per run) and ``hydra/launcher=submitit_local`` runs it through submitit on this machine; their
settings are ``hydra.launcher.*`` overrides (configs/hydra/launcher/, slurm/README.md).
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)
# configs/hydra/launcher/submitit_*.yaml set our defaults over the plugin's configs of the same
# name, which hydra 1.3 merges onto the plugin's schema (what we want) with a deprecation notice.
warnings.filterwarnings(
    "ignore", message=r"\s*'hydra/launcher/submitit_\w+' is validated against ConfigStore schema"
)


def _is_multirun(argv: list[str]) -> bool:
    return any(a in ("-m", "--multirun") for a in argv)


def _user_overrides(argv: list[str]) -> list[str]:
    return [a for a in argv if "=" in a and not a.startswith("-")]


def _is_hydra_override(override: str) -> bool:
    """``hydra.launcher.partition=x``, ``+hydra.launcher.additional_parameters.y=z`` or a hydra
    config group such as ``hydra/launcher=submitit_slurm``: launcher settings, not run settings."""
    return re.match(r"[+~]*hydra[./]", override) is not None


def expand_sweep(overrides: list[str]) -> tuple[list[list[str]], int]:
    """Every job's override list of the sweep hydra's basic sweeper would launch, and the number
    of processes each run will have (``tasks_per_node`` × ``nodes`` of a submitit launcher)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

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
    return [job for batch in batches for job in batch], world


def validate_sweep(overrides: list[str]) -> tuple[int, int]:
    """Compose and resolve every job of the sweep; return (jobs, jobs already finished)."""
    from engine.config import resolve_run_config
    from engine.train import finished_record, run_dir_for

    jobs, world = expand_sweep(overrides)
    finished = 0
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for job in jobs:
            cfg = compose("config", overrides=[o for o in job if not _is_hydra_override(o)])
            try:
                config = resolve_run_config(cfg)
            except USER_ERRORS as exc:
                raise type(exc)(f"grid job {' '.join(job)}: {exc}") from None
            if world > 1:  # as engine.train.run keys the run
                config["trainer"]["world_size"] = world
            finished += finished_record(run_dir_for(config)) is not None
    return len(jobs), finished


def run_one(cfg: DictConfig) -> float | None:
    from engine.train import run

    record = run(cfg)
    return record["metrics"].get("knn20_top1")


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    return run_one(cfg)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if _is_multirun(argv):
            n_jobs, n_finished = validate_sweep(_user_overrides(argv))
            done = f" ({n_finished} already finished)" if n_finished else ""
            print(f"[groupbench] grid of {n_jobs} runs validated{done}", file=sys.stderr)
        sys.argv = [sys.argv[0], *argv]
        _hydra_main()
    except HydraException as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    # Run the copy of this module imported under its own name rather than ``__main__``: submitit
    # then pickles the task by reference (``eval.grid.run_one``), so a job imports this module,
    # and its warning filter, before hydra composes the job's config.
    from eval.grid import main as _main

    _main()
