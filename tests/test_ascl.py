"""ASCL: soft targets from the teacher's queue relations, the fixed crash cases, and the method."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from methods import MethodConfigError, build_method
from methods.ascl import (
    ascl_loss,
    ascl_targets,
    byol_ascl_loss,
    shuffled_forward,
    soft_weights,
    teacher_confidence,
)
from methods.blocks import SplitBatchNorm2d
from methods.moco import moco_infonce_loss


class TinyConv(nn.Module):
    """Conv → BatchNorm2d → pool: BatchNorm2d so that split BN and the teacher shuffle matter."""

    num_features = 4

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def images(n: int, views: int = 2, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 4, 4, generator=generator) for _ in range(views)]


def small_ascl(**options) -> nn.Module:
    defaults = {"queue_size": 8, "dim": 4, "head_hidden_dim": 16, "bn_splits": 2}
    return build_method("ascl", TinyConv(), **{**defaults, **options})


# ---------------------------------------------------------------------------------- targets
# Hand case: key (1,0), queue [(1,0), (0,1), (−1,0)], τ₂ = 1 → s = [1, 0, −1],
# p = e^s / (e + 1 + 1/e) = [0.665241, 0.244728, 0.090031], H(p) = 0.832396,
# c = 1 − H/log 3 = 0.242321.
KEY = torch.tensor([[1.0, 0.0]])
QUEUE = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])


def test_confidence_hand_case():
    p, c = teacher_confidence(KEY @ QUEUE.T)
    assert p[0].tolist() == pytest.approx([0.665241, 0.244728, 0.090031], abs=1e-6)
    assert c.item() == pytest.approx(0.242321, abs=1e-6)


@pytest.mark.parametrize(
    "target,k,expected",
    [
        # ascl, K = 1: y = [1, c·p] / (1 + c)
        ("ascl", 1, [0.804945, 0.129759, 0.047736, 0.017561]),
        # ascl, K = 10: 10·c·p_1 = 1.61 is clipped to 1 → w = [1, 0.593028, 0.218163]
        ("ascl", 10, [0.355721, 0.355721, 0.210953, 0.077605]),
        # ahcl, K = 1: c on the top entry → [1, c, 0, 0] / (1 + c)
        ("ahcl", 1, [1 / 1.242321, 0.242321 / 1.242321, 0.0, 0.0]),
        # hard, K = 2: 1 on the two top entries → [1, 1, 1, 0] / 3
        ("hard", 2, [1 / 3, 1 / 3, 1 / 3, 0.0]),
        ("normal", 5, [1.0, 0.0, 0.0, 0.0]),
    ],
)
def test_targets_hand_case(target, k, expected):
    targets, confidence = ascl_targets(KEY * 2.0, QUEUE, 1.0, target, k)  # key normalised inside
    assert targets[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert confidence.item() == pytest.approx(0.242321, abs=1e-6)


def test_loss_hand_case():
    # q = k = (1,0), τ₁ = 1: logits [1, 1, 0, −1]; L = −Σ y_j (ℓ_j − logsumexp ℓ)
    assert ascl_loss(KEY, KEY, QUEUE, 1.0, 1.0, "ascl", 1).item() == pytest.approx(
        1.000433, abs=1e-6
    )
    assert ascl_loss(KEY, KEY, QUEUE, 1.0, 1.0, "ascl", 10).item() == pytest.approx(
        1.283739, abs=1e-6
    )
    assert ascl_loss(KEY, KEY, QUEUE, 1.0, 1.0, "normal").item() == pytest.approx(
        0.917576, abs=1e-6
    )


def reference_ascl(q, k, queue, t1, t2, target, nn_num) -> float:
    """Per-row loops in float64 following docs/methods/ascl.md §3 steps 1-6."""
    q = F.normalize(q.double(), dim=1)
    k = F.normalize(k.double(), dim=1)
    queue = queue.double()
    m = queue.shape[0]
    total = 0.0
    for i in range(q.shape[0]):
        s = [float(k[i] @ queue[j]) / t2 for j in range(m)]
        top = max(s)
        z = sum(math.exp(v - top) for v in s)
        p = [math.exp(v - top) / z for v in s]
        c = 1 - (-sum(pj * math.log(pj) for pj in p if pj > 0)) / math.log(m)
        order = sorted(range(m), key=lambda j: -s[j])[:nn_num]
        if target == "ascl":
            w = [min(nn_num * c * pj, 1.0) for pj in p]
        elif target == "ahcl":
            w = [c if j in order else 0.0 for j in range(m)]
        elif target == "hard":
            w = [1.0 if j in order else 0.0 for j in range(m)]
        else:
            w = [0.0] * m
        y = [1.0, *w]
        y = [v / sum(y) for v in y]
        logits = [float(q[i] @ k[i]) / t1] + [float(q[i] @ queue[j]) / t1 for j in range(m)]
        top = max(logits)
        lse = top + math.log(sum(math.exp(v - top) for v in logits))
        total += -sum(yj * (lj - lse) for yj, lj in zip(y, logits, strict=True))
    return total / q.shape[0]


@pytest.mark.parametrize(
    "target,nn_num", [("ascl", 1), ("ascl", 5), ("ahcl", 3), ("hard", 2), ("normal", 1)]
)
def test_loss_matches_loop_reference(target, nn_num):
    generator = torch.Generator().manual_seed(nn_num)
    q, k = torch.randn(4, 6, generator=generator), torch.randn(4, 6, generator=generator)
    queue = F.normalize(torch.randn(9, 6, generator=generator), dim=1)
    loss = ascl_loss(q, k, queue, 0.1, 0.05, target, nn_num)
    assert loss.item() == pytest.approx(
        reference_ascl(q, k, queue, 0.1, 0.05, target, nn_num), rel=1e-5
    )


def test_normal_target_and_zero_confidence_are_moco():
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 3, generator=generator), torch.randn(5, 3, generator=generator)
    queue = F.normalize(torch.randn(7, 3, generator=generator), dim=1)
    moco = moco_infonce_loss(q, k, queue, 0.1).item()
    assert ascl_loss(q, k, queue, 0.1, 0.05, "normal").item() == pytest.approx(moco, abs=1e-6)
    # a key orthogonal to every queue entry: uniform teacher, c = 0, no soft positives
    flat_queue = F.normalize(
        torch.cat([torch.randn(7, 2, generator=generator), torch.zeros(7, 1)], 1), dim=1
    )
    orthogonal = torch.tensor([[0.0, 0.0, 1.0]]).expand(5, 3)
    targets, confidence = ascl_targets(orthogonal, flat_queue, 0.05)
    assert confidence.abs().max().item() < 1e-6
    assert ascl_loss(q, orthogonal, flat_queue).item() == pytest.approx(
        moco_infonce_loss(q, orthogonal, flat_queue, 0.1).item(), abs=1e-5
    )


def test_gradient_only_reaches_the_query():
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(4, 3, generator=generator, requires_grad=True)
    k = torch.randn(4, 3, generator=generator, requires_grad=True)
    queue = F.normalize(torch.randn(6, 3, generator=generator), dim=1).requires_grad_()
    ascl_loss(q, k, queue).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None and queue.grad is None


# ---------------------------------------------------------------------------------- official crashes
def test_builds_with_defaults_on_cpu():
    # the first repository raised NameError (undefined K) at construction; both hard-code .cuda()
    method = build_method("ascl", TinyConv())
    assert method.config.nn_num == 1 and method.queue.size == 4096
    assert method.view_kinds() == ["shared", "weak"]


def test_single_candidate_teacher_is_certain_not_nan():
    # official: entropy / log(1) = 0/0 → NaN
    p, c = teacher_confidence(torch.tensor([[3.0], [-1.0]]))
    assert p.tolist() == [[1.0], [1.0]] and c.tolist() == [1.0, 1.0]
    loss = ascl_loss(torch.randn(2, 3), torch.randn(2, 3), F.normalize(torch.randn(1, 3), dim=1))
    assert torch.isfinite(loss)


def test_byol_path_returns_a_scalar_that_backpropagates():
    generator = torch.Generator().manual_seed(2)
    h = torch.randn(5, 4, generator=generator, requires_grad=True)
    k = torch.randn(5, 4, generator=generator)
    loss = byol_ascl_loss(h, k, 0.05, "ascl", 1)
    assert loss.ndim == 0
    loss.backward()
    assert h.grad.abs().sum() > 0
    # hand check of the formula: mean_i [2 − 2 Σ_j Y_ij ⟨ĥ_i, k̂_j⟩] with Y built by loops
    hn, kn = F.normalize(h.detach().double(), dim=1), F.normalize(k.double(), dim=1)
    expected = 0.0
    for i in range(5):
        others = [j for j in range(5) if j != i]
        s = torch.tensor([float(kn[i] @ kn[j]) / 0.05 for j in others], dtype=torch.float64)
        p = s.softmax(0)
        c = 1 + float((p * p.log()).sum()) / math.log(4)
        y = torch.zeros(5, dtype=torch.float64)
        y[i] = 1.0
        y[others] = (c * p).clamp(max=1.0)
        y = y / y.sum()
        expected += (2 - 2 * float((y * (kn @ hn[i])).sum())) / 5
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # two images: log(B − 1) = 0 in the official code → NaN; here c = 1
    assert torch.isfinite(byol_ascl_loss(h[:2], k[:2]))
    assert byol_ascl_loss(h, k, target="normal").item() == pytest.approx(
        (2 - 2 * (F.normalize(h, dim=1) * F.normalize(k, dim=1)).sum(1)).mean().item(), abs=1e-6
    )


def test_topk_beyond_the_queue_and_bad_batches_are_config_errors():
    # official: topk raises a RuntimeError; the queue assert and split-BN view crash mid-run
    with pytest.raises(
        MethodConfigError, match="nn_num=9 queue entries, more than method.queue_size=8"
    ):
        small_ascl(target="hard", nn_num=9)
    with pytest.raises(MethodConfigError, match=r"nn_num must be in \[1, 3\]"):
        soft_weights(torch.zeros(2, 3), "ahcl", 4)
    method = build_method("ascl", TinyConv(), queue_size=1000)
    with pytest.raises(MethodConfigError, match="1000 is not a multiple of the global batch 256"):
        method.check_batch(256, 1437)
    with pytest.raises(
        MethodConfigError, match="bn_splits=8 needs a batch divisible by it, got batch_size=12"
    ):
        build_method("ascl", TinyConv(), queue_size=24).check_batch(12, 100)
    method = small_ascl()
    with pytest.raises(MethodConfigError, match="split BN with 2 splits"):
        method.training_step(images(5), torch.arange(5))  # a partial batch of odd size
    # a partial batch the splits divide trains, and wraps around the queue
    method = small_ascl()
    out = method.training_step(images(6), torch.arange(6))
    assert torch.isfinite(out["loss"]) and int(method.queue.pointer) == 6
    method.training_step(images(6, seed=1), torch.arange(6))
    assert int(method.queue.pointer) == 4


def test_config_errors():
    with pytest.raises(MethodConfigError, match="ascl, ahcl, hard, normal"):
        small_ascl(target="soft")
    with pytest.raises(MethodConfigError, match="key_view=same"):
        small_ascl(direction="symmetric")
    with pytest.raises(MethodConfigError, match="not defined on the BYOL path"):
        small_ascl(model="byol", target="ahcl")
    with pytest.raises(MethodConfigError, match="two views"):
        small_ascl(views=3)


# ---------------------------------------------------------------------------------- method
def test_shuffled_forward_restores_order_and_changes_split_membership():
    x = torch.randn(8, 3, 4, 4)
    per_sample = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten())
    out = shuffled_forward(per_sample, x, torch.Generator().manual_seed(0))
    assert torch.allclose(out, per_sample(x), atol=1e-6)
    split = nn.Sequential(SplitBatchNorm2d(3, 2), nn.Flatten()).train()
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(4))
    expected = torch.empty(8, 48)
    expected[perm] = split(x[perm])
    assert torch.allclose(
        shuffled_forward(split, x, torch.Generator().manual_seed(4)), expected, atol=1e-6
    )
    assert not torch.allclose(expected, split(x), atol=1e-3)


def test_split_bn_keeps_a_channels_last_input_channels_last_with_equal_values():
    x = torch.randn(8, 3, 4, 5)
    split = [SplitBatchNorm2d(3, 4).train() for _ in range(2)]
    plain = split[0](x)
    nhwc = split[1](x.contiguous(memory_format=torch.channels_last))
    assert nhwc.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(plain, nhwc)
    assert torch.equal(split[0].running_mean, split[1].running_mean)
    assert torch.equal(split[0].running_var, split[1].running_var)


def test_step_updates_teacher_before_keys_and_enqueues_shuffled_keys():
    torch.manual_seed(0)
    method = small_ascl(momentum=0.5)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5)
    for step in range(2):
        views = images(4, seed=step)
        online = [p.detach().clone() for p in method.online.parameters()]
        teacher = [p.detach().clone() for p in method.key_encoder.parameters()]
        torch.manual_seed(100 + step)
        out = method.training_step(views, torch.arange(4))
        for old, q, new in zip(teacher, online, method.key_encoder.parameters(), strict=True):
            assert torch.allclose(new, 0.5 * old + 0.5 * q, atol=1e-6)
        # the keys are the updated teacher's, on the weak view, with the step's shuffle (drawn
        # from the global generator, which the engine seeds per epoch)
        torch.manual_seed(100 + step)
        perm = torch.randperm(4)
        torch.manual_seed(100 + step)
        with torch.no_grad():
            keys = shuffled_forward(method.key_encoder, views[1])
        assert torch.allclose(
            method.queue.data[4 * step : 4 * step + 4], F.normalize(keys, dim=1), atol=1e-6
        )
        assert int(method.queue.pointer) == (4 * step + 4) % 8
        # split BN groups samples i ≡ s (mod 2): the keys differ from an unshuffled teacher's
        # exactly when the permutation changes those groups
        moved = {frozenset(perm[0::2].tolist()), frozenset(perm[1::2].tolist())} != {
            frozenset({0, 2}),
            frozenset({1, 3}),
        }
        with torch.no_grad():
            plain = method.key_encoder(views[1])
        assert torch.allclose(keys, plain, atol=1e-5) != moved
        assert 0.0 <= out["confidence"].item() <= 1.0 and out["soft_mass"].item() >= 0.0
        optimizer.zero_grad()
        out["loss"].backward()
        assert all(p.grad is None for p in method.key_encoder.parameters())
        assert all(p.grad is not None for p in method.online.parameters())
        optimizer.step()


def test_normal_target_without_split_bn_is_moco_ascl_base_step_for_step():
    options = {
        "queue_size": 8,
        "dim": 4,
        "head_hidden_dim": 16,
        "temperature": 0.1,
        "momentum": 0.99,
        "key_view": "weak",
        "bn_splits": 1,
    }
    losses = {}
    for name, extra in (("moco", {}), ("ascl", {"target": "normal"})):
        torch.manual_seed(3)
        method = build_method(name, TinyConv(), **options, **extra)
        optimizer = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        losses[name] = []
        for step in range(3):
            out = method.training_step(images(4, seed=step), torch.arange(4))
            optimizer.zero_grad()
            out["loss"].backward()
            optimizer.step()
            losses[name].append(out["loss"].item())
    assert losses["ascl"] == pytest.approx(losses["moco"], abs=1e-6)


def test_symmetric_and_byol_variants():
    torch.manual_seed(4)
    symmetric = small_ascl(direction="symmetric", key_view="same")
    assert symmetric.view_kinds() == ["shared", "shared"]
    out = symmetric.training_step(images(4), torch.arange(4))
    out["loss"].backward()
    assert int(symmetric.queue.pointer) == 0  # 2 × 4 keys into a queue of 8
    byol = small_ascl(model="byol")
    byol.check_batch(6, 100)  # no queue: 6 need not divide the queue of 8
    out = byol.training_step(images(4), torch.arange(4))
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in byol.predictor.parameters())
    assert int(byol.queue.pointer) == 0


def test_loss_is_float32_under_autocast():
    method = small_ascl()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method.training_step(images(4), torch.arange(4))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
