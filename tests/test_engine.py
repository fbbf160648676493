"""Training engine: resume after a kill, determinism, run keys, records, config errors."""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.config import ConfigError, resolve_run_config
from engine.train import run, run_dir_for
from eval.records import load_records, record_problem
from tests.conftest import REPO, compose_config

FAST = ["trainer.progress=false", "trainer.batch_size=128", "eval.linear=false"]


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


def test_augment_official_trains_on_the_published_views(tmp_path, monkeypatch):
    """MoCo as CLD's base on CIFAR-10 with augment=official: three aug_plus crops, each erased
    after normalisation, and the record says augment=official."""
    import datasets.views as views_module
    from tests.test_datasets import _write_cifar10

    _write_cifar10(tmp_path / "data", per_batch=16)
    erased: list[int] = []
    real_erase = views_module.random_erase

    def counting_erase(images, *args, **kwargs):
        erased.append(len(images))
        return real_erase(images, *args, **kwargs)

    monkeypatch.setattr(views_module, "random_erase", counting_erase)
    overrides = [f"results_dir={tmp_path / 'results'}", "dataset=cifar10",
                 f"dataset.root={tmp_path / 'data'}", "backbone=test_resnet",
                 "method=moco_cld_base", "method.queue_size=32", "augment=official",
                 "trainer.epochs=1", "trainer.batch_size=16", "trainer.max_steps_per_epoch=2",
                 "trainer.progress=false", "eval.linear=false"]
    run(compose_config(overrides))
    assert erased == [16] * 3 * 2  # 3 views of each of the 2 batches
    record = json.loads((run_dir_for(resolve_run_config(compose_config(overrides)))
                         / "record.json").read_text())
    assert record["status"] == "finished" and record["config"]["augment"] == "official"


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


# What two runs of one config and seed may differ in: clocks, memory, and where they were written.
VOLATILE = (
    ("config", "results_dir"), ("train_seconds",), ("eval_seconds",), ("images_per_second",),
    ("peak_memory_mb",), ("finished_at",),
)
VOLATILE_PER_EPOCH = ("seconds", "images_per_second")


def reproducible_part(record: dict[str, Any]) -> dict[str, Any]:
    """The record without its VOLATILE fields: everything that must be bit-identical."""
    out = copy.deepcopy(record)
    for path in VOLATILE:
        node = out
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    for epoch in out["history"]:
        for key in VOLATILE_PER_EPOCH:
            del epoch[key]
    return out


def test_same_seed_same_record_different_seed_differs(tmp_path):
    extra = ["trainer.max_steps_per_epoch=3"]
    first = one_epoch_record(tmp_path, "a", ["seed=3", *extra])
    second = one_epoch_record(tmp_path, "b", ["seed=3", *extra])
    other = one_epoch_record(tmp_path, "c", ["seed=4", *extra])
    # Compared as written to disk: JSON keeps every float to its last digit (repr round-trips).
    stored = [json.loads((run_dir_for(r["config"]) / "record.json").read_text())
              for r in (first, second, other)]
    assert stored[0]["config"]["results_dir"] != stored[1]["config"]["results_dir"]
    assert reproducible_part(stored[0]) == reproducible_part(stored[1])
    assert stored[0]["metrics"] == stored[1]["metrics"] and stored[0]["correct"] == stored[1]["correct"]
    assert stored[0]["history"][0]["loss"] == stored[1]["history"][0]["loss"]
    # another seed is another run: other weights, other loss, another run directory
    assert stored[0]["history"][0]["loss"] != stored[2]["history"][0]["loss"]
    assert stored[0]["run_id"] != stored[2]["run_id"]
    for key in ("config", "seed", "method", "dataset", "backbone", "metrics", "train_seconds",
                "images_per_second", "peak_memory_mb", "git_commit", "packages", "world_size"):
        assert key in stored[0]
    assert record_problem(stored[0]) is None  # the report can read what the engine writes
    assert stored[0]["reference"] is False and stored[0]["steps"] == 3
    assert stored[0]["metrics"]["knn20_top1"] > 10.0  # far above nothing; chance is 10%
    assert stored[0]["packages"]["torch"] == torch.__version__.split("+")[0]


def test_finished_run_is_skipped(tmp_path, capsys):
    record = one_epoch_record(tmp_path, "a", ["trainer.max_steps_per_epoch=2"])
    again = one_epoch_record(tmp_path, "a", ["trainer.max_steps_per_epoch=2"])
    assert again == record
    assert "skipping finished run" in capsys.readouterr().out


# Run inside each killed process: marks named points of the run on stdout and, at the one named
# by GROUPBENCH_KILL_AT, announces it and sleeps until the test sends SIGKILL. Points:
# step:<epoch>:<step> (batch fetched, step not trained), write:<epoch> (the checkpoint's temp file
# is written and fsynced, not yet renamed), saved:<epoch> (renamed), features / evaluate (final
# evaluation: before feature extraction / after the feature cache is written).
KILL_DRIVER = r"""
import os, sys, time
import torch
torch.set_num_threads(min(2, os.cpu_count() or 1))  # as tests/conftest.py: identical numerics
import signal
import engine.checkpoint, engine.data, engine.io, engine.train

KILL_AT = os.environ["GROUPBENCH_KILL_AT"]
# GROUPBENCH_SIGNAL_AT: at this point send this process SIGUSR2 (SLURM's time-limit signal) and go on
SIGNAL_AT = os.environ.get("GROUPBENCH_SIGNAL_AT")
pending = []

def point(name):
    if name == SIGNAL_AT:
        print(f"@signal {name}", flush=True)
        os.kill(os.getpid(), signal.SIGUSR2)
    if name == KILL_AT:
        print(f"@kill {name}", flush=True)
        time.sleep(600)

real_epoch = engine.data.TrainBatches.epoch
def epoch(self, e, start_step=0):
    for s, item in enumerate(real_epoch(self, e, start_step), start_step):
        point(f"step:{e + 1}:{s + 1}")
        yield item
engine.data.TrainBatches.epoch = epoch

real_replace = engine.io.os.replace
def replace(src, dst):
    if pending and str(dst).endswith("checkpoint.pt"):
        point(pending[-1])
    real_replace(src, dst)
engine.io.os.replace = replace

real_save = engine.checkpoint.atomic_torch_save
def save(path, obj):
    pending.append(f"write:{obj['epoch']}")
    real_save(path, obj)
    pending.clear()
    point(f"saved:{obj['epoch']}")
engine.checkpoint.atomic_torch_save = save

real_features, real_evaluate = engine.train.cached_features, engine.train.evaluate_features
def features(*args, **kwargs):
    point("features")
    return real_features(*args, **kwargs)
def evaluate(*args, **kwargs):
    point("evaluate")
    return real_evaluate(*args, **kwargs)
engine.train.cached_features, engine.train.evaluate_features = features, evaluate

from eval.grid import main
main(sys.argv[1:])
"""
EPOCHS, STEPS = 3, 2


def kill_points(seed: int) -> list[tuple[str, int]]:
    """Three kill moments in run order, drawn from ``seed``, each with the epoch the next
    process must resume after: around an epoch's checkpoint, inside a later epoch, and during
    the final evaluation."""
    rng = random.Random(seed)
    first = rng.randint(1, EPOCHS - 1)
    kind = rng.choice(["write", "saved"])
    resumes = first if kind == "saved" else first - 1  # a kill before the rename keeps the old one
    mid_epoch = rng.randint(resumes + 1, EPOCHS)  # reached by the process that resumes after it
    return [
        (f"{kind}:{first}", resumes),
        (f"step:{mid_epoch}:{rng.randint(1, STEPS)}", mid_epoch - 1),
        (rng.choice(["features", "evaluate"]), EPOCHS),
    ]


def run_until_killed(args: list[str], env: dict[str, str], kill_at: str) -> str:
    """Start the run, SIGKILL it once it reaches ``kill_at``; return what it printed."""
    proc = subprocess.Popen(args, cwd=REPO, env={**env, "GROUPBENCH_KILL_AT": kill_at},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(240, proc.kill)  # a run that never gets there must not hang
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(f"@kill {kill_at}"):
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        proc.stdout.close()
    output = "".join(lines)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {kill_at}:\n{output[-3000:]}"
    return output


def resumed_after(output: str) -> int:
    """The epoch a process said it resumed after (0: it started from scratch)."""
    marks = [line for line in output.splitlines() if "[groupbench] resuming" in line]
    if not marks:
        return 0
    return int(marks[0].rsplit("after epoch ", 1)[1].split("/")[0])


def test_resume_after_kills_at_several_points_matches_uninterrupted_run(tmp_path):
    """kill -9 at three seeded moments, rerunning the same command after each: every rerun
    resumes from the last checkpoint on disk (a write cut before its rename leaves the previous
    one), and the last one ends with the metrics, loss history and per-image correctness of an
    uninterrupted run."""
    common = ["method=moco", f"trainer.epochs={EPOCHS}", f"trainer.max_steps_per_epoch={STEPS}",
              "trainer.progress=false", "trainer.batch_size=32", "eval.linear=false",
              "trainer.checkpoint_every_s=0"]  # a checkpoint at every epoch end
    killed_dir = tmp_path / "killed"
    args = [sys.executable, "-c", KILL_DRIVER, f"results_dir={killed_dir}", *common]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run_dir = run_dir_for(resolve_run_config(compose_config([f"results_dir={killed_dir}", *common])))
    checkpoint = run_dir / "checkpoint.pt"

    # Seed 1 draws: during the write of epoch 1's checkpoint, in step 1 of epoch 2, in the final
    # evaluation. GROUPBENCH_KILL_SEED draws other moments.
    points = kill_points(seed=int(os.environ.get("GROUPBENCH_KILL_SEED", "1")))
    expected_resume = 0
    for kill_at, resumes in points:
        output = run_until_killed(args, env, kill_at)
        assert resumed_after(output) == expected_resume, (kill_at, output[-2000:])
        assert not (run_dir / "record.json").exists()
        if resumes:
            state = torch.load(checkpoint, map_location="cpu", weights_only=False)
            assert state["epoch"] == resumes, kill_at
        else:
            assert not checkpoint.exists(), kill_at
        if kill_at.startswith("write:"):  # the temp file of the interrupted write is left over
            assert list(run_dir.glob(".checkpoint.pt.*.tmp")), kill_at
        # the report lists the run as unfinished, with or without a checkpoint
        [problem] = load_records(killed_dir / "runs").problems
        assert problem.status == "unfinished" and problem.run_dir == str(run_dir), kill_at
        expected_resume = resumes

    final = subprocess.run(args, cwd=REPO, env={**env, "GROUPBENCH_KILL_AT": "never"},
                           capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    assert resumed_after(final.stdout) == EPOCHS
    resumed = json.loads((run_dir / "record.json").read_text())
    straight = run(compose_config([f"results_dir={tmp_path / 'straight'}", *common]))
    assert resumed["status"] == "finished" and resumed["resumed_from"][-1] == EPOCHS
    assert straight["resumed_from"] == []
    assert resumed["metrics"] == straight["metrics"]
    assert resumed["correct"] == straight["correct"]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]


# --------------------------------------------------------------------------------------------
# checkpoints: cadence, signals, positions inside an epoch
# --------------------------------------------------------------------------------------------
SHORT = ["trainer.epochs=2", "trainer.max_steps_per_epoch=3", "trainer.batch_size=64", *FAST]


def saved_positions(monkeypatch) -> list[tuple[int, int]]:
    """(epoch, step) of every checkpoint the engine writes from now on."""
    import engine.checkpoint

    positions: list[tuple[int, int]] = []
    real_save = engine.checkpoint.atomic_torch_save

    def save(path, obj):
        positions.append((obj["epoch"], obj["step"]))
        real_save(path, obj)

    monkeypatch.setattr(engine.checkpoint, "atomic_torch_save", save)
    return positions


# trainer.checkpoint_every_s → the (epoch, step) of every checkpoint a 2 × 3-step run writes
CADENCES = {
    "600": [(2, 0)],  # the default: a short run writes its final checkpoint only
    "0": [(1, 0), (2, 0)],  # at every epoch end
    "1e-9": [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)],  # after every step
}


def test_checkpoint_cadence_changes_neither_the_run_nor_its_directory(tmp_path, monkeypatch):
    records = {}
    positions = saved_positions(monkeypatch)
    for every, expected in CADENCES.items():
        positions.clear()
        overrides = [f"results_dir={tmp_path / every}", *SHORT, f"trainer.checkpoint_every_s={every}"]
        records[every] = run(compose_config(overrides))
        assert positions == expected, every
    # not part of the run hash: the same run directory whatever the cadence
    assert len({run_dir_for(r["config"]).relative_to(r["config"]["results_dir"])
                for r in records.values()}) == 1
    first, *others = records.values()
    for other in others:
        assert [h["loss"] for h in other["history"]] == [h["loss"] for h in first["history"]]
        assert other["metrics"] == first["metrics"] and other["correct"] == first["correct"]


def test_checkpoint_every_s_must_be_a_number_of_seconds():
    with pytest.raises(ConfigError, match=r"trainer.checkpoint_every_s=-1; it must be a number of "
                                          r"seconds >= 0"):
        resolve_run_config(compose_config(["trainer.checkpoint_every_s=-1"]))


def test_signal_checkpoints_inside_the_epoch_and_the_rerun_resumes_there(tmp_path):
    """SIGUSR2 (SLURM's time-limit and preemption signal) in a process with no handler for it:
    the step under way finishes, a checkpoint of that step is written (the default cadence had
    written none yet), then the signal ends the process as it would have. The rerun resumes
    inside the epoch and ends exactly as an uninterrupted run. ASCL draws its teacher shuffle
    from torch's global generator at every step, so the generator's state must be restored too."""
    common = ["method=ascl", f"trainer.epochs={EPOCHS}", f"trainer.max_steps_per_epoch={STEPS}",
              "trainer.progress=false", "trainer.batch_size=32", "eval.linear=false"]
    results = tmp_path / "signalled"
    args = [sys.executable, "-c", KILL_DRIVER, f"results_dir={results}", *common]
    env = {**os.environ, "PYTHONPATH": str(REPO), "GROUPBENCH_KILL_AT": "never"}
    run_dir = run_dir_for(resolve_run_config(compose_config([f"results_dir={results}", *common])))

    first = subprocess.run(args, cwd=REPO, env={**env, "GROUPBENCH_SIGNAL_AT": "step:2:1"},
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == -signal.SIGUSR2, first.stdout[-2000:] + first.stderr[-2000:]
    assert "@signal step:2:1" in first.stdout
    state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert (state["epoch"], state["step"], len(state["history"])) == (1, 1, 1)
    assert not (run_dir / "record.json").exists()  # a signal is not a failure

    second = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"after epoch 1/{EPOCHS}, step 1/{STEPS} of epoch 2" in second.stdout
    resumed = json.loads((run_dir / "record.json").read_text())
    straight = run(compose_config([f"results_dir={tmp_path / 'straight'}", *common]))
    assert resumed["resumed_from"] == [1] and resumed["resumed_from_step"] == [STEPS + 1]
    assert straight["resumed_from"] == [] and straight["resumed_from_step"] == []
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    # the epoch cut by the signal logs the same diagnostic means as the uninterrupted one
    assert {"confidence", "soft_mass"} <= set(straight["history"][1]["diagnostics"])
    assert resumed["history"] == [
        {**h, "seconds": r["seconds"], "images_per_second": r["images_per_second"]}
        for h, r in zip(straight["history"], resumed["history"], strict=True)
    ]
    assert resumed["metrics"] == straight["metrics"]
    assert resumed["correct"] == straight["correct"]


def test_signal_handler_runs_after_the_checkpoint_and_stays_in_place(tmp_path, monkeypatch):
    """As under submitit, whose SIGUSR2 handler requeues the job and exits: that handler runs once
    the checkpoint of the step under way is written, and is the handler again afterwards."""
    from engine.data import TrainBatches

    calls = []

    def requeue(signum, frame):
        calls.append(signum)
        raise SystemExit(-1)

    real_epoch = TrainBatches.epoch

    def epoch(self, e, start_step=0):
        for s, item in enumerate(real_epoch(self, e, start_step), start_step):
            if (e, s) == (0, 1):  # the second batch of the first epoch is fetched
                os.kill(os.getpid(), signal.SIGUSR2)
            yield item

    monkeypatch.setattr(TrainBatches, "epoch", epoch)
    overrides = [f"results_dir={tmp_path}", *SHORT]
    run_dir = run_dir_for(resolve_run_config(compose_config(overrides)))
    previous = signal.signal(signal.SIGUSR2, requeue)
    try:
        with pytest.raises(SystemExit):
            run(compose_config(overrides))
        assert calls == [signal.SIGUSR2]
        assert signal.getsignal(signal.SIGUSR2) is requeue
    finally:
        signal.signal(signal.SIGUSR2, previous)
    state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert (state["epoch"], state["step"]) == (0, 2) and state["history"] == []
    assert not (run_dir / "record.json").exists()  # requeued, not failed


# --------------------------------------------------------------------------------------------
# reference rows and the smoke check
# --------------------------------------------------------------------------------------------
def test_reference_rows_are_evaluated_without_training(tmp_path, monkeypatch):
    positions = saved_positions(monkeypatch)
    record = one_epoch_record(tmp_path, "r", ["method=random_init"])
    assert record["status"] == "finished" and record["reference"] is True
    assert (record["epochs"], record["steps"], record["history"]) == (0, 0, [])
    assert record["train_seconds"] == 0.0 and record["distributed"]["augmentation"] == "none (not trained)"
    assert positions == [] and not list(tmp_path.rglob("checkpoint.pt"))
    assert record_problem(record) is None
    assert record["metrics"]["knn20_top1"] > 10.0  # a random network's features beat chance


def test_smoke_run_builds_like_a_run_and_writes_nothing(tmp_path):
    from engine.train import smoke_run

    keys = {"status", "error", "step_ms", "first_step_ms", "peak_mb", "device", "precision",
            "compile"}
    base = [f"results_dir={tmp_path}", "trainer.batch_size=64"]
    ok = smoke_run(compose_config([*base, "trainer.precision=bf16"]), steps=2)
    assert set(ok) == keys
    assert ok["status"] == "ok" and ok["error"] is None, ok
    assert (ok["device"], ok["precision"], ok["compile"]) == ("cpu", "bf16", False)
    assert ok["step_ms"] > 0 and ok["first_step_ms"] > 0 and ok["peak_mb"] > 0
    reference = smoke_run(compose_config([*base, "method=pixels"]))
    assert reference["status"] == "ok" and reference["step_ms"] is None, reference
    bad = smoke_run(compose_config([*base, "trainer.batch_size=5000"]))
    assert bad["status"] == "error" and "\n" not in bad["error"]
    assert bad["error"].startswith("TrainingError: trainer.batch_size=5000 exceeds the 1437")
    assert not list(tmp_path.rglob("*"))  # nothing written, under runs/ or anywhere else


# --------------------------------------------------------------------------------------------
# data: shards of a global batch, resuming inside an epoch
# --------------------------------------------------------------------------------------------
def _batches_equal(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(ia, ib) and all(torch.equal(va, vb) for va, vb in zip(xa, xb, strict=True))
        for (ia, xa), (ib, xb) in zip(a, b, strict=True)
    )


def _image_folder(root: Path) -> None:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split, per_class in (("train", 6), ("val", 1)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for j in range(per_class):
                pixels = torch.randint(0, 256, (40, 48, 3), generator=generator, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(root / split / cls / f"{j}.png")


@pytest.mark.parametrize("kind", ["in_memory", "files"])
def test_train_batches_shards_and_starts_inside_an_epoch(tmp_path, kind):
    """W ranks' slices of an in-memory dataset put together are the one-process batch (views
    included); a file-backed one has the same images per rank. ``start_step`` yields exactly the
    rest of the uninterrupted epoch, for every rank."""
    import datasets
    from datasets.views import view_config
    from engine.data import TrainBatches

    if kind == "files":
        _image_folder(tmp_path)
        bundle = datasets.load_dataset("imagefolder", tmp_path, image_size=16, eval_resize=16)
        batch, steps = 4, 3
    else:
        bundle = datasets.load_dataset("digits")
        batch, steps = 64, 3
    views = [view_config(bundle.name, "shared", bundle.image_size)] * 2

    def epoch(rank: int = 0, world: int = 1, start: int = 0) -> list:
        batches = TrainBatches(bundle, views, batch, torch.device("cpu"), 3, 0, steps,
                               rank=rank, world_size=world)
        return list(batches.epoch(1, start))

    whole = epoch()
    assert len(whole) == steps and whole[0][1][0].shape[0] == batch
    assert _batches_equal(epoch(start=2), whole[2:])
    shards = [epoch(rank, 2) for rank in range(2)]
    for step in range(steps):
        indices = torch.cat([shards[r][step][0] for r in range(2)])
        assert torch.equal(indices, whole[step][0])
        if kind == "in_memory":
            for v, view in enumerate(whole[step][1]):
                assert torch.equal(torch.cat([shards[r][step][1][v] for r in range(2)]), view)
    for rank in range(2):
        assert _batches_equal(epoch(rank, 2, start=1), shards[rank][1:])


# --------------------------------------------------------------------------------------------
# the method's diagnostics in the record's history
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("accumulation", [1, 2])
def test_history_holds_each_epochs_mean_of_the_methods_diagnostics(tmp_path, monkeypatch,
                                                                    accumulation):
    """Every one-element tensor a training_step returns beside the loss is averaged over the
    epoch's steps (and over a step's micro-batches); others are not logged, and a value that is
    not finite is written as null."""
    from methods.simclr import SimCLR

    calls = []
    real_step = SimCLR.training_step

    def step_with_diagnostics(self, views, indices):
        out = real_step(self, views, indices)
        calls.append(len(calls))
        return {**out, "call": torch.tensor(float(calls[-1])), "pair": torch.zeros(2),
                "undefined": torch.tensor(float("nan")), "label": "not a tensor"}

    monkeypatch.setattr(SimCLR, "training_step", step_with_diagnostics)
    record = run(compose_config([
        f"results_dir={tmp_path}", "method=simclr", "trainer.epochs=2",
        "trainer.max_steps_per_epoch=3", f"trainer.grad_accum_steps={accumulation}", *FAST,
    ]))
    per_epoch = 3 * accumulation  # training_step calls per epoch
    assert len(calls) == 2 * per_epoch
    expected = [sum(range(e * per_epoch, (e + 1) * per_epoch)) / per_epoch for e in range(2)]
    assert [h["diagnostics"] for h in record["history"]] == [
        {"call": mean, "undefined": None} for mean in expected
    ]


def test_neighbour_methods_log_the_label_accuracy_of_their_neighbours(tmp_path, monkeypatch):
    """The engine gives NNCLR the pre-training labels: in the second epoch its first neighbours
    (in a support set of other images) share the anchor's label well above chance (10 % on
    digits), and at chance when the labels it is given are shuffled. A split with an unlabelled
    image gets no labels, so no label accuracy (it would count those images as misses)."""
    import dataclasses

    import datasets
    from methods.nnclr import NNCLR

    common = ["method=nnclr", "method.proj_hidden_dim=256", "method.pred_hidden_dim=256",
              "method.queue_size=256", "method.queue_init=empty", "trainer.epochs=2",
              "trainer.max_steps_per_epoch=4", *FAST]

    def second_epoch(name: str) -> dict:
        record = run(compose_config([f"results_dir={tmp_path / name}", *common]))
        return record["history"][1]["diagnostics"]

    labelled = second_epoch("labelled")
    assert set(labelled) == {"nn_self_rate", "nn_label_acc"}
    # 512 anchors: chance is 0.10 ± 0.013 (one standard error)
    assert 0.18 < labelled["nn_label_acc"] <= 1.0 and 0.0 <= labelled["nn_self_rate"] <= 1.0

    real_set = NNCLR.set_train_labels

    def shuffled(self, labels):
        real_set(self, labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))])

    monkeypatch.setattr(NNCLR, "set_train_labels", shuffled)
    assert second_epoch("shuffled")["nn_label_acc"] < 0.15
    monkeypatch.setattr(NNCLR, "set_train_labels", real_set)

    real_load = datasets.load_dataset

    def one_unlabelled(*args, **kwargs):
        bundle = real_load(*args, **kwargs)
        labels = bundle.pretrain.labels.clone()
        labels[0] = -1
        return dataclasses.replace(
            bundle, pretrain=dataclasses.replace(bundle.pretrain, labels=labels))

    monkeypatch.setattr(datasets, "load_dataset", one_unlabelled)
    assert set(second_epoch("unlabelled")) == {"nn_self_rate"}
