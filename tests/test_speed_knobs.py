"""Training-speed knobs (trainer.channels_last / compile / grad_accum_steps / precision).

channels_last and compile must change results only by floating-point rounding; grad_accum_steps
must give the update of the averaged micro-batch gradients, and refuse a batch it cannot split
before anything trains.
"""

from __future__ import annotations

import copy
import os
import platform
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch._dynamo

import datasets
import engine.train as train
from backbones import build_backbone
from datasets.views import view_config
from engine.config import ConfigError, resolve_run_config
from engine.data import TrainBatches
from engine.distributed import configure_host_allocator
from engine.train import (
    TrainingError,
    accumulate_gradients,
    autocast_context,
    resolve_channels_last,
    resolve_compile,
    run,
    run_dir_for,
    split_micro_batches,
    to_channels_last,
)
from methods import build_method
from tests.conftest import compose_config

FAST = ["trainer.progress=false", "trainer.batch_size=128", "eval.linear=false"]
SHORT = ["trainer.epochs=1", "trainer.max_steps_per_epoch=3", *FAST]
CPU = torch.device("cpu")

# channels_last, compile and the thread count change only the order in which float32 sums are
# rounded (u = 2^-24 ≈ 6e-8). What that can move, and so what the tests compare:
# - One forward pass from the same weights. Each convolution output is a sum of k products in
#   an order the kernel chooses; reordering moves it by at most ~k·u of the summed magnitudes and
#   typically √k·u. test_resnet has 15 convolutions with k ≤ 192·3·3 = 1728 (√k·u ≈ 2.5e-6 each):
#   ~1e-5 relative at the pooled features, hence rtol 1e-4, and atol 1e-5 for the entries ReLU
#   leaves near zero.
FORWARD_TOL = {"rtol": 1e-4, "atol": 1e-5}
# - The gradients of that step. A weight gradient sums over the batch and every pixel (k = B·H·W
#   = 32·16·16 = 8192 terms in the RGB test), worst case k·u ≈ 5e-4 of its norm: 1e-3, norm-wise
#   per parameter (elementwise, an entry that nearly cancels has no relative bound).
GRAD_RTOL = 1e-3
# - A trajectory. After the first step the weights differ by lr × that gradient difference, and
#   training amplifies a perturbation roughly tenfold per step at these learning rates (measured,
#   channels_last on vs off, 2 cores: 1e-7, 1.5e-6, 4e-6 relative in the loss at steps 2-4 of the
#   RGB test; 1e-7, 5e-6, 4e-5, 1e-3 at steps 2-5 on digits). So the loss of step t (t = 0 from
#   the same weights, a forward pass averaged over every anchor: 1e-5) is compared to
#   1e-5 · 10^t. Anything trained for longer, such as features after several steps (0.7% apart in
#   norm, 0.011 per entry on AMD EPYC and here after 4 steps), is not bounded by rounding and is
#   not compared; what rounding bounds is compared before training instead.
LOSS_RTOL_BY_STEP = (1e-5, 1e-4, 1e-3, 1e-2)


def short_run(results: Path, extra: list[str]) -> dict:
    """A short digits run; ``record["step_losses"]`` holds the loss of every optimiser step."""
    step_losses: list[float] = []
    accumulate = train.accumulate_gradients

    def recording(*args, **kwargs):
        loss, diagnostics = accumulate(*args, **kwargs)
        step_losses.append(loss.item())
        return loss, diagnostics

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "accumulate_gradients", recording)
        record = run(compose_config([f"results_dir={results}", *SHORT, *extra]))
    return {**record, "step_losses": step_losses}


def assert_same_trajectory(got: list[float], want: list[float]) -> None:
    """Per-step losses equal up to the rounding each step can have accumulated (LOSS_RTOL_BY_STEP)."""
    assert len(got) == len(want) <= len(LOSS_RTOL_BY_STEP)
    for step, (a, b, rtol) in enumerate(zip(got, want, LOSS_RTOL_BY_STEP[: len(got)], strict=True)):
        assert a == pytest.approx(b, rel=rtol), f"step {step + 1}: {a} vs {b} (rtol {rtol})"


def assert_same_losses(a: dict, b: dict) -> None:
    assert len(a["step_losses"]) == 3
    assert_same_trajectory(a["step_losses"], b["step_losses"])


def assert_same_metrics(a: dict, b: dict) -> None:
    # After 3 steps the weights differ by the trajectory's rounding (1e-3 of the loss at most, see
    # LOSS_RTOL_BY_STEP): a k-NN vote that sits that close to a tie can flip, a handful of the
    # 360 test images (0.28 points each) at most.
    for key in ("knn20_top1", "knn200_top1"):
        assert a["metrics"][key] == pytest.approx(b["metrics"][key], abs=2.0), key


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> dict:
    """SimCLR on digits with every speed knob off: the reference of the equivalence tests."""
    results = tmp_path_factory.mktemp("baseline")
    return short_run(results, ["trainer.channels_last=false", "trainer.compile=false"])


# --------------------------------------------------------------------------------------------
# config: defaults, validation, run hash
# --------------------------------------------------------------------------------------------
def test_defaults_resolve_and_bad_values_fail_before_training(tmp_path):
    trainer = resolve_run_config(compose_config([]))["trainer"]
    assert (trainer["channels_last"], trainer["compile"], trainer["grad_accum_steps"]) == (
        "auto", "auto", 1,
    )
    for override, message in [
        ("trainer.channels_last=yes", "trainer.channels_last='yes'; valid values: auto, true"),
        ("trainer.compile=1", "trainer.compile=1; valid values: auto, true, false"),
        ("trainer.grad_accum_steps=0", "trainer.grad_accum_steps=0; it must be a whole number"),
        ("trainer.grad_accum_steps=1.5", "trainer.grad_accum_steps=1.5"),
    ]:
        with pytest.raises(ConfigError, match=message):
            resolve_run_config(compose_config([override]))
    # An indivisible batch is refused by run() itself, before a run directory exists.
    results = tmp_path / "indivisible"
    cfg = compose_config(
        [f"results_dir={results}", "trainer.batch_size=100", "trainer.grad_accum_steps=3"]
    )
    with pytest.raises(ConfigError, match=r"batch_size=100 is not divisible by "
                                          r"trainer.grad_accum_steps=3"):
        run(cfg)
    assert not results.exists()


def test_grad_accum_steps_is_part_of_the_run_hash():
    one = resolve_run_config(compose_config(["trainer.grad_accum_steps=1"]))
    two = resolve_run_config(compose_config(["trainer.grad_accum_steps=2"]))
    assert run_dir_for(one) != run_dir_for(two)


def test_channels_last_and_compile_do_not_change_the_run_hash():
    plain = resolve_run_config(compose_config([]))
    for override in ("trainer.channels_last=true", "trainer.compile=false"):
        assert run_dir_for(resolve_run_config(compose_config([override]))) == run_dir_for(plain)


# --------------------------------------------------------------------------------------------
# channels_last
# --------------------------------------------------------------------------------------------
def test_channels_last_auto_is_on_for_conv_nets_only():
    resnet = build_backbone("test_resnet", in_chans=1, stem="lowres_pool", image_size=16)
    vit = build_backbone("vit_tiny_patch16_224", in_chans=1, stem="lowres", image_size=16)
    assert resolve_channels_last("auto", resnet) is True
    assert resolve_channels_last("auto", vit) is False  # one conv: the patch projection
    assert resolve_channels_last(False, resnet) is False
    assert resolve_channels_last(True, vit) is True


def test_to_channels_last_converts_every_view_and_keeps_values():
    views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 8, 8)]  # multi-crop: two sizes
    converted = to_channels_last(views)
    for before, after in zip(views, converted, strict=True):
        assert after.is_contiguous(memory_format=torch.channels_last)
        assert not after.is_contiguous()
        assert torch.equal(before, after)
    flat = torch.randn(4, 10)
    assert to_channels_last([flat])[0] is flat  # not an image batch: left alone


def _simclr(in_chans: int, channels_last: bool, seed: int = 0):
    torch.manual_seed(seed)
    backbone = build_backbone("test_resnet", in_chans=in_chans, stem="lowres_pool", image_size=16)
    method = build_method("simclr", backbone)
    if channels_last:
        method.to(memory_format=torch.channels_last)
    return method


def _sgd_losses(method, batches: list[list[torch.Tensor]], grad_accum_steps: int = 1) -> list[float]:
    optimizer = torch.optim.SGD(method.parameters(), lr=0.05, momentum=0.9)
    out = []
    for views in batches:
        optimizer.zero_grad(set_to_none=True)
        indices = torch.arange(views[0].shape[0])
        loss, _ = accumulate_gradients(
            method, views, indices, grad_accum_steps, nullcontext(), None, world_size=1
        )
        optimizer.step()
        out.append(loss.item())
    return out


def _relative_grad_errors(a: torch.nn.Module, b: torch.nn.Module) -> dict[str, float]:
    """‖grad_a − grad_b‖ / ‖grad_b‖ per parameter that has a gradient."""
    out = {}
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        if pb.grad is not None and pb.grad.norm() > 0:
            out[name] = ((pa.grad - pb.grad).norm() / pb.grad.norm()).item()
    return out


def test_channels_last_same_step_and_trajectory_rgb_multisize():
    # RGB views of two sizes, where NHWC really reorders memory (digits is one channel).
    generator = torch.Generator().manual_seed(1)
    batches = [
        [torch.randn(32, 3, 16, 16, generator=generator), torch.randn(32, 3, 12, 12, generator=generator)]
        for _ in range(4)
    ]
    images = torch.randn(64, 3, 16, 16, generator=generator)
    plain, nhwc = _simclr(3, False), _simclr(3, True)
    conv = nhwc.backbone.layer1[0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()

    # From the same weights: features (evaluation feeds embed() plain NCHW images), the loss and
    # its gradients differ by rounding only (FORWARD_TOL, GRAD_RTOL).
    with torch.inference_mode():
        expected, got = plain.eval().embed(images), nhwc.eval().embed(images)
    torch.testing.assert_close(got, expected, **FORWARD_TOL)
    one_plain, one_nhwc = copy.deepcopy(plain).train(), copy.deepcopy(nhwc).train()
    indices = torch.arange(32)
    loss_plain = one_plain.training_step(batches[0], indices)["loss"]
    loss_nhwc = one_nhwc.training_step(to_channels_last(batches[0]), indices)["loss"]
    assert loss_nhwc.item() == pytest.approx(loss_plain.item(), rel=LOSS_RTOL_BY_STEP[0])
    loss_plain.backward()
    loss_nhwc.backward()
    errors = _relative_grad_errors(one_nhwc, one_plain)
    assert errors and max(errors.values()) <= GRAD_RTOL, errors

    # Four SGD steps: the same trajectory up to the rounding each step accumulates.
    plain_losses = _sgd_losses(plain.train(), batches)
    nhwc_losses = _sgd_losses(nhwc.train(), [to_channels_last(v) for v in batches])
    assert_same_trajectory(nhwc_losses, plain_losses)
    # The trained NHWC weights give NCHW images the features of their NHWC copies.
    with torch.inference_mode():
        nchw, nhwc_in = nhwc.eval().embed(images), nhwc.embed(to_channels_last([images])[0])
    torch.testing.assert_close(nchw, nhwc_in, **FORWARD_TOL)


def test_channels_last_run_matches_contiguous_run_on_digits(tmp_path, baseline):
    record = short_run(tmp_path, ["trainer.channels_last=true", "trainer.compile=false"])
    assert record["execution"]["channels_last"] is True
    assert baseline["execution"]["channels_last"] is False
    assert_same_losses(record, baseline)
    assert_same_metrics(record, baseline)
    # The knob reached the weights (checkpointed as trained) ...
    state = torch.load(run_dir_for(record["config"]) / "checkpoint.pt", weights_only=False)
    weight = state["method"]["backbone.layer1.0.conv1.weight"]
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    # ... and auto picks it for test_resnet.
    auto = resolve_run_config(compose_config([]))
    assert auto["trainer"]["channels_last"] == "auto"


# --------------------------------------------------------------------------------------------
# compile
# --------------------------------------------------------------------------------------------
def test_compile_auto_is_off_on_cpu_and_on_for_cuda(monkeypatch):
    assert resolve_compile("auto", CPU) is False
    assert resolve_compile(False, torch.device("cuda")) is False
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: True)
    assert resolve_compile("auto", torch.device("cuda")) is True
    assert resolve_compile(True, CPU) is True
    # Where torch.compile cannot run, auto quietly stays off and an explicit true says why.
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    assert resolve_compile("auto", torch.device("cuda")) is False
    with pytest.raises(TrainingError, match="trainer.compile=true but torch.compile is not supported"):
        resolve_compile(True, CPU)


def test_compile_auto_run_on_cpu_is_not_compiled(baseline):
    auto = resolve_run_config(compose_config([]))
    assert auto["trainer"]["compile"] == "auto"
    assert baseline["execution"]["compile"] is False


def test_compiled_backbone_same_losses_as_eager(tmp_path, baseline, monkeypatch):
    """trainer.compile=true through the whole run (training, checkpoint, evaluation).

    With the aot_eager backend: dynamo's graph capture and AOT autograd, which is what the engine
    wires up; inductor's C++ code generation is not exercised here (see the next test).
    """
    monkeypatch.setattr(train, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    try:
        record = short_run(tmp_path, ["trainer.channels_last=false", "trainer.compile=true"])
    finally:
        torch._dynamo.reset()
    assert record["execution"]["compile"] is True
    assert_same_losses(record, baseline)
    assert_same_metrics(record, baseline)
    state = torch.load(run_dir_for(record["config"]) / "checkpoint.pt", weights_only=False)
    assert not any("_orig_mod" in key for key in state["method"])  # checkpoints stay portable


@pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("GROUPBENCH_TEST_INDUCTOR")),
    reason="inductor's C++ compile of test_resnet takes 55-85 s on a 2-core CPU (the 60 s test "
    "budget); runs on CUDA, or on CPU with GROUPBENCH_TEST_INDUCTOR=1",
)
def test_inductor_compiled_step_same_loss_as_eager():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator().manual_seed(2)
    batches = [[torch.randn(32, 1, 16, 16, generator=generator).to(device) for _ in range(2)]
               for _ in range(2)]
    eager, compiled = _simclr(1, False).to(device), _simclr(1, False).to(device)
    compiled.backbone.compile(backend="inductor")
    torch._dynamo.reset()
    try:
        got = _sgd_losses(compiled, batches)
    finally:
        torch._dynamo.reset()
    want = _sgd_losses(eager, batches)
    if device.type == "cuda":  # cuDNN and TF32 convolutions: another rounding altogether
        assert got == pytest.approx(want, rel=1e-3)
    else:
        assert_same_trajectory(got, want)


# --------------------------------------------------------------------------------------------
# gradient accumulation
# --------------------------------------------------------------------------------------------
def _digits_batch(batch_size: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    bundle = datasets.load_dataset("digits", None, False)
    views = [view_config(bundle.name, "shared", bundle.image_size)] * 2
    return next(iter(TrainBatches(bundle, views, batch_size, CPU, seed=0).epoch(0)))


def test_grad_accum_update_is_the_mean_of_the_micro_batch_gradients():
    indices, views = _digits_batch(64)
    reference = _simclr(1, False)
    accumulated, by_hand, full = (copy.deepcopy(reference) for _ in range(3))

    def sgd(method):
        return torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    optimizer = sgd(accumulated)
    loss, _ = accumulate_gradients(accumulated, views, indices, 2, nullcontext(), None,
                                   world_size=1)
    optimizer.step()

    # By hand: each half batch on its own, gradients averaged, one step.
    halves = [(indices[:32], [v[:32] for v in views]), (indices[32:], [v[32:] for v in views])]
    params = list(by_hand.parameters())
    grads, half_losses = [], []
    for half_indices, half_views in halves:
        by_hand.zero_grad(set_to_none=True)
        half_loss = by_hand.training_step(half_views, half_indices)["loss"]
        half_loss.backward()
        half_losses.append(half_loss.item())
        grads.append([p.grad.clone() for p in params])
    for p, g0, g1 in zip(params, *grads, strict=True):
        p.grad = (g0 + g1) / 2
    sgd(by_hand).step()

    assert loss.item() == pytest.approx(sum(half_losses) / 2, rel=1e-6)
    for (name, a), b in zip(accumulated.named_parameters(), by_hand.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    for (name, a), b in zip(accumulated.named_buffers(), by_hand.buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=name)  # BN statistics: the same two forward passes

    # Not the full batch's update: the negatives came from 32 images, not 64.
    optimizer = sgd(full)
    accumulate_gradients(full, views, indices, 1, nullcontext(), None, world_size=1)
    optimizer.step()
    moved = [not torch.allclose(a, b, rtol=1e-4, atol=1e-6)
             for a, b in zip(accumulated.parameters(), full.parameters(), strict=True)]
    assert any(moved)


def test_split_micro_batches_refuses_an_uneven_split():
    indices, views = torch.arange(10), [torch.zeros(10, 1, 4, 4)]
    parts = split_micro_batches(indices, views, 5)
    assert [p[0].tolist() for p in parts] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    with pytest.raises(TrainingError, match="batch of 10 images cannot be split into "
                                            "trainer.grad_accum_steps=3"):
        split_micro_batches(indices, views, 3)


def test_grad_accum_must_divide_the_per_process_batch(tmp_path, monkeypatch):
    # 96 splits into 3 micro-batches, but not once it is split over 3 processes (32 each).
    from engine.distributed import DistContext

    monkeypatch.setattr(train.distributed, "setup", lambda device: DistContext(world_size=3))
    cfg = compose_config([f"results_dir={tmp_path}", *FAST, "trainer.batch_size=96",
                          "trainer.grad_accum_steps=3"])
    with pytest.raises(TrainingError, match=r"per-process batch 32 \(trainer.batch_size=96 over 3 "
                                            r"processes\) is not divisible by "
                                            r"trainer.grad_accum_steps=3; .* multiple of 9"):
        run(cfg)
    assert not list(tmp_path.rglob("checkpoint.pt"))  # refused before the first step


def test_grad_accum_run_steps_the_method_once_per_optimizer_step(tmp_path, monkeypatch):
    from methods.simclr import SimCLR

    calls = {"training_step": [], "after_optimizer_step": 0}
    training_step, after_step = SimCLR.training_step, SimCLR.after_optimizer_step

    def counting_step(self, views, indices):
        calls["training_step"].append(views[0].shape[0])
        return training_step(self, views, indices)

    def counting_after(self, step, total_steps):
        calls["after_optimizer_step"] += 1
        return after_step(self, step, total_steps)

    monkeypatch.setattr(SimCLR, "training_step", counting_step)
    monkeypatch.setattr(SimCLR, "after_optimizer_step", counting_after)
    record = short_run(tmp_path, ["trainer.grad_accum_steps=2"])
    assert calls["after_optimizer_step"] == 3  # once per optimiser step
    assert calls["training_step"] == [64] * 6  # two micro-batches of 128 / 2 per step
    assert record["execution"]["grad_accum_steps"] == 2 and record["execution"]["micro_batch"] == 64
    assert record["steps"] == 3 and record["batch_size"] == 128


def test_grad_accum_warns_when_the_key_encoder_ema_runs_per_micro_batch(tmp_path):
    extra = ["method=moco", "trainer.grad_accum_steps=2"]
    with pytest.warns(UserWarning, match=r"ema_timing=before_keys\), i.e. 2 EMA updates per"):
        run(compose_config([f"results_dir={tmp_path}", "trainer.epochs=1",
                            "trainer.max_steps_per_epoch=1", *FAST, *extra]))


# --------------------------------------------------------------------------------------------
# precision
# --------------------------------------------------------------------------------------------
def test_precision_auto_resolves_to_fp32_on_cpu(baseline):
    # bf16 on CPU (autocast) and fp16 (CUDA only) are tested in tests/test_precision_compile.py.
    assert resolve_run_config(compose_config([]))["trainer"]["precision"] == "auto"
    for precision in ("auto", "fp32"):
        autocast, scaler = autocast_context(CPU, precision)
        assert isinstance(autocast, nullcontext) and scaler is None, precision
        with autocast:
            assert not torch.is_autocast_enabled("cpu")
    assert baseline["execution"]["precision"] == "fp32"


def test_split_batch_norm_takes_channels_last_inputs():
    """ASCL's split BN folds the splits into channels, which needs NCHW order: a channels_last
    batch (trainer.channels_last) must give the same output, not a view error."""
    from methods.blocks import SplitBatchNorm2d

    x = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    plain, nhwc = SplitBatchNorm2d(3, splits=4), SplitBatchNorm2d(3, splits=4)
    want = plain(x)
    got = nhwc(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(nhwc.running_mean, plain.running_mean)


# --------------------------------------------------------------------------------------------
# host allocator (engine.distributed.configure_host_allocator)
# --------------------------------------------------------------------------------------------
_FAULTS_PER_STEP = """
import sys, torch
from engine.distributed import configure_host_allocator
from eval.bench import minor_page_faults
took = configure_host_allocator() if sys.argv[1] == "1" else False
torch.set_num_threads(1)
net = torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.BatchNorm2d(32),
                          torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, padding=1, groups=32),
                          torch.nn.BatchNorm2d(32), torch.nn.ReLU())
x = torch.randn(int(sys.argv[2]), 1, 16, 16)
def step():
    net(x).sum().backward()
for _ in range(2):
    step()
faults = []
for _ in range(7):
    before = minor_page_faults()
    step()
    faults.append(minor_page_faults() - before)
print(took, sorted(faults)[3])
"""


def _faults_per_step(configure: bool, batch: int) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _FAULTS_PER_STEP, "1" if configure else "0",
                          str(batch)],
                         capture_output=True, text=True, check=True, env=env,
                         cwd=Path(__file__).resolve().parent.parent).stdout.split()
    return out[0], float(out[1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc's mallopt")
@pytest.mark.parametrize("batch", [256, 2048], ids=["8MiB-blocks", "64MiB-blocks"])
def test_host_allocator_keeps_step_memory_instead_of_page_faulting_it_in_again(batch):
    took, configured = _faults_per_step(True, batch)
    _, default = _faults_per_step(False, batch)
    # median page faults per step: each step's activations (8 MiB at batch 256; 64 MiB at 2048,
    # above the largest mmap threshold glibc accepts) come back from the kernel anew by default,
    # ~1,000 pages per 4 MiB, while the configured heap keeps them
    assert took == "True"
    assert default > 2000 * batch / 256 and configured < 0.05 * default, (default, configured)


def test_host_allocator_leaves_a_users_malloc_settings_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert configure_host_allocator() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")
    assert configure_host_allocator() is False


# --------------------------------------------------------------------------------------------
# process exit (engine.distributed.skip_exit_collection)
# --------------------------------------------------------------------------------------------
_EXIT_ORDER = """
import atexit, gc
atexit.register(lambda: print("earlier", gc.get_freeze_count(), flush=True))
from engine.distributed import setup, skip_exit_collection
handlers = atexit._ncallbacks()
setup("cpu")
print("by_setup", atexit._ncallbacks() - handlers, flush=True)
skip_exit_collection()
print("in_all", atexit._ncallbacks() - handlers, flush=True)
atexit.register(lambda: print("later", gc.get_freeze_count(), flush=True))
"""


def test_exit_freezes_the_heap_after_the_handlers_registered_later():
    out = subprocess.run([sys.executable, "-c", _EXIT_ORDER], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent).stdout
    seen = dict(line.split() for line in out.splitlines())
    # every run's process has it, and one handler however often it is asked for (setup runs
    # once per run in a grid worker)
    assert seen["by_setup"] == "1" and seen["in_all"] == "1"
    # a handler registered later (the process group's teardown, say) still runs first, before
    # anything is frozen
    assert seen["later"] == "0"
    # by the interpreter's last collection every object of torch and the engine is frozen, so the
    # pass has nothing to traverse (about 1.2 s of every CLI command's exit here otherwise)
    assert int(seen["earlier"]) > 100_000, seen
