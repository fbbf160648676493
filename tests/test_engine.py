"""Training engine: resume after a kill, determinism, run keys, records, config errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from engine.config import ConfigError, resolve_run_config
from engine.train import run, run_dir_for
from tests.conftest import REPO

CONFIG_DIR = str(REPO / "configs")
FAST = ["trainer.progress=false", "trainer.batch_size=128", "eval.linear=false"]


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=overrides)


def test_resolution_fills_dataset_defaults_and_method_auto():
    config = resolve_run_config(compose_config(["method=moco"]))
    assert config["trainer"]["epochs"] == 30 and config["trainer"]["batch_size"] == 256
    assert config["backbone"]["name"] == "test_resnet" and config["backbone"]["stem"] == "lowres_pool"
    assert config["method"]["queue_size"] == 1024 and "auto" not in config["method"]
    cifar = resolve_run_config(compose_config(["method=moco", "dataset=cifar10"]))
    assert cifar["method"]["queue_size"] == 4096 and cifar["backbone"]["stem"] == "lowres"
    # an explicit value always wins over the auto table
    explicit = resolve_run_config(compose_config(["method=moco", "method.queue_size=2048"]))
    assert explicit["method"]["queue_size"] == 2048
    base = resolve_run_config(compose_config(["method=moco_cld_base", "dataset=cifar100"]))
    assert base["method"]["optimizer"]["weight_decay"] == 7e-4
    assert base["method"]["queue_size"] == 4096 and base["method"]["head"] == "normlinear"


def test_run_dir_is_keyed_by_seed_and_config():
    a = resolve_run_config(compose_config(["seed=0"]))
    b = resolve_run_config(compose_config(["seed=1"]))
    c = resolve_run_config(compose_config(["seed=0", "method.temperature=0.5"]))
    d = resolve_run_config(compose_config(["seed=0", "trainer.progress=false"]))
    assert len({run_dir_for(a), run_dir_for(b), run_dir_for(c)}) == 3
    assert run_dir_for(a) == run_dir_for(d)  # progress bars do not change results


def test_bad_values_fail_before_training():
    with pytest.raises(ConfigError, match="trainer.epochs=0"):
        resolve_run_config(compose_config(["trainer.epochs=0"]))
    with pytest.raises(ConfigError, match="resnet81"):
        resolve_run_config(compose_config(["backbone.name=resnet81"]))
    with pytest.raises(ValueError, match="invalid method.multiview='pair'"):
        resolve_run_config(compose_config(["method.multiview=pair"]))


def one_epoch_record(tmp_path: Path, name: str, extra: list[str]) -> dict:
    cfg = compose_config([f"results_dir={tmp_path / name}", "trainer.epochs=1", *FAST, *extra])
    return run(cfg)


def test_same_seed_same_record_different_seed_differs(tmp_path):
    first = one_epoch_record(tmp_path, "a", ["seed=3", "trainer.max_steps_per_epoch=3"])
    second = one_epoch_record(tmp_path, "b", ["seed=3", "trainer.max_steps_per_epoch=3"])
    other = one_epoch_record(tmp_path, "c", ["seed=4", "trainer.max_steps_per_epoch=3"])
    assert first["metrics"] == second["metrics"]
    assert first["history"][0]["loss"] == second["history"][0]["loss"]
    assert first["history"][0]["loss"] != other["history"][0]["loss"]
    record_file = Path(first["run_dir"] if "run_dir" in first else "") or None
    assert record_file is not None
    stored = json.loads((run_dir_for(first["config"]) / "record.json").read_text())
    for key in ("config", "seed", "method", "dataset", "backbone", "metrics", "train_seconds",
                "images_per_second", "peak_memory_mb", "git_commit", "packages", "world_size"):
        assert key in stored
    assert stored["metrics"]["knn20_top1"] > 10.0  # far above nothing; chance is 10%
    assert stored["packages"]["torch"] == torch.__version__.split("+")[0] or stored["packages"]["torch"]


def test_finished_run_is_skipped(tmp_path, capsys):
    record = one_epoch_record(tmp_path, "a", ["trainer.max_steps_per_epoch=2"])
    again = one_epoch_record(tmp_path, "a", ["trainer.max_steps_per_epoch=2"])
    assert again == record
    assert "skipping finished run" in capsys.readouterr().out


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    common = ["method=moco", "trainer.epochs=3", "trainer.max_steps_per_epoch=4", *FAST]
    killed_dir = tmp_path / "killed"
    args = [sys.executable, "-m", "eval.grid", f"results_dir={killed_dir}", *common]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    checkpoint = None
    while time.time() < deadline and proc.poll() is None:
        found = list(killed_dir.rglob("checkpoint.pt"))
        if found:
            checkpoint = found[0]
            state = torch.load(checkpoint, map_location="cpu", weights_only=False)
            if state["epoch"] >= 1:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert checkpoint is not None and not (checkpoint.parent / "record.json").exists()
    resumed = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout
    resumed_record = json.loads((checkpoint.parent / "record.json").read_text())
    straight = run(compose_config([f"results_dir={tmp_path / 'straight'}", *common]))
    assert resumed_record["metrics"] == straight["metrics"]
    assert [h["loss"] for h in resumed_record["history"]] == [h["loss"] for h in straight["history"]]
