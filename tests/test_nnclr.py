"""NNCLR: loss values, stop-gradients, support-set state, batch checks and a CLI run."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from engine.config import resolve_run_config
from methods import MethodConfigError, build_method
from methods.blocks import FeatureQueue
from methods.nnclr import nn_infonce, nnclr_loss, support_neighbours
from tests.conftest import compose_config
from tests.tiny import TinyBackbone, tiny_batch

SMALL = {"queue_size": 8, "proj_hidden_dim": 16, "proj_output_dim": 4, "pred_hidden_dim": 16}


def small_nnclr(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_method("nnclr", TinyBackbone(), **{**SMALL, **options})


# ------------------------------------------------------------------------------- reference
def reference_cross_view(nn_rows: torch.Tensor, p_rows: torch.Tensor, tau: float) -> float:
    """−mean_i log softmax_k(n̂_i·p̂_k/τ)[i], as explicit loops in float64."""
    a = F.normalize(nn_rows.double(), dim=1)
    p = F.normalize(p_rows.double(), dim=1)
    total = 0.0
    for i in range(len(a)):
        denom = sum(math.exp(float(a[i] @ p[k]) / tau) for k in range(len(p)))
        total += -math.log(math.exp(float(a[i] @ p[i]) / tau) / denom)
    return total / len(a)


def reference_ntxent(x: torch.Tensor, y: torch.Tensor, tau: float) -> float:
    """2-view NT-Xent over the 2B rows [x; y] with explicit loops in float64."""
    rows = F.normalize(torch.cat([x, y]).double(), dim=1)
    n = len(x)
    total = 0.0
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        denom = sum(math.exp(float(rows[i] @ rows[j]) / tau) for j in range(2 * n) if j != i)
        total += -math.log(math.exp(float(rows[i] @ rows[partner]) / tau) / denom)
    return total / (2 * n)


# ---------------------------------------------------------------------------------- losses
def test_cross_view_loss_hand_computed():
    # Anchors at 0° and 90°, predictions at 0° and 270° (scaled: normalised inside), τ = 1.
    # Row 1: logits (1, 0), target 0 → log(1 + 1/e); row 2: logits (0, −1), target 1 →
    # log(1 + e). Mean: log(1 + e) − 1/2.
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    preds = torch.tensor([[2.0, 0.0], [0.0, -3.0]])
    expected = math.log(1 + math.e) - 0.5
    assert nn_infonce(anchors, preds, 1.0).item() == pytest.approx(expected, abs=1e-6)
    # Symmetric loss: the second term, anchors (0°, 0°) against predictions (0°, 90°), has rows
    # log(1 + 1/e) and log(1 + e), the same mean.
    nn2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    p1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert nnclr_loss(anchors, p1, nn2, preds, 1.0).item() == pytest.approx(expected, abs=1e-6)
    # ... and swapping the views' roles changes it
    assert nnclr_loss(anchors, preds, nn2, p1, 1.0).item() != pytest.approx(expected, abs=1e-3)


def test_ntxent_form_hand_computed():
    # Two images at 0° and 90°, neighbour = prediction: every row has its partner at cosine 1
    # and two rows at cosine 0 → ℓ = log(1 + 2/e) for every row and both directions.
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = nnclr_loss(rows, rows, rows, rows, 1.0, form="ntxent")
    assert loss.item() == pytest.approx(math.log(1 + 2 / math.e), abs=1e-6)


@pytest.mark.parametrize("n,tau", [(1, 0.2), (3, 0.2), (5, 0.5), (8, 0.1)])
def test_losses_match_loop_reference_for_any_batch(n, tau):
    generator = torch.Generator().manual_seed(n)
    nn1, p1, nn2, p2 = (torch.randn(n, 6, generator=generator) for _ in range(4))
    cross = 0.5 * reference_cross_view(nn1, p2, tau) + 0.5 * reference_cross_view(nn2, p1, tau)
    assert nnclr_loss(nn1, p1, nn2, p2, tau).item() == pytest.approx(cross, rel=1e-5)
    lightly = 0.5 * reference_ntxent(nn1, p2, tau) + 0.5 * reference_ntxent(nn2, p1, tau)
    assert nnclr_loss(nn1, p1, nn2, p2, tau, "ntxent").item() == pytest.approx(lightly, rel=1e-5)


@pytest.mark.parametrize("form", ["cross_view", "ntxent"])
def test_loss_permutation_invariant_and_gradient_into_p_only(form):
    torch.manual_seed(1)
    nn1, nn2 = torch.randn(6, 4), torch.randn(6, 4)
    p1, p2 = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    perm = torch.randperm(6)
    loss = nnclr_loss(nn1, p1, nn2, p2, 0.2, form)
    permuted = nnclr_loss(nn1[perm], p1[perm], nn2[perm], p2[perm], 0.2, form)
    assert permuted.item() == pytest.approx(loss.item(), abs=1e-6)
    g1, g2 = torch.autograd.grad(loss, [p1, p2])
    assert g1.abs().sum() > 0 and g2.abs().sum() > 0
    # permuting only the predictions breaks the pairing: the loss is not a set function of p
    assert nnclr_loss(nn1, p1[perm], nn2, p2[perm], 0.2, form).item() != pytest.approx(
        loss.item(), abs=1e-4
    )


def test_loss_runs_in_float32_under_autocast():
    torch.manual_seed(2)
    a, p = torch.randn(5, 8), torch.randn(5, 8)
    expected = nn_infonce(a, p, 0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nn_infonce(a.bfloat16(), p.bfloat16(), 0.2)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(
        nn_infonce(a.bfloat16().float(), p.bfloat16().float(), 0.2).item(), abs=1e-6
    )
    assert got.item() == pytest.approx(expected.item(), abs=0.05)


def test_bad_loss_input():
    with pytest.raises(ValueError, match="cross_view"):
        nnclr_loss(*[torch.randn(2, 3)] * 4, 0.2, form="ntx")
    with pytest.raises(ValueError, match="temperature"):
        nn_infonce(torch.randn(2, 3), torch.randn(2, 3), 0.0)
    with pytest.raises(ValueError, match="both be"):
        nn_infonce(torch.randn(2, 3), torch.randn(3, 3), 0.2)


# ----------------------------------------------------------------------------- support set
def test_lookup_sees_filled_rows_only_and_can_exclude_self():
    queue = FeatureQueue(4, 2, init="empty")
    queue.push(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([7, 9]))
    # The first query is anti-aligned with both stored rows: the unfilled (zero) rows would
    # score 0 and win if they were searched.
    values, ids = support_neighbours(torch.tensor([[-1.0, -0.5], [1.0, 0.1]]), queue, 1)
    assert ids[:, 0].tolist() == [9, 7]
    assert values[:, 0].tolist() == [[0.0, 1.0], [1.0, 0.0]]
    # the anchor with image index 7 may not take its own stored copy
    values, ids = support_neighbours(
        torch.tensor([[1.0, 0.1]]), queue, 1, query_ids=torch.tensor([7]), exclude_self=True
    )
    assert ids.tolist() == [[9]] and values[0, 0].tolist() == [0.0, 1.0]
    with pytest.raises(MethodConfigError, match="fewer than the k=3"):
        support_neighbours(torch.randn(1, 2), queue, 3)


def test_queue_contents_and_pointer_after_three_steps():
    method = small_nnclr()
    pushed = []
    for step in range(3):
        views, indices = tiny_batch(4, seed=step)
        method.training_step(views, indices)
        with torch.no_grad():  # no optimiser step: the same weights, BN on batch statistics
            pushed.append(F.normalize(method.projector(method.backbone(views[0])), dim=1))
    queue = method.queue
    assert int(queue.pointer) == 4 and int(queue.filled) == 8
    assert torch.allclose(queue.data[0:4], pushed[2], atol=1e-6)  # step 3 overwrote step 1
    assert torch.allclose(queue.data[4:8], pushed[1], atol=1e-6)
    assert queue.labels.tolist() == [200, 201, 202, 203, 100, 101, 102, 103]
    assert not queue.data.requires_grad


def test_queue_view_two_stores_the_second_view():
    method = small_nnclr(queue_view=2)
    views, indices = tiny_batch(4, seed=0)
    method.training_step(views, indices)
    with torch.no_grad():
        expected = F.normalize(method.projector(method.backbone(views[1])), dim=1)
    assert torch.allclose(method.queue.data[:4], expected, atol=1e-6)


def test_random_init_counts_as_filled_and_is_tagged_minus_one():
    method = small_nnclr()
    assert int(method.queue.filled) == 8
    assert torch.allclose(method.queue.data.norm(dim=1), torch.ones(8), atol=1e-6)
    out = method.training_step(*tiny_batch(4, seed=0))
    assert out["nn_self_rate"].item() == 0.0  # random rows carry index −1


def test_empty_queue_partial_fill():
    method = small_nnclr(queue_init="empty")
    views, indices = tiny_batch(4, seed=0)
    z, p = method_heads(method, views)
    # First step: the queue is empty, the batch's own view-1 embeddings are the support set, so
    # view 1's neighbour is itself and view 2 takes its most similar view-1 embedding.
    z_hat = [F.normalize(zi.detach(), dim=1) for zi in z]
    nn2 = z_hat[0][(z_hat[1] @ z_hat[0].T).argmax(dim=1)]
    expected = nnclr_loss(z_hat[0], p[0], nn2, p[1], 0.2)
    out = method.loss_and_update(z, p, indices)
    assert out["loss"].item() == pytest.approx(expected.item(), abs=1e-6)
    assert int(method.queue.filled) == 4 and int(method.queue.pointer) == 4
    # Second step: only the 4 filled rows are candidates, never the 4 zero rows.
    views, indices = tiny_batch(4, seed=1)
    z, p = method_heads(method, views)
    z_hat = [F.normalize(zi.detach(), dim=1) for zi in z]
    _, ids = support_neighbours(z_hat[0], method.queue, 1)
    assert set(ids[:, 0].tolist()) <= {0, 1, 2, 3}
    bank = method.queue.data[:4]
    nn1 = bank[(z_hat[0] @ bank.T).argmax(dim=1)]
    nn2 = bank[(z_hat[1] @ bank.T).argmax(dim=1)]
    out = method.loss_and_update(z, p, indices)
    assert out["loss"].item() == pytest.approx(nnclr_loss(nn1, p[0], nn2, p[1], 0.2).item(), abs=1e-6)
    assert int(method.queue.filled) == 8 and int(method.queue.pointer) == 0


def method_heads(method, views):
    z = [method.projector(method.backbone(v)) for v in views]
    return z, [method.predictor(zi) for zi in z]


def test_exclude_self_and_diagnostics():
    for exclude in (False, True):
        method = small_nnclr(queue_init="empty", exclude_self=exclude)
        method.set_train_labels(torch.tensor([0, 1, 0, 1, 1, 0, 1, 0]))
        views, indices = tiny_batch(4, seed=0)
        indices = torch.arange(4)
        method.training_step(views, indices)
        # The same images again: each one's stored copy is its nearest neighbour unless excluded.
        out = method.training_step(views, indices)
        if exclude:
            assert out["nn_self_rate"].item() == 0.0
        else:
            assert out["nn_self_rate"].item() == 1.0
            assert out["nn_label_acc"].item() == 1.0


# ----------------------------------------------------------------------------- gradients
def test_stop_gradient_on_lookup_and_queue():
    method = small_nnclr()
    views, indices = tiny_batch(4, seed=0)
    z, p = method_heads(method, views)
    z_leaf = [zi.detach().requires_grad_() for zi in z]
    p_leaf = [pi.detach().requires_grad_() for pi in p]
    loss = method.loss_and_update(z_leaf, p_leaf, indices)["loss"]
    grads = torch.autograd.grad(loss, z_leaf + p_leaf, allow_unused=True)
    # ẑ only serves the lookup and the queue: no gradient; every p receives one
    assert grads[0] is None and grads[1] is None
    assert all(g is not None and g.abs().sum() > 0 for g in grads[2:])


def test_training_step_backpropagates_into_backbone_and_heads():
    method = small_nnclr()
    out = method.training_step(*tiny_batch(4, seed=0))
    out["loss"].backward()
    for name, param in method.named_parameters():
        assert param.grad is not None, name
    assert set(out) == {"loss", "nn_self_rate"}
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")


def test_training_step_is_batch_permutation_invariant():
    method = small_nnclr()
    twin = copy.deepcopy(method)
    views, indices = tiny_batch(6, seed=3)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    loss = method.training_step(views, indices)["loss"]
    permuted = twin.training_step([v[perm] for v in views], indices[perm])["loss"]
    assert permuted.item() == pytest.approx(loss.item(), abs=1e-5)


# ---------------------------------------------------------------------------- batch checks
def test_queue_not_multiple_of_batch_names_both_numbers():
    method = small_nnclr()
    with pytest.raises(MethodConfigError, match="queue size 8 is not a multiple of the global batch 3"):
        method.check_batch(3, 100)
    method.check_batch(4, 100)
    with pytest.raises(MethodConfigError, match="at least 2"):
        method.check_batch(1, 100)
    # the step itself takes any batch (a partial batch wraps around the queue)
    out = method.training_step(*tiny_batch(3, seed=0))
    assert torch.isfinite(out["loss"]) and int(method.queue.pointer) == 3


def test_invalid_options_list_valid_values():
    with pytest.raises(MethodConfigError, match="cross_view"):
        small_nnclr(loss_form="nt_xent")
    with pytest.raises(MethodConfigError, match="queue_view"):
        small_nnclr(queue_view=3)
    with pytest.raises(MethodConfigError, match="random_unit"):
        small_nnclr(queue_init="uniform")


# --------------------------------------------------------------------------------- configs
def test_preset_yaml_matches_spec():
    digits = resolve_run_config(compose_config(["method=nnclr"]))
    cifar = resolve_run_config(compose_config(["method=nnclr", "dataset=cifar10"]))
    method = digits["method"]
    assert method["queue_size"] == 1024 and cifar["method"]["queue_size"] == 65536
    assert method["base"] == "simclr/solo" and method["preset"] == "solo"
    assert method["optimizer"]["lr"] == 0.4 and method["optimizer"]["weight_decay"] == 1e-5
    assert method["optimizer"]["name"] == "lars"
