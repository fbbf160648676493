"""Bad input ends in a clear message that names the bad value and what would be valid."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from PIL import Image

from backbones import BackboneError, build_backbone
from datasets import DatasetError
from datasets.imagefolder import read_imagenet100_classes
from engine.config import ConfigError, method_options, resolve_run_config
from engine.io import ResultsDirError, atomic_write_bytes
from engine.train import TrainingError, run, run_dir_for
from eval import report
from eval.knn import knn_top1
from methods import MethodConfigError, build_method
from methods.simclr import SimCLR
from tests.conftest import REPO, compose_config, run_cli
from tests.tiny import make_record

FAST = ["trainer.progress=false", "trainer.epochs=1", "trainer.max_steps_per_epoch=1",
        "eval.linear=false"]


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
    # unknown method by name (the group option is hydra's: test_unknown_config_group_option)
    (["method.name=simclrr"], MethodConfigError, ["'simclrr'", "simclr", "groco", "moco"]),
    # unknown sorting network and relaxation of GroCo's sorter
    (["method=groco", "method.sorter.network=quick"], MethodConfigError,
     ["method.sorter.network='quick'", "odd_even", "bitonic"]),
    (["method=groco", "method.sorter.distribution=sigmoid"], MethodConfigError,
     ["method.sorter.distribution='sigmoid'", "cauchy", "logistic"]),
    (["method=groco", "method.sorter.backend=gpu"], MethodConfigError,
     ["method.sorter.backend='gpu'", "group_sum", "diffsort"]),
    # a misspelt key appended the way hydra's own hint says (+key=value) is refused too
    (["+trainer.epochz=2"], ConfigError,
     ["trainer.epochz", "did you mean trainer.epochs?", "valid keys of trainer"]),
    (["+seeed=3"], ConfigError, ["seeed", "did you mean seed?"]),
    (["+method.tempreature=0.1"], MethodConfigError, ["tempreature", "temperature"]),
    (["method=groco", "+method.sorter.netwrok=odd_even"], MethodConfigError,
     ["netwrok", "network", "distribution"]),
    # settings that used to fail only once training was over
    (["eval.knn=[{k:20,temprature:0.07}]"], ConfigError, ["temprature", "k, temperature"]),
    (["eval.knn=[{k:0,temperature:0.07}]"], ConfigError, ["eval.knn[0].k=0", ">= 1"]),
    (["eval.probe_backend=sklern"], ConfigError, ["'sklern'", "torch, sklearn"]),
    (["eval.batch_size=0"], ConfigError, ["eval.batch_size=0", ">= 1"]),
    # settings that were silently accepted
    (["trainer.precision=fp8"], ConfigError, ["'fp8'", "auto, bf16, fp16, fp32"]),
    (["trainer.device=tpu"], ConfigError, ["'tpu'", "auto, cpu, cuda, cuda:<index>"]),
    (["trainer.max_steps_per_epoch=0"], ConfigError, ["max_steps_per_epoch=0", ">= 1 or null"]),
    (["trainer.num_workers=-1"], ConfigError, ["num_workers=-1", ">= 0"]),
    (["seed=abc"], ConfigError, ["seed='abc'", "whole number"]),
    (["results_dir="], ConfigError, ["results_dir=''", "directory path"]),
]


@pytest.mark.parametrize("overrides,error,needles", RESOLVE_CASES)
def test_bad_config_values(overrides, error, needles):
    with pytest.raises(error) as err:
        resolve_run_config(compose_config(overrides))
    for needle in needles:
        assert needle in str(err.value)


def test_misspelt_key_is_refused_by_struct_mode():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["trainer.epochz=2"])
    # hydra names the key; what is valid comes from resolve_run_config once it is appended
    assert "trainer.epochz" in str(err.value)
    assert "Key 'epochz' is not in struct" in str(err.value.__cause__)


@pytest.mark.parametrize("group,bad,valid", [
    ("method", "grocco", ["groco", "simclr", "moco_cld_base"]),
    ("dataset", "cifar11", ["cifar10", "imagenet100", "digits"]),
    ("backbone", "resnet81", ["resnet18", "vit_tiny_patch16_224"]),
])
def test_unknown_config_group_option(group, bad, valid):
    with pytest.raises(MissingConfigException) as err:
        compose_config([f"{group}={bad}"])
    message = str(err.value)
    assert f"Could not find '{group}/{bad}'" in message
    for name in valid:
        assert f"\t{name}\n" in message  # hydra lists the available options one per line


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
    # a ViT patch larger than the 16-px image
    (["backbone.name=vit_tiny_patch16_224", "backbone.stem=lowres", "backbone.patch_size=32"],
     BackboneError, ["16 px", "vit_tiny_patch16_224", "low-resolution stem"]),
    # GroCo's top-k hardest negatives need a batch of at least k + 1 images
    (["method=groco", "trainer.batch_size=8", "method.topk_neg=10"], MethodConfigError,
     ["method.topk_neg=10", "batch_size=8", "topk_neg <= 7", "at least 11"]),
    # CLD clusters each view's batch: k clusters need k images
    (["method=cld", "trainer.batch_size=64"], MethodConfigError,
     ["method.clusters=200", "64 images", "at most 64 clusters"]),
    # a MoCo queue (negatives) larger than the 1,437 digits: stale keys of each query's own image
    (["method=moco", "method.queue_size=2048"], MethodConfigError,
     ["method.queue_size=2048", "1437 pre-training images", "queue_size <= 1280"]),
    (["method=ascl", "method.queue_size=2048"], MethodConfigError,
     ["method.queue_size=2048", "1437", "queue_size <= 1280"]),
]


@pytest.mark.parametrize("overrides,error,needles", RUN_CASES)
def test_bad_runs_fail_before_training(tmp_path, overrides, error, needles):
    with pytest.raises(error) as err:
        run(compose_config([f"results_dir={tmp_path}", *FAST, *overrides]))
    for needle in needles:
        assert needle in str(err.value)
    assert not list(tmp_path.rglob("checkpoint.pt"))


def test_queue_larger_than_the_dataset_is_allowed_for_support_sets():
    """NNCLR's and All4One's queues hold neighbours, not negatives: solo-learn runs them larger
    than CIFAR (docs/methods/nnclr.md §5, docs/methods/all4one.md §5), and ``exclude_self`` is
    the clean fix."""
    for name in ("nnclr", "all4one"):
        config = resolve_run_config(compose_config([f"method={name}", "method.queue_size=2048"]))
        backbone = build_backbone("test_resnet", in_chans=1, stem="lowres_pool", image_size=16)
        method = build_method(name, backbone, **method_options(config["method"]))
        method.check_batch(256, 1437)  # no error: 2048 > 1437 is the documented quirk
        with pytest.raises(MethodConfigError, match="2048 is not a multiple of the global batch 384"):
            method.check_batch(384, 1437)


def dataset_error(tmp_path: Path, name: str, root: Path) -> str:
    with pytest.raises(DatasetError) as err:
        run(compose_config([f"results_dir={tmp_path / 'results'}", *FAST, f"dataset={name}",
                 f"dataset.root={root}"]))
    assert not list((tmp_path / "results").rglob("checkpoint.pt"))
    return str(err.value)


def test_empty_and_wrong_format_dataset_roots(tmp_path):
    # a CIFAR root that is an empty directory
    empty = tmp_path / "empty"
    empty.mkdir()
    message = dataset_error(tmp_path, "cifar10", empty)
    assert str(empty) in message and "no cifar-10-batches-py/" in message
    assert "data_batch_1" in message and "download=True" in message
    # the batch folder without its batches
    (tmp_path / "cifar-10-batches-py").mkdir()
    message = dataset_error(tmp_path, "cifar10", tmp_path)
    assert "lacks data_batch_1, data_batch_2" in message and "batches.meta" in message
    # batches that are not pickles
    for name in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"):
        (tmp_path / "cifar-10-batches-py" / name).write_text("not a pickle")
    message = dataset_error(tmp_path, "cifar10", tmp_path)
    assert f"{tmp_path / 'cifar-10-batches-py' / 'data_batch_1'}" in message
    assert "as a CIFAR pickle" in message
    # an STL-10 image file that is not a whole number of 96x96 images
    (tmp_path / "stl10_binary").mkdir()
    (tmp_path / "stl10_binary" / "train_X.bin").write_bytes(b"\x00" * 10)
    message = dataset_error(tmp_path, "stl10", tmp_path)
    assert "train_X.bin" in message and "10 bytes" in message and "27648" in message


def test_imagenet100_folder_missing_classes(tmp_path):
    classes = read_imagenet100_classes()
    kept, dropped = classes[:-3], sorted(classes[-3:])
    pixel = Image.new("RGB", (4, 4))
    for split in ("train", "val"):
        for wnid in kept:
            (tmp_path / split / wnid).mkdir(parents=True)
            pixel.save(tmp_path / split / wnid / "a.png")
    (tmp_path / "val" / kept[0] / "a.png").unlink()  # a class folder left without images
    message = dataset_error(tmp_path, "imagenet100", tmp_path)
    assert f"3 of the 100 classes have no images in '{tmp_path / 'train'}'" in message
    assert f"4 of the 100 classes have no images in '{tmp_path / 'val'}'" in message
    assert ", ".join(dropped) in message and kept[0] in message
    assert "imagenet100_classes.txt" in message  # where the valid class list lives
    # a folder without train/ at all
    message = dataset_error(tmp_path, "imagenet100", tmp_path / "val")
    assert "no train/ folder" in message and "<root>/train/<class>/<image>" in message


def test_corrupt_checkpoint_is_refused_naming_the_file(tmp_path):
    config = compose_config([f"results_dir={tmp_path}", *FAST])
    run_dir = run_dir_for(resolve_run_config(config))
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(TrainingError) as err:
        run(config)
    assert str(run_dir / "checkpoint.pt") in str(err.value)
    assert "trainer.resume=false" in str(err.value)
    # asked to start over, it trains and replaces the checkpoint
    record = run(compose_config([f"results_dir={tmp_path}", *FAST, "trainer.resume=false"]))
    assert record["status"] == "finished"


# Two epochs of one small step: a checkpoint with history to damage.
CKPT = [*FAST, "trainer.epochs=2", "trainer.batch_size=64"]


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory) -> bytes:
    """A real two-epoch checkpoint of the CKPT config."""
    results = tmp_path_factory.mktemp("trained")
    overrides = [f"results_dir={results}", *CKPT]
    run(compose_config(overrides))
    return (run_dir_for(resolve_run_config(compose_config(overrides))) / "checkpoint.pt").read_bytes()


def _flip_inside_largest_tensor(data: bytes) -> bytes:
    """One byte flipped in the middle of the biggest tensor's stored bytes (not in a header)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    position = start + info.file_size // 2
    return data[:position] + bytes([data[position] ^ 0xFF]) + data[position + 1:]


def _edited(data: bytes, **changes) -> bytes:
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    state.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del state[key]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


CHECKPOINT_DAMAGE = [
    ("empty", lambda good: b"", ["is not a complete torch archive"]),
    ("truncated", lambda good: good[: len(good) // 2], ["is not a complete torch archive"]),
    ("last byte cut", lambda good: good[:-1], ["is not a complete torch archive"]),
    ("bit flip in a tensor", _flip_inside_largest_tensor, ["fails its CRC-32 check"]),
    ("not a dict", lambda good: _edited_to_list(), ["holds a list, not a groupbench checkpoint"]),
    ("field missing", lambda good: _edited(good, optimizer=None), ["'optimizer' is missing"]),
    ("epoch beyond its history", lambda good: _edited(good, epoch=5),
     ["epoch 5 with 2 epochs of history"]),
    ("another config's", lambda good: _edited(good, config_hash="0123456789ab"),
     ["does not belong to this config"]),
]


def _mid_epoch_state(**epoch_state) -> dict:
    return {"config_hash": "0123456789ab", "epoch": 0, "step": 1, "method": {}, "optimizer": {},
            "history": [], "train_seconds": 1.0,
            "epoch_state": {"loss_sum": torch.tensor(1.0), "seconds": 1.0,
                            "cpu_rng": torch.get_rng_state(), **epoch_state}}


@pytest.mark.parametrize("diagnostics,problem", [
    ({}, None),  # written before the diagnostics were kept
    ({"diagnostic_sums": {"acc": torch.tensor(0.5)}, "diagnostic_steps": {"acc": 1}}, None),
    ({"diagnostic_sums": {"acc": 0.5}, "diagnostic_steps": {"acc": 1}},
     "'diagnostic_sums' is not a dict of Tensor values"),
    ({"diagnostic_sums": {"acc": torch.tensor(0.5)}, "diagnostic_steps": {"acc": True}},
     "'diagnostic_steps' is not a dict of int values"),
    ({"diagnostic_sums": {"acc": torch.tensor(0.5)}, "diagnostic_steps": {}},
     "name different diagnostics"),
])
def test_mid_epoch_checkpoint_diagnostic_sums_are_checked(tmp_path, diagnostics, problem):
    from engine.checkpoint import DiagnosticSums, load_checkpoint

    path = tmp_path / "checkpoint.pt"
    torch.save(_mid_epoch_state(**diagnostics), path)
    if problem is None:
        state = load_checkpoint(path, "0123456789ab")
        sums = DiagnosticSums.from_state(state["epoch_state"], torch.device("cpu"))
        assert sums.means() == ({"acc": 0.5} if diagnostics else {})
        return
    with pytest.raises(TrainingError, match=f"checkpoint {path} is damaged: epoch_state .*{problem}"):
        load_checkpoint(path, "0123456789ab")


def _edited_to_list() -> bytes:
    buffer = io.BytesIO()
    torch.save([1, 2, 3], buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("damage,needles", [(d, n) for _, d, n in CHECKPOINT_DAMAGE],
                         ids=[name for name, _, _ in CHECKPOINT_DAMAGE])
def test_damaged_checkpoint_is_refused_naming_the_file(tmp_path, trained_checkpoint, damage,
                                                       needles):
    overrides = [f"results_dir={tmp_path}", *CKPT]
    run_dir = run_dir_for(resolve_run_config(compose_config(overrides)))
    run_dir.mkdir(parents=True)
    damaged = damage(trained_checkpoint)
    assert damaged != trained_checkpoint
    (run_dir / "checkpoint.pt").write_bytes(damaged)
    with pytest.raises(TrainingError) as err:
        run(compose_config(overrides))
    message = str(err.value)
    assert f"checkpoint {run_dir / 'checkpoint.pt'} " in message
    assert "trainer.resume=false" in message
    for needle in needles:
        assert needle in message
    # refused, not repaired or replaced: the file is as it was, and the failure is on record
    assert (run_dir / "checkpoint.pt").read_bytes() == damaged
    record = json.loads((run_dir / "record.json").read_text())
    assert record["status"] == "failed" and needles[0] in record["error"]


def test_intact_checkpoint_resumes(tmp_path, trained_checkpoint, capsys):
    """The control for the damage cases: the same bytes undamaged are accepted."""
    overrides = [f"results_dir={tmp_path}", *CKPT]
    run_dir = run_dir_for(resolve_run_config(compose_config(overrides)))
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.pt").write_bytes(trained_checkpoint)
    record = run(compose_config(overrides))
    assert record["status"] == "finished" and record["resumed_from"] == [2]
    assert "resuming" in capsys.readouterr().out


def test_non_finite_loss_stops_at_once_keeping_the_last_checkpoint(tmp_path, monkeypatch):
    calls = []
    real_step = SimCLR.training_step

    def step(self, views, indices):
        out = real_step(self, views, indices)
        calls.append(len(calls) + 1)
        if len(calls) == 5:  # epoch 2, step 2 at 3 steps per epoch
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(SimCLR, "training_step", step)
    overrides = [f"results_dir={tmp_path}", *FAST, "trainer.epochs=3",
                 "trainer.max_steps_per_epoch=3", "trainer.batch_size=64",
                 "trainer.checkpoint_every_s=0"]  # a checkpoint at every epoch end
    run_dir = run_dir_for(resolve_run_config(compose_config(overrides)))
    with pytest.raises(TrainingError) as err:
        run(compose_config(overrides))
    message = str(err.value)
    assert "non-finite loss nan in method simclr (preset solo)" in message
    assert "at epoch 2, step 2" in message
    assert f"the last good checkpoint ({run_dir / 'checkpoint.pt'}, epoch 1) is kept" in message
    assert calls == [1, 2, 3, 4, 5]  # no step after the bad one
    state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert state["epoch"] == 1 and len(state["history"]) == 1
    assert all(torch.isfinite(v).all() for v in state["method"].values() if v.is_floating_point())
    record = json.loads((run_dir / "record.json").read_text())
    assert record["status"] == "failed" and record["epochs_done"] == 1
    assert "at epoch 2, step 2" in record["error"]


def _good_record() -> dict:
    return make_record("simclr", "solo", 0, 80.0, 85.0)


@pytest.mark.parametrize("name,content,needle", [
    ("truncated", json.dumps(_good_record())[:120], "Expecting"),
    ("empty", "", "Expecting value"),
    ("not a record", "[1, 2]", "not a run record (no 'status' key)"),
    ("no metrics", json.dumps({**_good_record(), "metrics": None}),
     "metrics is None, expected a mapping"),
    ("metric not a number", json.dumps(
        {**_good_record(), "metrics": {**_good_record()["metrics"], "knn20_top1": "high"}}),
     "metrics.knn20_top1 is 'high', expected a finite number"),
    ("metric NaN", json.dumps(
        {**_good_record(), "metrics": {**_good_record()["metrics"], "linear_top1": math.nan}}),
     "metrics.linear_top1 is nan, expected a finite number"),
    ("curve point infinite", json.dumps(
        {**_good_record(), "metrics": {**_good_record()["metrics"], "knn_curve": {"5": math.inf}}}),
     "metrics.knn_curve.5 is inf, expected a finite number"),
    ("bits not hex", json.dumps({**_good_record(), "correct": {"knn20": "zz"}}),
     "correct.knn20 is not a hex string"),
    ("history without losses", json.dumps({**_good_record(), "history": [{"epoch": 1}]}),
     "history[0] is {'epoch': 1}"),
    ("diagnostic not a number", json.dumps(
        {**_good_record(), "history": [{"epoch": 1, "loss": 1.0, "diagnostics": {"acc": "x"}}]}),
     "history[0].diagnostics is {'acc': 'x'}, expected a mapping of names to numbers"),
])
def test_corrupt_run_record_is_skipped_and_named(tmp_path, capsys, name, content, needle):
    runs = tmp_path / "runs"
    (runs / "good").mkdir(parents=True)
    (runs / "good" / "record.json").write_text(json.dumps({**_good_record(), "seed": 1}))
    (runs / "bad").mkdir()
    (runs / "bad" / "record.json").write_text(content)
    report.main(["--runs", str(runs), "--plots-dir", "none"])
    text = capsys.readouterr().out
    problems = text.split("## Failed, unfinished, unreadable or duplicate runs", 1)[1]
    row = next(line for line in problems.splitlines() if line.startswith("| unreadable"))
    assert f"| {runs / 'bad'} |" in row and str(runs / "bad" / "record.json") in row
    assert needle in row
    main_rows = [line for line in text.split("## Main table", 1)[1].split("\n## ")[0].splitlines()
                 if line.startswith("| digits")]
    assert len(main_rows) == 1 and "| 1 | 1 |" in main_rows[0]  # the good record alone, seed 1


def test_unwritable_report_outputs(tmp_path, capsys):
    runs = tmp_path / "runs"
    (runs / "good").mkdir(parents=True)
    (runs / "good" / "record.json").write_text(json.dumps(_good_record()))
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit) as exit_code:
        report.main(["--runs", str(runs), "--output", str(blocker / "table.md")])
    assert exit_code.value.code == 2
    err = capsys.readouterr().err
    assert f"cannot write plots to {blocker}" in err and "Choose a writable --plots-dir" in err
    with pytest.raises(SystemExit) as exit_code:
        report.main(["--runs", str(runs), "--plots-dir", "none", "--output",
                     str(blocker / "table.md")])
    assert exit_code.value.code == 2
    err = capsys.readouterr().err
    assert f"cannot write the report to {blocker / 'table.md'}" in err
    assert "Choose a writable --output path" in err


def test_unwritable_results_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    # refused while the config is resolved, i.e. before a grid's first run trains an epoch
    with pytest.raises(ResultsDirError) as err:
        resolve_run_config(compose_config([f"results_dir={blocker}/results", *FAST]))
    assert f"cannot write {blocker / 'results'}: {blocker} is a file" in str(err.value)
    assert "Choose a writable results_dir" in str(err.value)
    with pytest.raises(ResultsDirError, match="is a file, not a directory"):
        run(compose_config([f"results_dir={blocker}/results", *FAST]))


def test_a_results_directory_nothing_can_be_created_in(tmp_path, monkeypatch):
    import errno
    import tempfile

    from engine.io import check_writable_dir

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    check_writable_dir(tmp_path / "results")
    assert list(tmp_path.iterdir()) == []  # the probe is removed, the directory not created
    monkeypatch.setattr(tempfile, "mkdtemp", full)
    with pytest.raises(ResultsDirError) as err:
        check_writable_dir(tmp_path / "results")
    assert str(err.value) == (
        f"cannot write {tmp_path / 'results'}: nothing can be created in {tmp_path} (No space "
        "left on device). Choose a writable results_dir (e.g. "
        "results_dir=/tmp/groupbench-results).")


@pytest.mark.skipif(not os.path.isdir("/proc/self") or not os.access("/proc", os.W_OK),
                    reason="needs Linux's /proc, which permission bits call writable for root")
def test_a_results_directory_under_proc_is_one_line_and_no_traceback(tmp_path):
    result = run_cli(["eval.grid", "results_dir=/proc/groupbench", *FAST])
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines() == [
        "error: cannot write /proc/groupbench: nothing can be created in /proc (No such file or "
        "directory). Choose a writable results_dir (e.g. results_dir=/tmp/groupbench-results)."]


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


def test_atomic_writes_keep_a_readable_mode(tmp_path):
    """mkstemp's temp files are 0600; renamed as they are, a shared results directory's records,
    checkpoints and plots would be readable by their writer alone."""
    mask = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "new.json", b"{}")
        assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o640  # as open() would make it
    finally:
        os.umask(mask)
    existing = tmp_path / "existing.json"
    existing.write_bytes(b"old")
    existing.chmod(0o604)
    atomic_write_bytes(existing, b"new")
    assert existing.read_bytes() == b"new" and existing.stat().st_mode & 0o777 == 0o604



def test_non_finite_loss_in_the_first_epoch_says_no_checkpoint_exists(tmp_path, monkeypatch):
    real_step = SimCLR.training_step

    def step(self, views, indices):
        out = real_step(self, views, indices)
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(SimCLR, "training_step", step)
    with pytest.raises(TrainingError) as err:
        run(compose_config([f"results_dir={tmp_path}", *FAST, "trainer.batch_size=64"]))
    assert "at epoch 1, step 1; no checkpoint had been written yet" in str(err.value)


def test_checkpoint_of_another_model_is_refused_naming_the_file(tmp_path, trained_checkpoint):
    overrides = [f"results_dir={tmp_path}", *CKPT]
    run_dir = run_dir_for(resolve_run_config(compose_config(overrides)))
    run_dir.mkdir(parents=True)
    state = torch.load(io.BytesIO(trained_checkpoint), map_location="cpu", weights_only=False)
    state["method"] = {k: v[..., :1] if v.ndim else v for k, v in state["method"].items()}
    torch.save(state, run_dir / "checkpoint.pt")
    with pytest.raises(TrainingError) as err:
        run(compose_config(overrides))
    message = str(err.value)
    assert f"checkpoint {run_dir / 'checkpoint.pt'} does not fit this run's model" in message
    assert "trainer.resume=false" in message
