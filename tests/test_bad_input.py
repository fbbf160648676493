"""Bad input ends in a clear message that names the bad value and what would be valid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from hydra import compose, initialize_config_dir

from backbones import BackboneError
from datasets import DatasetError
from engine.config import ConfigError, resolve_run_config
from engine.io import ResultsDirError, atomic_write_bytes
from engine.train import TrainingError, run, run_dir_for
from eval.knn import knn_top1
from methods import MethodConfigError
from tests.conftest import REPO

CONFIG_DIR = str(REPO / "configs")
FAST = ["trainer.progress=false", "trainer.epochs=1", "trainer.max_steps_per_epoch=1",
        "eval.linear=false"]


def cfg(overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=overrides)


# (overrides, exception, substrings every message must contain)
RESOLVE_CASES = [
    (["dataset.name=cifar11"], ConfigError, ["cifar11", "cifar10", "digits"]),
    (["backbone.name=resnet81"], ConfigError, ["resnet81", "resnet18"]),
    (["backbone.stem=tiny"], ConfigError, ["tiny", "lowres_pool"]),
    (["trainer.epochs=-3"], ConfigError, ["trainer.epochs=-3", ">= 1"]),
    (["trainer.batch_size=0"], ConfigError, ["trainer.batch_size=0"]),
    (["method.temperature=0"], MethodConfigError, ["method.temperature=0", "> 0"]),
    (["method.projector=huge"], MethodConfigError, ["huge", "solo", "groco"]),
    (["method=moco", "method.head=deep"], MethodConfigError, ["deep", "mlp", "normlinear"]),
    (["method.optimizer.name=adam2"], ValueError, ["adam2", "lars", "sgd"]),
    (["method.optimizer.schedule=step"], ValueError, ["step", "warmup_cosine"]),
]


@pytest.mark.parametrize("overrides,error,needles", RESOLVE_CASES)
def test_bad_config_values(overrides, error, needles):
    with pytest.raises(error) as err:
        resolve_run_config(cfg(overrides))
    for needle in needles:
        assert needle in str(err.value)


def test_misspelt_key_is_refused_by_struct_mode():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="epochz"):
        cfg(["trainer.epochz=2"])


RUN_CASES = [
    # dataset path missing
    (["dataset=cifar10", "dataset.root=/nonexistent/cifar"], DatasetError, ["/nonexistent/cifar"]),
    # batch larger than the data set
    (["trainer.batch_size=5000"], TrainingError, ["5000", "1437"]),
    # a queue that is not a multiple of the batch
    (["method=moco", "method.queue_size=1000"], MethodConfigError, ["1000", "256"]),
    # SimCLR's hard-negative control with more negatives than the batch has
    (["method.topk_neg=600", "trainer.batch_size=256"], MethodConfigError, ["600", "510"]),
    # image size too small for the backbone (ImageNet stem on 16-px digits)
    (["backbone.stem=imagenet"], BackboneError, ["16 px", "total stride", "lowres"]),
    # a stem the family does not have
    (["backbone.name=convnext_atto", "backbone.stem=lowres"], BackboneError, ["ResNet family"]),
]


@pytest.mark.parametrize("overrides,error,needles", RUN_CASES)
def test_bad_runs_fail_before_training(tmp_path, overrides, error, needles):
    with pytest.raises(error) as err:
        run(cfg([f"results_dir={tmp_path}", *FAST, *overrides]))
    for needle in needles:
        assert needle in str(err.value)
    assert not list(tmp_path.rglob("checkpoint.pt"))


def test_empty_and_wrong_format_dataset_roots(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(DatasetError, match="data_batch_1"):
        run(cfg([f"results_dir={tmp_path}", *FAST, "dataset=cifar10", f"dataset.root={tmp_path}"]))
    (tmp_path / "stl10_binary").mkdir()
    (tmp_path / "stl10_binary" / "train_X.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(DatasetError):
        run(cfg([f"results_dir={tmp_path}", *FAST, "dataset=stl10", f"dataset.root={tmp_path}"]))


def test_corrupt_checkpoint_is_refused_naming_the_file(tmp_path):
    config = cfg([f"results_dir={tmp_path}", *FAST])
    run_dir = run_dir_for(resolve_run_config(config))
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(TrainingError) as err:
        run(config)
    assert str(run_dir / "checkpoint.pt") in str(err.value)
    assert "trainer.resume=false" in str(err.value)
    # asked to start over, it trains and replaces the checkpoint
    record = run(cfg([f"results_dir={tmp_path}", *FAST, "trainer.resume=false"]))
    assert record["status"] == "finished"


def test_unwritable_results_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ResultsDirError) as err:
        run(cfg([f"results_dir={blocker}/results", *FAST]))
    assert str(blocker) in str(err.value) and "results_dir" in str(err.value)


def test_knn_k_larger_than_bank():
    with pytest.raises(ValueError) as err:
        knn_top1(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), torch.randn(2, 3),
                 torch.zeros(2, dtype=torch.long), k=20)
    assert "20" in str(err.value) and "5" in str(err.value)


def test_killed_writer_leaves_previous_file_intact(tmp_path):
    target = tmp_path / "record.json"
    atomic_write_bytes(target, json.dumps({"version": 1}).encode())
    script = (
        "import sys, time\n"
        "from engine import io\n"
        "real = io.os.fsync\n"
        "def slow(fd):\n"
        "    print('writing', flush=True); time.sleep(60); real(fd)\n"
        "io.os.fsync = slow\n"
        f"io.atomic_write_bytes({str(target)!r}, b'x' * 10_000_000)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "writing"  # the temp file is written, not yet renamed
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(0.1)
    assert json.loads(target.read_text()) == {"version": 1}
