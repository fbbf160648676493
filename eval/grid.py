"""``python -m eval.grid``: one run from the config defaults, or a grid with ``-m``.

    python -m eval.grid                                   # one run: simclr on digits, seed 0
    python -m eval.grid -m                                # the default grid (configs/config.yaml)
    python -m eval.grid -m method=simclr,moco seed=0,1,2  # any key can be swept

Before a multirun starts, every config of the sweep is composed and validated, so a typo in the
last value of a sweep fails before the first run trains.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def _is_multirun(argv: list[str]) -> bool:
    return any(a in ("-m", "--multirun") for a in argv)


def _user_overrides(argv: list[str]) -> list[str]:
    return [a for a in argv if "=" in a and not a.startswith("-")]


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Every job's override list of the sweep hydra's basic sweeper would launch."""
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
    return [job for batch in batches for job in batch]


def validate_sweep(overrides: list[str]) -> int:
    """Compose and resolve every job of the sweep; return the number of jobs."""
    from engine.config import resolve_run_config

    jobs = expand_sweep(overrides)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for job in jobs:
            cfg = compose("config", overrides=[o for o in job if not o.startswith("hydra.")])
            try:
                resolve_run_config(cfg)
            except USER_ERRORS as exc:
                raise type(exc)(f"grid job {' '.join(job)}: {exc}") from None
    return len(jobs)


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    from engine.train import run

    record = run(cfg)
    return record["metrics"].get("knn20_top1")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if _is_multirun(argv):
            n_jobs = validate_sweep(_user_overrides(argv))
            print(f"[groupbench] grid of {n_jobs} runs validated", file=sys.stderr)
        sys.argv = [sys.argv[0], *argv]
        _hydra_main()
    except HydraException as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
