"""Registry, SimCLR's NT-Xent and MoCo's queue / momentum semantics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import methods
from methods import MethodConfigError, build_method, list_methods
from methods.blocks import FeatureQueue, MomentumEncoder, multi_positive_infonce
from methods.moco import moco_infonce_loss
from methods.simclr import nt_xent_loss
from tests.tiny import TinyBackbone


# ---------------------------------------------------------------------------------- registry
def test_registry_lists_and_builds():
    assert {"simclr", "moco"} <= set(list_methods())
    assert list_methods() == sorted(list_methods())
    method = build_method("simclr", TinyBackbone(), temperature=0.5)
    assert method.name == "simclr" and method.config.temperature == 0.5


def test_unknown_method_lists_valid_names():
    with pytest.raises(MethodConfigError) as err:
        build_method("simclrr", TinyBackbone())
    assert "simclrr" in str(err.value)
    for name in list_methods():
        assert name in str(err.value)


def test_unknown_option_lists_valid_options():
    with pytest.raises(MethodConfigError) as err:
        build_method("moco", TinyBackbone(), queue_sise=16)
    assert "queue_sise" in str(err.value) and "queue_size" in str(err.value)


def test_invalid_choice_names_value_and_choices():
    with pytest.raises(MethodConfigError) as err:
        build_method("simclr", TinyBackbone(), multiview="pairs")
    assert "pairs" in str(err.value) and "sum_in_log" in str(err.value)


def test_register_rejects_duplicate_names():
    with pytest.raises(ValueError, match="already registered"):

        @methods.register_method("simclr")
        class Other(methods.SSLMethod):
            def training_step(self, views, indices):
                return {}


def test_embed_is_pooled_backbone_output():
    backbone = TinyBackbone()
    method = build_method("moco", backbone, queue_size=8).eval()
    x = torch.randn(4, 3, 4, 4)
    assert torch.equal(method.embed(x), backbone(x))
    assert method.embed(x).shape == (4, backbone.num_features)


# ---------------------------------------------------------------------------------- NT-Xent
def test_nt_xent_hand_computed_three_images():
    # Three images at 0°, 90° and 180°, both views identical, τ = 1. Anchor at 0°: positive sim 1,
    # negatives 0, −1, 0, −1 → ℓ = log(1 + 2/e + 2/e²); the 90° anchor sees four zeros →
    # ℓ = log(1 + 4/e); 180° is like 0°.
    view = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    e = math.e
    expected = (4 * math.log(1 + 2 / e + 2 / e**2) + 2 * math.log(1 + 4 / e)) / 6
    loss = nt_xent_loss([view, view * 3.0], temperature=1.0)  # scale: normalised inside
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def reference_nt_xent(views: list[torch.Tensor], temperature: float) -> float:
    """Straightforward per-anchor loops in float64 (sum of positives inside the log)."""
    z = [F.normalize(v.double(), dim=1) for v in views]
    n_views, batch = len(z), z[0].shape[0]
    total, count = 0.0, 0
    for a in range(n_views):
        for i in range(batch):
            pos, denom = 0.0, 0.0
            for b in range(n_views):
                for j in range(batch):
                    if a == b and i == j:
                        continue
                    term = math.exp(float(z[a][i] @ z[b][j]) / temperature)
                    denom += term
                    if i == j:
                        pos += term
            total += -math.log(pos / denom)
            count += 1
    return total / count


@pytest.mark.parametrize("n_views,batch,temperature", [(2, 5, 0.2), (2, 7, 0.5), (3, 4, 0.1), (4, 3, 1.0)])
def test_nt_xent_matches_independent_reference(n_views, batch, temperature):
    generator = torch.Generator().manual_seed(n_views * 100 + batch)
    views = [torch.randn(batch, 6, generator=generator) for _ in range(n_views)]
    loss = nt_xent_loss(views, temperature=temperature)
    assert loss.item() == pytest.approx(reference_nt_xent(views, temperature), rel=1e-5)


def test_nt_xent_matches_cross_entropy_form_for_two_views():
    torch.manual_seed(0)
    a, b = torch.randn(6, 5), torch.randn(6, 5)
    z = F.normalize(torch.cat([a, b]), dim=1)
    logits = z @ z.T / 0.3
    logits.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(6, 12), torch.arange(6)])
    assert nt_xent_loss([a, b], 0.3).item() == pytest.approx(F.cross_entropy(logits, target).item(), abs=1e-6)


def test_nt_xent_all_pairs_equals_sum_in_log_for_two_views_and_differs_for_three():
    torch.manual_seed(1)
    two = [torch.randn(5, 4) for _ in range(2)]
    assert nt_xent_loss(two, 0.2, "all_pairs").item() == pytest.approx(
        nt_xent_loss(two, 0.2, "sum_in_log").item(), abs=1e-6
    )
    three = [torch.randn(5, 4) for _ in range(3)]
    pair_losses = [nt_xent_loss([three[p], three[q]], 0.2).item() for p, q in ((0, 1), (0, 2), (1, 2))]
    # all_pairs masks the third view of the anchor's image, so it is not the 2-view loss either.
    all_pairs = nt_xent_loss(three, 0.2, "all_pairs").item()
    assert all_pairs != pytest.approx(nt_xent_loss(three, 0.2, "sum_in_log").item(), abs=1e-4)
    # all_pairs keeps the third view of *other* images as negatives, so each pair's term has more
    # negatives than the 2-view loss of that pair alone: a larger loss.
    assert all_pairs > sum(pair_losses) / 3


def test_nt_xent_topk_and_stop_grad():
    torch.manual_seed(2)
    a = torch.randn(6, 4, requires_grad=True)
    b = torch.randn(6, 4, requires_grad=True)
    full = nt_xent_loss([a, b], 0.5)
    top1 = nt_xent_loss([a, b], 0.5, topk_neg=1)
    assert top1.item() < full.item()  # fewer negatives, smaller denominator
    # topk with every negative kept is the full loss
    assert nt_xent_loss([a, b], 0.5, topk_neg=10).item() == pytest.approx(full.item(), abs=1e-6)
    loss = nt_xent_loss([a, b], 0.5, stop_grad=True)
    grad_a, = torch.autograd.grad(loss, a)
    assert torch.isfinite(grad_a).all() and grad_a.abs().sum() > 0


def test_nt_xent_is_permutation_invariant_and_finite_at_large_logits():
    torch.manual_seed(3)
    a, b = torch.randn(8, 4), torch.randn(8, 4)
    perm = torch.randperm(8)
    assert nt_xent_loss([a, b], 0.2).item() == pytest.approx(nt_xent_loss([a[perm], b[perm]], 0.2).item(), abs=1e-6)
    assert torch.isfinite(nt_xent_loss([a, a], 1e-4))


def test_nt_xent_bad_input():
    with pytest.raises(ValueError, match="at least 2 views"):
        nt_xent_loss([torch.randn(3, 2)], 0.1)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss([torch.randn(3, 2)] * 2, 0.0)
    with pytest.raises(ValueError, match="topk_neg"):
        nt_xent_loss([torch.randn(3, 2)] * 2, 0.1, topk_neg=5)


def test_multi_positive_infonce_requires_a_positive():
    logits = torch.zeros(2, 3)
    pos = torch.tensor([[True, False, False], [False, False, False]])
    with pytest.raises(ValueError, match="positive"):
        multi_positive_infonce(logits, pos, ~pos)


# ---------------------------------------------------------------------------------- MoCo
def test_moco_loss_matches_formula():
    torch.manual_seed(4)
    q, k, queue = torch.randn(5, 3), torch.randn(5, 3), F.normalize(torch.randn(7, 3), dim=1)
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    expected = 0.0
    for i in range(5):
        pos = math.exp(float(qn[i] @ kn[i]) / 0.2)
        neg = sum(math.exp(float(qn[i] @ queue[j]) / 0.2) for j in range(7))
        expected += -math.log(pos / (pos + neg)) / 5
    assert moco_infonce_loss(q, k, queue, 0.2).item() == pytest.approx(expected, rel=1e-5)


def test_moco_key_is_detached():
    q = torch.randn(4, 3, requires_grad=True)
    k = torch.randn(4, 3, requires_grad=True)
    moco_infonce_loss(q, k, F.normalize(torch.randn(6, 3), dim=1)).backward()
    assert q.grad is not None and k.grad is None


def test_queue_fifo_partial_fill_and_wrap():
    queue = FeatureQueue(6, 2, init="empty")
    assert queue.features().shape == (0, 2)
    queue.push(torch.ones(4, 2))
    assert queue.features().shape == (4, 2) and int(queue.pointer) == 4
    queue.push(torch.full((4, 2), 2.0))
    # rows 4, 5 then 0, 1 are overwritten by the second batch: the oldest go first
    assert queue.data[:, 0].tolist() == [2.0, 2.0, 1.0, 1.0, 2.0, 2.0]
    assert int(queue.pointer) == 2 and int(queue.filled) == 6
    with pytest.raises(MethodConfigError, match="not a multiple of the global batch 4"):
        queue.check_batch(4)


def test_queue_nearest_neighbour_uses_filled_rows_only():
    queue = FeatureQueue(4, 2, init="empty")
    queue.push(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    values, idx = queue.nearest(torch.tensor([[0.1, 1.0], [1.0, -0.2]]))
    assert idx[:, 0].tolist() == [1, 0]
    with pytest.raises(MethodConfigError, match="fewer than the k=3"):
        queue.nearest(torch.randn(1, 2), k=3)


def test_momentum_encoder_update_rule():
    online = nn.Linear(3, 2)
    ema = MomentumEncoder(online)
    before = ema.module.weight.detach().clone()
    with torch.no_grad():
        online.weight.add_(1.0)
    ema.update(online, 0.9)
    assert torch.allclose(ema.module.weight, 0.9 * before + 0.1 * online.weight)
    assert not any(p.requires_grad for p in ema.parameters())


def test_moco_step_updates_key_encoder_before_keys_and_enqueues_keys():
    torch.manual_seed(5)
    method = build_method("moco", TinyBackbone(), queue_size=8, momentum=0.5, dim=4)
    online_before = [p.detach().clone() for p in method.online.parameters()]
    key_before = [p.detach().clone() for p in method.key_encoder.parameters()]
    with torch.no_grad():  # make online and key weights differ so the EMA step is visible
        for p in method.online.parameters():
            p.add_(0.5)
    views = [torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)]
    out = method.training_step(views, torch.arange(4))
    for k_old, q_old, k_new in zip(key_before, online_before, method.key_encoder.parameters(), strict=True):
        assert torch.allclose(k_new, 0.5 * k_old + 0.5 * (q_old + 0.5), atol=1e-6)
    # the 4 new keys are the key encoder's normalised outputs of view 2, at rows 0..3
    with torch.no_grad():
        keys = F.normalize(method.key_encoder(views[1]), dim=1)
    assert torch.allclose(method.queue.data[:4], keys, atol=1e-5)
    assert int(method.queue.pointer) == 4
    out["loss"].backward()
    assert all(p.grad is None for p in method.key_encoder.parameters())
    assert method.backbone.net[1].weight.grad is not None


def test_moco_three_crop_and_weak_views():
    three = build_method("moco", TinyBackbone(), queue_size=8, views=3, dim=4)
    assert three.view_kinds() == ["shared", "shared", "shared"]
    weak = build_method("moco", TinyBackbone(), queue_size=8, key_view="weak", dim=4)
    assert weak.view_kinds() == ["shared", "weak"]
    out = three.training_step([torch.randn(4, 3, 4, 4) for _ in range(3)], torch.arange(4))
    assert torch.isfinite(out["loss"])


def test_moco_after_step_timing_updates_only_after_optimizer_step():
    method = build_method("moco", TinyBackbone(), queue_size=8, ema_timing="after_step", momentum=0.0)
    with torch.no_grad():
        for p in method.online.parameters():
            p.add_(1.0)
    method.training_step([torch.randn(4, 3, 4, 4)] * 2, torch.arange(4))
    assert not torch.allclose(method.key_encoder.module[1][0].weight, method.head[0].weight)
    method.after_optimizer_step(0, 10)
    assert torch.allclose(method.key_encoder.module[1][0].weight, method.head[0].weight)


def test_moco_queue_must_be_multiple_of_batch():
    method = build_method("moco", TinyBackbone(), queue_size=1000)
    with pytest.raises(MethodConfigError, match="1000 is not a multiple of the global batch 256"):
        method.check_batch(256, 1437)
