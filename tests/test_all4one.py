"""All4One: positional table, the three terms, stop-gradients, EMA and queue state, a CLI run."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.config import resolve_run_config
from engine.optim import OptimizerSettings, build_optimizer
from methods import MethodConfigError, build_method
from methods.all4one import (
    centroid_sequences,
    feature_barlow_loss,
    feature_rms_loss,
    momentum_at,
    permuted_position_table,
    standard_position_table,
)
from methods.nnclr import nnclr_loss, support_neighbours
from tests.conftest import compose_config
from tests.tiny import TinyBackbone, tiny_batch

SMALL = {
    "queue_size": 16, "proj_hidden_dim": 16, "proj_output_dim": 8, "pred_hidden_dim": 16,
    "transformer_heads": 2,
}


def small_all4one(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_method("all4one", TinyBackbone(), **{**SMALL, **options})


def heads(method, views):
    """Online projections, both predictions and normalised momentum embeddings of two views."""
    z = [method.projector(method.backbone(v)) for v in views]
    p = [method.predictor(zi) for zi in z]
    c = [method.centroid_predictor(zi) for zi in z]
    with torch.no_grad():
        m = [F.normalize(method.momentum_encoder(v), dim=1) for v in views]
    return z, p, c, m


# ------------------------------------------------------------------------- positional table
def test_permuted_table_matches_formula_and_norms():
    # Official PositionalEncodingPermute1D(5) on (B, 5, 256): feature index u is the position,
    # the slot s the channel; ω_j = 1/10000^{2j/6} held in float32.
    k, dim = 5, 256
    table = permuted_position_table(k, dim)
    assert table.shape == (k, dim) and table.dtype == torch.float32
    expected = np.zeros((k, dim))
    for s in range(k):
        omega = float(np.float32(10000.0 ** (-(2 * (s // 2)) / 6)))
        for u in range(dim):
            expected[s, u] = math.sin(u * omega) if s % 2 == 0 else math.cos(u * omega)
    assert np.abs(table.double().numpy() - expected).max() < 2e-6
    assert table.norm(dim=1).tolist() == pytest.approx([11.3, 11.3, 11.5, 11.1, 4.9], abs=0.05)
    # K = 4 and 6 use C' = 4 and 6 channels: the frequencies change with K
    assert permuted_position_table(4, 8)[2, 1].item() == pytest.approx(math.sin(0.01), abs=1e-6)
    assert permuted_position_table(6, 8)[5, 3].item() == pytest.approx(
        math.cos(3 * 10000 ** (-4 / 6)), abs=1e-6
    )


def test_standard_table_is_vaswani_over_slots():
    table = standard_position_table(5, 8)
    for pos in range(5):
        for i in range(4):
            angle = pos / 10000 ** (2 * i / 8)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_centroid_sequences_shift_prediction_in_and_last_neighbour_out():
    nn_rows = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    pred = torch.tensor([[10.0, 20.0], [30.0, 40.0]])  # not normalised on the way in
    table = torch.tensor([[0.5, 0.0], [0.0, 0.5], [1.0, 1.0]])
    rich, shifted = centroid_sequences(nn_rows, pred, table)
    assert torch.equal(rich, nn_rows + table)
    assert torch.equal(shifted[:, 0], pred + table[0])
    assert torch.equal(shifted[:, 1:], nn_rows[:, :2] + table[1:])


# ----------------------------------------------------------------------------- feature term
def test_feature_rms_loss_hand_computed():
    # A = n(m1)ᵀn(z2) = I (on = off = 0 for that pair); n(z1) has both columns (a, a), a = 1/√2,
    # so A′ = [[a, a], [a, a]]: on = sqrt(½(1−a)²) = (1−a)/√2, off = sqrt(½·a²) = 1/2, and
    # L = 10·(½·(1−a)/√2 + ½·½) = 5/√2.
    eye = torch.eye(2)
    loss = feature_rms_loss(eye, torch.ones(2, 2), eye, torch.tensor([[3.0, 0.0], [0.0, 5.0]]))
    assert loss.item() == pytest.approx(5 / math.sqrt(2), abs=1e-6)


def reference_rms(m1, z1, m2, z2, scale=10.0):
    def corr(a, b):
        a, b = a.double(), b.double()
        d = a.shape[1]
        out = torch.zeros(d, d, dtype=torch.float64)
        for u in range(d):
            for v in range(d):
                out[u, v] = (a[:, u] @ b[:, v]) / (a[:, u].norm() * b[:, v].norm())
        return out

    mats = [corr(m1, z2), corr(m2, z1)]
    d = mats[0].shape[0]
    on = math.sqrt(0.5 * sum(sum((float(x[u, u]) - 1) ** 2 for u in range(d)) / d for x in mats))
    off = math.sqrt(
        0.5 * sum(
            sum(float(x[u, v]) ** 2 for u in range(d) for v in range(d) if u != v) / (d * d - d)
            for x in mats
        )
    )
    return scale * (0.5 * on + 0.5 * off)


def reference_barlow(m1, z1, m2, z2, lambd):
    def bt(a, b):
        a, b = a.double(), b.double()
        n, d = a.shape
        a = (a - a.mean(0)) / torch.sqrt(a.var(0, unbiased=False) + 1e-5)
        b = (b - b.mean(0)) / torch.sqrt(b.var(0, unbiased=False) + 1e-5)
        total = 0.0
        for u in range(d):
            for v in range(d):
                c = sum(float(a[i, u] * b[i, v]) for i in range(n)) / n
                total += (1 - c) ** 2 if u == v else lambd * c**2
        return total

    return 0.5 * (bt(m1, z2) + bt(m2, z1))


@pytest.mark.parametrize("n", [3, 7])
def test_feature_losses_match_loop_reference_and_are_permutation_invariant(n):
    generator = torch.Generator().manual_seed(n)
    m1, z1, m2, z2 = (torch.randn(n, 4, generator=generator) for _ in range(4))
    m1, m2 = F.normalize(m1, dim=1), F.normalize(m2, dim=1)
    rms = feature_rms_loss(m1, z1, m2, z2)
    assert rms.item() == pytest.approx(reference_rms(m1, z1, m2, z2), rel=1e-5)
    barlow = feature_barlow_loss(m1, z1, m2, z2, 5e-3)
    assert barlow.item() == pytest.approx(reference_barlow(m1, z1, m2, z2, 5e-3), rel=1e-5)
    perm = torch.randperm(n, generator=generator)
    for fn, value in ((feature_rms_loss, rms), (feature_barlow_loss, barlow)):
        assert fn(m1[perm], z1[perm], m2[perm], z2[perm]).item() == pytest.approx(
            value.item(), rel=1e-5
        )


def test_feature_loss_runs_in_float32_under_autocast():
    torch.manual_seed(1)
    rows = [torch.randn(6, 4) for _ in range(4)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = feature_rms_loss(*[r.bfloat16() for r in rows])
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(
        feature_rms_loss(*[r.bfloat16().float() for r in rows]).item(), abs=1e-6
    )


# ------------------------------------------------------------------------------ the step
def test_transformer_calls_order_and_inputs():
    method = small_all4one()
    views, indices = tiny_batch(8, seed=0)
    z, p, c, m = heads(method, views)
    nn1, _ = support_neighbours(m[0], method.queue, 5)
    nn2, _ = support_neighbours(m[1], method.queue, 5)
    table = method.position_table
    seen = []
    hook = method.transformer.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    method.loss_and_update(z, p, c, m, indices)
    hook.remove()
    assert len(seen) == 4
    assert torch.allclose(seen[0], nn1 + table) and torch.allclose(seen[1], nn2 + table)
    for got, c_a, nn_a in ((seen[2], c[0], nn1), (seen[3], c[1], nn2)):
        assert torch.allclose(got[:, 0], c_a.detach() + table[0])
        assert torch.allclose(got[:, 1:], nn_a[:, :4] + table[1:])


@pytest.mark.parametrize("train", [True, False])
def test_centroid_transformer_is_the_standard_encoder_at_slot_0(train):
    # Same parameters, same dropout draws (the RNG ends in the same state), same slot-0 output and
    # gradients as nn.TransformerEncoder, in float64 so that only rounding could differ.
    from methods.all4one import build_centroid_transformer

    torch.manual_seed(0)
    fast = build_centroid_transformer(16, 4, 24, 0.3, 3).double().train(train)
    standard = torch.nn.TransformerEncoder(copy.deepcopy(fast.layers[0]), 3,
                                           enable_nested_tensor=False).double().train(train)
    standard.load_state_dict(fast.state_dict())
    x = torch.randn(6, 5, 16, dtype=torch.float64)
    outputs, grads, after = [], [], []
    for module, run in ((standard, lambda s: standard(s)[:, 0]), (fast, fast)):
        leaf = x.clone().requires_grad_()
        torch.manual_seed(7)
        out = run(leaf)
        after.append(torch.rand(3))
        out.pow(2).sum().backward()
        outputs.append(out)
        grads.append([leaf.grad, *(p.grad for p in module.parameters())])
    assert outputs[1].shape == (6, 16)
    assert torch.allclose(outputs[0], outputs[1], rtol=0, atol=1e-12)
    assert torch.equal(after[0], after[1])
    for want, got in zip(*grads, strict=True):
        assert torch.allclose(want, got, rtol=0, atol=1e-12)



@pytest.mark.parametrize("layers", [1, 3])
def test_encode_is_four_standard_encoder_calls_in_the_official_order(layers):
    # encode shares the first layer's projection of the neighbours between S and T; against
    # nn.TransformerEncoder on the four sequences, in float64, with dropout on: equal outputs,
    # equal gradients (centroid predictions and parameters) and the same RNG state after.
    from methods.all4one import build_centroid_transformer

    torch.manual_seed(0)
    fast = build_centroid_transformer(16, 4, 24, 0.3, layers).double().train()
    for i, layer in enumerate(fast.layers):  # distinct layers, so that a swapped one would show
        for param in layer.parameters():
            param.data.add_(0.1 * (i + 1) * torch.randn_like(param))
    standard = torch.nn.TransformerEncoder(copy.deepcopy(fast.layers[0]), layers,
                                           enable_nested_tensor=False).double().train()
    standard.load_state_dict(fast.state_dict())
    neighbours = [torch.randn(6, 5, 16, dtype=torch.float64) for _ in range(2)]
    preds = [torch.randn(6, 16, dtype=torch.float64) for _ in range(2)]
    table = permuted_position_table(5, 16).double()

    def standard_encode(leaves):
        pairs = zip(neighbours, leaves, strict=True)
        rich, shifted = zip(*(centroid_sequences(n, c, table) for n, c in pairs), strict=True)
        return [standard(seq)[:, 0] for seq in (*rich, *shifted)]

    results = []
    for module, encode in ((standard, standard_encode),
                           (fast, lambda leaves: fast.encode(neighbours, leaves, table))):
        leaves = [c.clone().requires_grad_() for c in preds]
        torch.manual_seed(7)
        outputs = encode(leaves)
        after = torch.rand(3)
        weights = torch.randn(4, 6, 16, dtype=torch.float64,
                              generator=torch.Generator().manual_seed(1))
        sum((w * out).sum() for w, out in zip(weights, outputs, strict=True)).backward()
        grads = [*(c.grad for c in leaves), *(p.grad for p in module.parameters())]
        results.append((outputs, after, grads))
    (want_out, want_after, want_grads), (got_out, got_after, got_grads) = results
    assert torch.equal(want_after, got_after)
    for want, got in zip(want_out, got_out, strict=True):
        assert got.shape == (6, 16)
        assert torch.allclose(want, got, rtol=0, atol=1e-12)
    for want, got in zip(want_grads, got_grads, strict=True):
        assert torch.allclose(want, got, rtol=0, atol=1e-12)

def test_loss_is_weighted_sum_of_terms_and_nn_term_is_nnclr():
    method = small_all4one()
    views, indices = tiny_batch(8, seed=0)
    z, p, c, m = heads(method, views)
    nn1, _ = support_neighbours(m[0], method.queue, 1)
    nn2, _ = support_neighbours(m[1], method.queue, 1)
    out = method.loss_and_update(z, p, c, m, indices)
    total = 0.5 * (out["loss_centroid"] + out["loss_nn"] + out["loss_feature"])
    assert out["loss"].item() == pytest.approx(total.item(), abs=1e-5)
    expected_nn = nnclr_loss(nn1[:, 0], p[0], nn2[:, 0], p[1], 0.2)
    assert out["loss_nn"].item() == pytest.approx(expected_nn.item(), abs=1e-6)
    expected_feature = feature_rms_loss(m[0], z[0], m[1], z[1])
    assert out["loss_feature"].item() == pytest.approx(expected_feature.item(), abs=1e-6)


@pytest.mark.parametrize("nn_source", ["momentum", "online"])
def test_gradients_follow_the_stop_gradients(nn_source):
    method = small_all4one(nn_source=nn_source)
    views, indices = tiny_batch(8, seed=0)
    z, p, c, m = heads(method, views)
    leaves = [t.detach().requires_grad_() for t in (*z, *p, *c)]
    z_l, p_l, c_l = leaves[:2], leaves[2:4], leaves[4:]
    loss = method.loss_and_update(z_l, p_l, c_l, m, indices)["loss"]
    grads = torch.autograd.grad(loss, leaves + list(method.transformer.parameters()))
    # z reaches the loss only through the feature term (the lookup is detached)
    feature_only = torch.autograd.grad(0.5 * feature_rms_loss(m[0], z_l[0], m[1], z_l[1]), z_l)
    for got, want in zip(grads[:2], feature_only, strict=True):
        assert torch.allclose(got, want, atol=1e-6)
    # p through L_nn, c through the shifted sequences, and the transformer learns from both paths
    assert all(g.abs().sum() > 0 for g in grads[2:6])
    assert all(g.abs().sum() > 0 for g in grads[6:])


def test_training_step_gradients_reach_online_modules_only():
    method = small_all4one()
    out = method.training_step(*tiny_batch(8, seed=0))
    out["loss"].backward()
    for name, param in method.named_parameters():
        if name.startswith("momentum_encoder."):
            assert param.grad is None and not param.requires_grad, name
        else:
            assert param.grad is not None, name
    assert not method.queue.data.requires_grad
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")


def test_ema_follows_cosine_schedule_after_optimizer_step():
    method = small_all4one()
    online = list(method.backbone.parameters()) + list(method.projector.parameters())
    ema = list(method.momentum_encoder.parameters())
    assert all(torch.equal(a, b) for a, b in zip(online, ema, strict=True))
    with torch.no_grad():
        for param in online:
            param.add_(0.5)
    before = [e.detach().clone() for e in ema]
    method.after_optimizer_step(3, 10)
    tau = 1.0 - 0.01 * (math.cos(math.pi * 0.3) + 1) / 2
    assert momentum_at(0.99, 1.0, 3, 10, "cosine") == pytest.approx(tau)
    for old, new, src in zip(before, ema, online, strict=True):
        assert torch.allclose(new, tau * old + (1 - tau) * src, atol=1e-6)
    method.after_optimizer_step(10, 10)  # τ = 1 at the end: frozen
    frozen = [e.detach().clone() for e in ema]
    with torch.no_grad():
        online[0].add_(1.0)
    method.after_optimizer_step(10, 10)
    assert all(torch.equal(a, b) for a, b in zip(frozen, ema, strict=True))


def test_queue_holds_view1_momentum_embeddings_after_three_steps():
    method = small_all4one()
    pushed = []
    for step in range(3):
        views, indices = tiny_batch(8, seed=step)
        method.training_step(views, indices)
        with torch.no_grad():
            pushed.append(F.normalize(method.momentum_encoder(views[0]), dim=1))
    queue = method.queue
    assert int(queue.pointer) == 8 and int(queue.filled) == 16
    assert torch.allclose(queue.data[:8], pushed[2], atol=1e-6)
    assert torch.allclose(queue.data[8:], pushed[1], atol=1e-6)
    assert queue.labels.tolist() == list(range(200, 208)) + list(range(100, 108))


def test_empty_queue_partial_fill_and_exclude_self():
    for exclude in (False, True):
        method = small_all4one(queue_init="empty", exclude_self=exclude)
        views, indices = tiny_batch(8, seed=0)
        first = method.training_step(views, indices)  # support set: the batch itself
        assert torch.isfinite(first["loss"])
        assert first["nn_self_rate"].item() == (0.0 if exclude else 1.0)
        assert int(method.queue.filled) == 8 and int(method.queue.pointer) == 8
        # only the 8 filled rows are searched; the same images find their stored copies
        _, ids = support_neighbours(method.queue.data[:8] * -1, method.queue, 5)
        assert set(ids.flatten().tolist()) <= set(indices.tolist())
        second = method.training_step(views, indices)
        assert second["nn_self_rate"].item() == (0.0 if exclude else 1.0)


def test_batch_permutation_leaves_loss_unchanged():
    method = small_all4one(transformer_dropout=0.0)
    twin = copy.deepcopy(method)
    views, indices = tiny_batch(8, seed=4)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    loss = method.training_step(views, indices)["loss"]
    permuted = twin.training_step([v[perm] for v in views], indices[perm])["loss"]
    assert permuted.item() == pytest.approx(loss.item(), abs=1e-5)


def test_options_change_what_they_should():
    views, indices = tiny_batch(8, seed=5)
    base = small_all4one(transformer_dropout=0.0).training_step(views, indices)
    global_stats = small_all4one(transformer_dropout=0.0, feature_stats="global")
    assert global_stats.training_step(views, indices)["loss"].item() == pytest.approx(
        base["loss"].item(), abs=1e-6
    )  # identical on one process
    standard = small_all4one(transformer_dropout=0.0, pos_enc="standard")
    out = standard.training_step(views, indices)
    assert out["loss_centroid"].item() != pytest.approx(base["loss_centroid"].item(), abs=1e-4)
    assert out["loss_nn"].item() == pytest.approx(base["loss_nn"].item(), abs=1e-6)
    barlow = small_all4one(transformer_dropout=0.0, feature_loss="barlow")
    assert barlow.training_step(views, indices)["loss_feature"].item() != pytest.approx(
        base["loss_feature"].item(), abs=1e-3
    )


# ------------------------------------------------------------------------ optimiser, checks
def test_transformer_group_has_fixed_lr():
    method = small_all4one()
    groups = method.parameter_groups()
    trainable = {id(p) for p in method.parameters() if p.requires_grad}
    listed = [id(p) for g in groups for p in g["params"]]
    assert sorted(listed) == sorted(trainable)  # every trainable parameter once, no EMA copy
    transformer = {id(p) for p in method.transformer.parameters()}
    for group in groups:
        in_transformer = {id(p) in transformer for p in group["params"]}
        assert in_transformer == {group["name"].startswith("transformer")}
        assert group.get("fixed_lr") == (0.1 if group["name"].startswith("transformer") else None)
        assert all((p.ndim <= 1) == group.get("is_1d", False) for p in group["params"])
    settings = OptimizerSettings.from_dict(
        {"name": "lars", "lr": 1.0, "weight_decay": 1e-5, "exclude_1d": True,
         "schedule": "warmup_cosine"}
    )
    optimizer = build_optimizer(groups, settings, settings.peak_lr(512))
    lrs = {g["name"]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups}
    assert lrs == {
        "weights": (2.0, 1e-5), "biases_and_norms": (2.0, 0.0),
        "transformer_weights": (0.1, 1e-5), "transformer_biases_and_norms": (0.1, 0.0),
    }


def test_batch_checks_name_the_numbers():
    method = small_all4one()
    with pytest.raises(MethodConfigError, match="n_neighbors=5 needs a batch of more than 5"):
        method.check_batch(5, 100)
    with pytest.raises(MethodConfigError, match="queue size 16 is not a multiple of the global batch 6"):
        method.check_batch(6, 100)
    method.check_batch(8, 100)
    with pytest.raises(MethodConfigError, match="transformer_heads=3"):
        small_all4one(transformer_heads=3)
    with pytest.raises(MethodConfigError, match="permuted"):
        small_all4one(pos_enc="sinusoidal")


def test_preset_yaml_matches_spec():
    digits = resolve_run_config(compose_config(["method=all4one"]))
    in100 = resolve_run_config(compose_config(["method=all4one", "dataset=imagenet100"]))
    method = digits["method"]
    assert method["queue_size"] == 1024 and in100["method"]["queue_size"] == 98304
    assert method["base"] == "nnclr/solo"
    assert method["optimizer"]["lr"] == 1.0 and method["transformer_lr"] == 0.1
    assert method["pos_enc"] == "permuted" and method["centroid_temperature"] == 0.1
