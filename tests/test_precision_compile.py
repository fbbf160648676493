"""Every registered method's training step under mixed precision and under torch.compile, on CPU.

On CUDA the engine trains under bf16 autocast (``trainer.precision=auto``) and compiles the
backbone (``trainer.compile=auto``); these tests run the same paths on the CPU:

- bf16 autocast: the loss is finite and float32, every loss function computes in float32 whatever
  the autocast state (its value under autocast equals its value without), the gradients are
  finite, and the loss agrees with the float32 step (tolerance below);
- ``trainer.precision=bf16`` end to end through the command line;
- torch.compile (``aot_eager``: dynamo's capture and AOT autograd without inductor's C++ build) of
  the whole training step, backbone and heads, matches eager; the loss functions compile without
  a graph break, except the documented ones (GroCo's sorting network and CLD's k-means run
  eagerly, ``LOSS_GRAPH_BREAKS``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib
import json
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch._dynamo

from methods import get_method_class, list_methods
from tests.conftest import run_cli
from tests.tiny import TinyBackbone, tiny_batch

TRAINED = [name for name in list_methods() if get_method_class(name).trains]
BATCH = 32

# The loss functions the methods' training steps call (module.function). Each trained method must
# call at least one of them (test_bf16_step...), so a new method's loss gets listed here.
LOSS_FUNCTIONS = (
    "methods.simclr.nt_xent_loss",
    "methods.moco.moco_infonce_loss",
    "methods.groco.groco_loss",
    "methods.nnclr.nnclr_loss",
    "methods.all4one.centroid_loss",
    "methods.all4one.feature_rms_loss",
    "methods.all4one.feature_barlow_loss",
    "methods.cld.cross_level_discrimination",
    "methods.ascl.ascl_loss",
    "methods.ascl.soft_contrastive_loss",
    "methods.ascl.byol_ascl_loss",
)
# The loss functions whose graph breaks are documented, and why; torch._dynamo.explain finds none
# in the others. Both are a call of a torch.compiler.disable'd function, which runs eagerly while
# everything around it is captured:
# - GroCo's sorting network (methods.sorting.rank_mass): its hand-written autograd Functions walk
#   cached Python-side plans (strided views into one state buffer), which dynamo cannot trace;
# - CLD's k-means (methods.cld.spherical_kmeans): the candidate shortlist of its exact distance
#   has a data-dependent shape (nonzero), and no gradient flows through the assignments anyway.
LOSS_GRAPH_BREAKS = {
    "groco_loss": "the sorting network (methods.sorting.rank_mass)",
    "cross_level_discrimination": "k-means (methods.cld.spherical_kmeans)",
}
DISABLED_CALL = "torch.compiler.disable()"

# bf16 keeps 8 significant bits: each operand autocast rounds to bf16 (the backbone's and the
# heads' matmuls) carries a relative error up to u = 2^-8 ≈ 3.9e-3, with float32 accumulation.
# The loss itself runs in float32 on those embeddings (checked exactly below), and it is a mean
# over the B·V anchors of terms whose rounding errors are independent, so its relative change
# stays at a fraction of u (measured on these tiny models: 0.8e-4 to 5e-4). The tolerance, 2.5u,
# is met by any such loss and missed by an overflow, a saturated softmax or a loss that lost its
# float32 region at larger scale. (A loss computed in bf16 end to end would move by about u too:
# the exact autocast-invariance check of each loss function is what catches that.)
BF16_LOSS_RTOL = 2.5 * 2.0**-8


# Only to keep dynamo's tracing short in the compile test: All4One's centroid transformer with one
# of its identical layers instead of three (about half of that test's time).
COMPILE_OPTIONS = {"all4one": {"transformer_layers": 1}}


def tiny_method(name: str, seed: int = 0, **extra: Any) -> torch.nn.Module:
    """The method's default preset around a TinyBackbone, with its small options and a queue of
    4 batches (the default queues hold tens of thousands of rows)."""
    cls = get_method_class(name)
    options = {**cls.small_options, **extra}
    if "queue_size" in {f.name for f in dataclasses.fields(cls.Config)}:
        options["queue_size"] = 4 * BATCH
    torch.manual_seed(seed)
    return cls(TinyBackbone(), cls.make_config(**options))


def tiny_inputs(method: torch.nn.Module) -> tuple[list[torch.Tensor], torch.Tensor]:
    return tiny_batch(BATCH, seed=1, views=len(method.view_kinds()))


@dataclasses.dataclass
class LossCall:
    name: str
    fn: Any
    args: tuple
    kwargs: dict
    rng_state: torch.Tensor
    generators: dict[int, torch.Tensor]
    output: Any
    autocast: bool


def _snapshot(value: Any, generators: dict[int, torch.Tensor]) -> Any:
    """Tensors cloned (the call's inputs, whatever happens to them later), generator states kept."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, torch.Generator):
        generators[id(value)] = value.get_state()
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_snapshot(v, generators) for v in value)
    return value


@contextlib.contextmanager
def record_loss_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[LossCall]]:
    """Every outermost call of a LOSS_FUNCTIONS function, wherever a method module imported it."""
    calls: list[LossCall] = []
    depth = [0]
    for qualified in LOSS_FUNCTIONS:
        module_name, fn_name = qualified.rsplit(".", 1)
        fn = getattr(importlib.import_module(module_name), fn_name)

        @functools.wraps(fn)
        def wrapped(*args, _fn=fn, _name=fn_name, **kwargs):
            if depth[0]:
                return _fn(*args, **kwargs)
            generators: dict[int, torch.Tensor] = {}
            call = LossCall(_name, _fn, _snapshot(args, generators),
                            {k: _snapshot(v, generators) for k, v in kwargs.items()},
                            torch.get_rng_state(), generators, None,
                            torch.is_autocast_enabled("cpu"))
            depth[0] += 1
            try:
                call.output = _fn(*args, **kwargs)
            finally:
                depth[0] -= 1
            calls.append(call)
            return call.output

        for module in [m for n, m in sys.modules.items() if n.startswith("methods.")]:
            for attr, value in list(vars(module).items()):
                if value is fn:
                    monkeypatch.setattr(module, attr, wrapped)
    yield calls


def _replay(call: LossCall) -> Any:
    """The call again, outside autocast, from the same inputs and random state."""
    torch.set_rng_state(call.rng_state)

    def fresh(value: Any) -> Any:
        if isinstance(value, torch.Generator):
            return torch.Generator().set_state(call.generators[id(value)])
        if isinstance(value, (list, tuple)):
            return type(value)(fresh(v) for v in value)
        return value

    with torch.no_grad():
        return call.fn(*fresh(call.args), **{k: fresh(v) for k, v in call.kwargs.items()})


def _float_tensors(output: Any) -> list[torch.Tensor]:
    values = output if isinstance(output, tuple) else (output,)
    return [v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()]


def _step(method: torch.nn.Module, views, indices, autocast: bool) -> torch.Tensor:
    torch.manual_seed(2)  # the same random choices (k-means seeds, shuffles) in every copy
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        loss = method.training_step(views, indices)["loss"]
    loss.backward()
    return loss


# --------------------------------------------------------------------------------------------
# bf16 autocast
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TRAINED)
def test_bf16_step_is_finite_float32_and_close_to_fp32(name, monkeypatch, capsys):
    method = tiny_method(name)
    reference = copy.deepcopy(method)
    views, indices = tiny_inputs(method)
    fp32 = _step(reference, views, indices, autocast=False)
    with record_loss_calls(monkeypatch) as calls:
        bf16 = _step(method, views, indices, autocast=True)

    assert bf16.dtype == torch.float32 and torch.isfinite(bf16), bf16
    grads = [p.grad for p in method.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    relative = abs(bf16.item() - fp32.item()) / abs(fp32.item())
    with capsys.disabled():
        print(f"\n[bf16] {name}: fp32 loss {fp32.item():.6f}, bf16 {bf16.item():.6f}, "
              f"relative difference {relative:.2e}")
    assert relative <= BF16_LOSS_RTOL, (fp32.item(), bf16.item())

    # Each loss function ran in float32 under autocast: the same value as without autocast.
    assert calls, f"{name}'s training step called none of LOSS_FUNCTIONS; list its loss there"
    for call in calls:  # (a caller may already have turned autocast off around it: CLD)
        got, want = _float_tensors(call.output), _float_tensors(_replay(call))
        assert got and len(got) == len(want), call.name
        for g, w in zip(got, want, strict=True):
            assert g.dtype in (torch.float32, torch.float64), (call.name, g.dtype)
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7, msg=call.name)


@pytest.mark.slow
def test_precision_bf16_runs_on_cpu_end_to_end(tmp_path):
    result = run_cli(["eval.grid", "trainer.device=cpu", "trainer.precision=bf16",
                      "trainer.epochs=1", "trainer.max_steps_per_epoch=2", "trainer.batch_size=64",
                      "trainer.progress=false", "eval.linear=false", f"results_dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    [path] = list((tmp_path / "runs").rglob("record.json"))
    record = json.loads(path.read_text())
    assert record["status"] == "finished"
    assert record["execution"]["precision"] == "bf16"
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in record["history"])
    assert 10.0 < record["metrics"]["knn20_top1"] <= 100.0


def test_precision_settings_on_cpu(tmp_path):
    from engine.config import ConfigError, resolve_run_config
    from engine.train import TrainingError, autocast_context
    from tests.conftest import compose_config

    cpu = torch.device("cpu")
    for precision in ("auto", "fp32"):
        autocast, scaler = autocast_context(cpu, precision)
        assert isinstance(autocast, contextlib.nullcontext) and scaler is None
    autocast, scaler = autocast_context(cpu, "bf16")
    assert scaler is None
    with autocast:
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    with pytest.raises(TrainingError, match=r"trainer.precision=fp16 needs CUDA, but this run is "
                                            r"on cpu; valid on cpu: auto, bf16, fp32"):
        autocast_context(cpu, "fp16")
    with pytest.raises(ConfigError, match=r"invalid trainer.precision='fp16' with "
                                          r"trainer.device='cpu'"):
        resolve_run_config(compose_config(["trainer.device=cpu", "trainer.precision=fp16",
                                           f"results_dir={tmp_path}"]))


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", TRAINED)
def test_loss_functions_compile_without_graph_breaks(name, monkeypatch, fresh_dynamo, capsys):
    method = tiny_method(name)
    views, indices = tiny_inputs(method)
    with record_loss_calls(monkeypatch) as calls:
        _step(method, views, indices, autocast=False)
    assert calls
    for call in {c.name: c for c in calls}.values():  # each function once
        torch._dynamo.reset()
        torch.set_rng_state(call.rng_state)
        explained = torch._dynamo.explain(call.fn)(*call.args, **call.kwargs)
        reasons = [str(b.reason).splitlines()[0] for b in explained.break_reasons]
        with capsys.disabled():
            print(f"\n[compile] {name}: {call.name}: {len(reasons)} graph-break reason(s), "
                  f"{explained.graph_count} graph(s) {reasons}")
        if call.name in LOSS_GRAPH_BREAKS:
            assert reasons and all(DISABLED_CALL in r for r in reasons), (call.name, reasons)
        else:
            assert reasons == [], (call.name, reasons)


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINED)
def test_compiled_training_step_matches_eager(name, fresh_dynamo):
    eager = tiny_method(name, **COMPILE_OPTIONS.get(name, {}))
    compiled = copy.deepcopy(eager)
    views, indices = tiny_inputs(eager)
    want = _step(eager, views, indices, autocast=False)

    step = torch.compile(compiled.training_step, backend="aot_eager")
    torch.manual_seed(2)
    got = step(views, indices)["loss"]
    got.backward()
    # aot_eager runs the same kernels, but AOT autograd decomposes some ops (batch norm, softmax
    # backward) into primitives that sum in another order: float32 rounding, u = 2^-24, over sums
    # of at most a few thousand terms here (≤ k·u ≈ 1e-4 worst case). Gradients are compared
    # norm-wise per parameter: an entry that nearly cancels has no relative bound.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for (pname, a), b in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        if b.grad is None:
            assert a.grad is None, pname
            continue
        assert (a.grad - b.grad).norm() <= 1e-4 * b.grad.norm() + 1e-7, pname
    for (bname, a), b in zip(compiled.named_buffers(), eager.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=bname)  # queues, BN stats
