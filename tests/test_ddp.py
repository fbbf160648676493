"""Two CPU processes (gloo) against one: every registered method takes the same steps.

For each method in ``methods.list_methods(trains=True)`` (whatever is registered when the tests
run; the reference rows have no training step), W = 2
processes with B/2 images each must give the loss and the gradients of W = 1 with B images, to
1e-5, from the same initial weights and data (docs/conventions.md §6). Two steps are compared, with
``after_optimizer_step`` in between, so momentum encoders and queues filled by the first step are
covered too. The two processes run every method in one process group
(spawned once per module); the W = 1 references run in the test process.

BatchNorm: under W = 2 the engine's conversion (``engine.distributed.prepare_method``) turns
BatchNorm into synchronised BatchNorm, which matches W = 1 BatchNorm over the global batch. Two
kinds of BatchNorm are per process by design and are compared as follows:

- MoCo's shuffle-BN key encoder (and its subclasses'): the equivalence test switches shuffle-BN
  off (``method.shuffle_bn = False``), so the key encoder is synchronised like the rest;
  shuffle-BN itself is checked separately (``test_shuffle_bn_...``) against one process that
  encodes the same permuted batch in W separate BN groups.
- Split BN (``SplitBatchNorm2d``, ASCL and the ``bn_splits`` option of MoCo): each process splits
  its own B/W slice into k groups; the W = 1 reference applies each split-BN layer separately to
  the W contiguous slices of the global batch (``per_process_split_bn``), which is the same
  grouping. ASCL's own teacher shuffle draws one permutation of the global batch in both worlds.

Dropout is off in both worlds (one mask per row: a slice draws other numbers than the same rows
of the whole batch). Per-process statistics that a method's official code keeps on purpose (All4One's
``feature_stats=local``) are compared through the method's W-invariant options (the class
attribute ``world_invariant_options``); a new method that fails here must either match or name
such options there.

The engine end to end: ``torchrun --nproc_per_node=2 -m eval.grid`` trains SimCLR on digits with
the same per-epoch loss as one process, and its record says world size 2.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from methods import build_method, get_method_class, list_methods
from tests.conftest import run_cli

WORLD = 2
IMAGE_SIZE = 16
CHANNELS = 1
STEPS = 2
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


def case_options(name: str) -> dict[str, Any]:
    """The options a method is compared under: its W-invariant variant (options that are per
    process by design in its official code), its small sizes for speed (``small_options``), and
    1,024 queue rows for every method with a queue."""
    cls = get_method_class(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    queue = {"queue_size": 1024} if "queue_size" in fields else {}
    return {**cls.world_invariant_options, **cls.small_options, **queue}


# (test id, method, options): every registered method that trains, plus MoCo with split BN
# (ASCL's base preset) and GroCo with gradients through its gather
CASES: list[tuple[str, str, dict[str, Any]]] = [
    (
        name + "".join(
            f"-{k}={v}" for k, v in get_method_class(name).world_invariant_options.items()
        ),
        name,
        case_options(name),
    )
    for name in list_methods(trains=True)
] + [
    ("moco-bn_splits=2", "moco", {"bn_splits": 2, "queue_size": 1024}),
    # GroCo's clean variant: gradients through the gathered negatives, summed over processes
    # (the official local-slice backward loses other processes' contributions, docs/methods/groco.md §4).
    ("groco-stop_grad=false-gather_backward=sum", "groco",
     {"stop_grad": False, "gather_backward": "sum"}),
]
SHUFFLE_BN = ("shuffle_bn", "shuffle_bn", {})  # not a method: the shuffle-BN check, same world


def case_id(case: tuple[str, str, dict[str, Any]]) -> str:
    return case[0]


# --------------------------------------------------------------------------------------------
# the computation both worlds run
# --------------------------------------------------------------------------------------------
def tiny_backbone() -> torch.nn.Module:
    from backbones import build_backbone

    # timm's test_resnet: 4 stages with BatchNorm, 0.37 M parameters, 96 features
    return build_backbone("test_resnet", in_chans=CHANNELS, stem="lowres_pool", image_size=IMAGE_SIZE)


def build(name: str, options: dict[str, Any]) -> torch.nn.Module:
    torch.manual_seed(0)
    method = build_method(name, tiny_backbone(), **options)
    if hasattr(method, "shuffle_bn"):
        method.shuffle_bn = False  # compared separately; see the module docstring
    # Dropout draws one mask per row: a slice of the batch gets other numbers than the same rows
    # of the whole batch, so random per-sample ops are off in both worlds.
    for module in method.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif isinstance(module, torch.nn.MultiheadAttention):
            module.dropout = 0.0
    return method


def _split_bns(method: torch.nn.Module) -> list[Any]:
    from methods.blocks import SplitBatchNorm2d

    return [m for m in method.modules() if isinstance(m, SplitBatchNorm2d)]


def per_process_split_bn(method: torch.nn.Module, world: int) -> None:
    """Make every split-BN layer of a one-process method group its batch as ``world`` processes
    would: each contiguous 1/world slice on its own (running statistics are not compared)."""
    for bn in _split_bns(method):
        one_slice = bn.forward
        bn.forward = lambda x, f=one_slice: torch.cat([f(c) for c in x.chunk(world)])


def choose_batch(method: Any) -> int:
    """The smallest global batch the method accepts whose per-process slice its split BN takes."""
    splits = max([m.splits for m in _split_bns(method)] or [1])
    errors = []
    for batch in (8, 16, 32, 64, 128, 256):
        # >= 4 images per BN group: BatchNorm over 2 values is too ill-conditioned to compare at 1e-5
        if (batch // WORLD) % splits or (batch // WORLD) // splits < 4:
            continue
        try:
            method.check_batch(batch, 1437)
            return batch
        except ValueError as exc:
            errors.append(str(exc))
    raise ValueError(f"no small global batch fits: {errors}")


def view_sizes(method: Any) -> list[int]:
    from datasets.views import view_config

    sizes = []
    for kind in method.view_kinds():
        try:
            sizes.append(view_config("digits", kind, IMAGE_SIZE).size)
        except Exception:  # a kind digits does not define: full-size views
            sizes.append(IMAGE_SIZE)
    return sizes


def global_views(method: Any, batch: int, step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(batch, CHANNELS, s, s, generator=generator) for s in view_sizes(method)]


def run_steps(method: Any, batch: int, rank: int, world: int) -> list[dict[str, Any]]:
    """STEPS training steps on this process's slice; loss (mean over processes) and gradients.

    The parameters are not updated between the steps: the ~1e-7 float noise that averaging adds
    to W = 2's gradients is amplified by small-batch BatchNorm to well above 1e-5 on the next step
    (in one process exactly as much as in two), which would hide what step 2 is there to check:
    the state the first step left behind (queues, momentum encoders, ``after_optimizer_step``).
    """
    from engine.distributed import all_reduce_mean, average_gradients

    local = batch // world
    part = slice(rank * local, (rank + 1) * local)
    method.train()
    results = []
    for step in range(STEPS):
        views = global_views(method, batch, step)
        indices = torch.arange(batch) + step * batch
        torch.manual_seed(100 + step)
        out = method.training_step([v[part] for v in views], indices[part])
        method.zero_grad(set_to_none=True)
        out["loss"].backward()
        average_gradients(method, world)
        grads = {n: p.grad.detach().clone() for n, p in method.named_parameters() if p.grad is not None}
        loss = all_reduce_mean(out["loss"].detach(), world).item()
        results.append({"loss": loss, "grads": grads})
        method.after_optimizer_step(step, STEPS)
    return results


# --------------------------------------------------------------------------------------------
# the two processes
# --------------------------------------------------------------------------------------------
def _shuffle_bn_case(rank: int, world: int) -> dict[str, Any]:
    """W = 2 keys under shuffle-BN (rebuilt in one process by the test), and MoCo's full step
    with shuffle-BN on and its key encoder per process."""
    from engine.distributed import prepare_method
    from methods.blocks import gather
    from methods.moco import shuffle_bn_forward

    torch.manual_seed(0)
    encoder = tiny_backbone().train()
    images = torch.randn(16, CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(5))
    local = images[rank * 8 : (rank + 1) * 8]
    torch.manual_seed(7)
    keys = gather(shuffle_bn_forward(encoder, local), with_grad=False)
    method = build("moco", {})
    method.shuffle_bn = True
    info = prepare_method(method, world)
    steps = run_steps(method, 8, rank, world)
    return {"keys": keys, "moco_losses": [s["loss"] for s in steps], **info}


def _worker(rank: int, world: int, port: int, cases: list, out_dir: str) -> None:
    from engine.distributed import prepare_method

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=90))
    out = Path(out_dir)
    for case in cases:
        try:
            if case == SHUFFLE_BN:
                result = _shuffle_bn_case(rank, world)
            else:
                method = build(*case[1:])
                batch = choose_batch(method)
                info = prepare_method(method, world)
                result = {"batch": batch, "steps": run_steps(method, batch, rank, world), **info}
        except Exception:
            # A failure on one process leaves the other inside a collective: end this world (the
            # peer's collective then fails) and let the fixture start a new one for the rest.
            (out / f"{case_id(case)}.rank{rank}.err").write_text(traceback.format_exc())
            raise
        if rank == 0:
            torch.save(result, out / f"{case_id(case)}.pt")
    dist.destroy_process_group()
    # As in eval.doctor's DDP check: the interpreter's teardown can still abort a process here
    # (gloo's threads), which would fail every case of the module at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world_results(tmp_path_factory) -> Path:
    """Run every case in W = 2 processes; a case that crashes its world is recorded and skipped."""
    out = tmp_path_factory.mktemp("ddp")
    remaining = [*CASES, SHUFFLE_BN]
    while remaining:
        try:
            mp.start_processes(
                _worker, args=(WORLD, _free_port(), remaining, str(out)), nprocs=WORLD,
                join=True, start_method="spawn",
            )
        except Exception as exc:  # one case broke the world: note it, go on with the next ones
            failed = next((c for c in remaining if not (out / f"{case_id(c)}.pt").exists()), None)
            if failed is None:
                raise
            errors = sorted(out.glob(f"{case_id(failed)}.rank*.err"))
            text = "\n".join(e.read_text() for e in errors) or f"{type(exc).__name__}: {exc}"
            (out / f"{case_id(failed)}.failed").write_text(text)
            remaining = remaining[remaining.index(failed) + 1 :]
            continue
        break
    return out


def _w2(out: Path, case: tuple[str, str, dict[str, Any]]) -> dict[str, Any]:
    failed = out / f"{case_id(case)}.failed"
    if failed.exists():
        pytest.fail(f"{case_id(case)} failed under W={WORLD}:\n{failed.read_text()[-4000:]}")
    path = out / f"{case_id(case)}.pt"
    assert path.exists(), f"{case_id(case)}: the W={WORLD} world stopped before this case"
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_two_processes_match_one(case, world_results):
    distributed = _w2(world_results, case)
    assert dist.is_available() and not dist.is_initialized()
    method = build(*case[1:])
    per_process_split_bn(method, WORLD)
    reference = run_steps(method, distributed["batch"], 0, 1)
    for step, (one, two) in enumerate(zip(reference, distributed["steps"], strict=True)):
        where = f"{case_id(case)} step {step + 1}"
        assert abs(one["loss"] - two["loss"]) <= 1e-5 * max(1.0, abs(one["loss"])), (
            f"{where}: loss W=1 {one['loss']:.8f} vs W={WORLD} {two['loss']:.8f}"
        )
        assert one["grads"].keys() == two["grads"].keys(), f"{where}: different parameters got gradients"
        assert one["grads"], f"{where}: no gradients at all"
        for name, grad in one["grads"].items():
            torch.testing.assert_close(two["grads"][name], grad, **TOLERANCE,
                                       msg=lambda m, n=name, w=where: f"{w}, {n}: {m}")
    if any(isinstance(m, torch.nn.BatchNorm2d) and type(m) is torch.nn.BatchNorm2d
           for m in method.modules()):
        assert distributed["sync_bn_layers"] > 0, "plain BatchNorm left unsynchronised under W=2"


def test_shuffle_bn_matches_one_process_with_the_same_permutation(world_results):
    result = _w2(world_results, SHUFFLE_BN)
    torch.manual_seed(0)
    encoder = tiny_backbone().train()
    images = torch.randn(16, CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(7)
    perm = torch.randperm(16)
    with torch.no_grad():
        # process r encodes slice r of the permuted global batch with its own BN statistics
        groups = torch.cat([encoder(images[chunk]) for chunk in perm.view(WORLD, -1)])
        expected = groups[torch.argsort(perm)]
        plain = encoder(images)
    torch.testing.assert_close(result["keys"], expected, **TOLERANCE)
    assert (expected - plain).abs().max() > 1e-3, "the shuffle did not change any BN statistic"
    # MoCo with shuffle-BN on: the key encoder stays per process, the rest is synchronised
    assert result["local_bn_modules"] == ["key_encoder"]
    assert result["sync_bn_layers"] > 0
    assert all(torch.isfinite(torch.tensor(result["moco_losses"])))


# --------------------------------------------------------------------------------------------
# the engine end to end under torchrun
# --------------------------------------------------------------------------------------------
ENGINE_RUN = [
    "method=simclr", "trainer.epochs=1", "trainer.max_steps_per_epoch=3", "trainer.batch_size=64",
    "trainer.progress=false", "trainer.device=cpu", "eval.linear=false",
]


def test_torchrun_two_processes_train_like_one(tmp_path):
    two = run_cli(
        ["torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "eval.grid",
         f"results_dir={tmp_path / 'w2'}", *ENGINE_RUN],
        timeout=600, env={"OMP_NUM_THREADS": "1"},
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_cli(["eval.grid", f"results_dir={tmp_path / 'w1'}", *ENGINE_RUN], timeout=600,
                  env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    [rec2] = [json.loads(p.read_text()) for p in (tmp_path / "w2").rglob("record.json")]
    [rec1] = [json.loads(p.read_text()) for p in (tmp_path / "w1").rglob("record.json")]
    assert rec2["world_size"] == 2 and rec1["world_size"] == 1
    assert rec2["config"]["trainer"]["world_size"] == 2  # W > 1 is its own run and cell
    assert rec2["distributed"]["backend"] == "gloo" and rec2["distributed"]["per_process_batch"] == 32
    assert rec2["distributed"]["sync_bn_layers"] > 0
    assert rec2["distributed"]["augmentation"] == "identical to W=1"
    # rank 0 alone wrote: one checkpoint, one record
    assert len(list((tmp_path / "w2").rglob("checkpoint.pt"))) == 1
    # the same images, augmentations, initial weights and synchronised BN: the same training
    loss1, loss2 = rec1["history"][0]["loss"], rec2["history"][0]["loss"]
    assert abs(loss1 - loss2) <= 1e-4 * abs(loss1), (loss1, loss2)
