"""CLD: batch k-means as CLD codes it, the cross-level loss, and the method on MoCo / SimCLR."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from methods import MethodConfigError, build_method
from methods.blocks import NormLinear
from methods.cld import (
    cld_loss,
    cross_level_cross_entropy,
    cross_level_discrimination,
    spherical_kmeans,
)
from tests.tiny import TinyBackbone, tiny_views


def reference_kmeans(x: torch.Tensor, k: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CLD's spectral_clustering.KMeans transliterated (CPU, no .cuda()): direct distances over
    an (N, K, D) tensor, first-k init, empty clusters counted as 1."""
    n, d = x.shape
    c = x[:k, :].clone()
    for _ in range(iters):
        dist = ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)
        cl = dist.argmin(dim=1).long().view(-1)
        counts = torch.ones(k, dtype=torch.long)
        labels, count = cl.unique(return_counts=True)
        counts[labels] = count
        c = torch.zeros(k, d, dtype=x.dtype).scatter_add_(0, cl[:, None].expand(-1, d), x)
        c = c / counts.to(x.dtype)[:, None]
    return cl, c


# ---------------------------------------------------------------------------------- k-means
def test_kmeans_hand_case_unnormalised_centroids():
    # Two pairs around ±x: first-k init at (1,0) and (−1,0); (0.8, 0.6) joins the first, its
    # mirror the second. Centroids are means, norm √0.9 < 1, not re-normalised.
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.8, 0.6], [-0.8, -0.6]])
    centroids, labels = spherical_kmeans(x, 2, 5)
    assert labels.tolist() == [0, 1, 0, 1]
    assert torch.allclose(centroids, torch.tensor([[0.9, 0.3], [-0.9, -0.3]]), atol=1e-6)


def test_kmeans_empty_cluster_is_zero_and_can_recapture_points():
    # Rows 0 and 1 are equal, so both initial centroids are (1,0): ties go to index 0 and
    # cluster 1 empties into a zero centroid. After one iteration c_0 = mean of all = (¼, 0).
    # Next, the 120° and 240° points are nearer the zero centroid (distance 1) than c_0
    # (distance 1.3125): 2·x·c_0 = −¼ < ‖c_0‖² = 1/16, so cluster 1 captures them.
    s = math.sqrt(3) / 2
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-0.5, s], [-0.5, -s]])
    one, labels_one = spherical_kmeans(x, 2, 1)
    assert labels_one.tolist() == [0, 0, 0, 0]
    assert torch.allclose(one, torch.tensor([[0.25, 0.0], [0.0, 0.0]]), atol=1e-6)
    two, labels_two = spherical_kmeans(x, 2, 2)
    assert labels_two.tolist() == [0, 0, 1, 1]
    assert torch.allclose(two, torch.tensor([[1.0, 0.0], [-0.5, 0.0]]), atol=1e-6)


def test_kmeans_more_clusters_than_points_gives_zero_surplus_centroids():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    centroids, labels = spherical_kmeans(x, 3, 5)
    assert labels.tolist() == [0, 1]
    assert torch.equal(centroids, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))


@pytest.mark.parametrize(
    "n,k,dim,dtype",
    [(40, 6, 8, torch.float64), (7, 12, 5, torch.float64), (256, 200, 64, torch.float32)],
)
def test_kmeans_matches_cld_reference(n, k, dim, dtype):
    generator = torch.Generator().manual_seed(n + k)
    x = F.normalize(torch.randn(n, dim, generator=generator, dtype=dtype), dim=1)
    x[n // 2] = x[0]  # a duplicate row: exact ties must resolve to the lowest index
    expected_labels, expected = reference_kmeans(x, k, 5)
    centroids, labels = spherical_kmeans(x, k, 5)
    assert torch.equal(labels, expected_labels)
    assert centroids.dtype == dtype
    assert torch.allclose(centroids, expected, atol=1e-6)


def test_kmeans_random_init_is_deterministic_given_a_generator():
    x = F.normalize(torch.randn(30, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    a = spherical_kmeans(x, 5, 3, torch.Generator().manual_seed(1), init="random")
    b = spherical_kmeans(x, 5, 3, torch.Generator().manual_seed(1), init="random")
    c = spherical_kmeans(x, 5, 3, torch.Generator().manual_seed(2), init="random")
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    assert not torch.equal(a[1], c[1])  # another seed starts elsewhere (and ends elsewhere here)
    first = spherical_kmeans(x, 5, 3)
    assert not torch.equal(first[1], a[1])
    with pytest.raises(ValueError, match="first_k, random"):
        spherical_kmeans(x, 5, 3, init="kmeans++")


def test_kmeans_gradient_reaches_points_only_through_final_means():
    x = F.normalize(torch.randn(10, 3, generator=torch.Generator().manual_seed(3)), dim=1)
    x.requires_grad_(True)
    centroids, labels = spherical_kmeans(x, 3, 4)
    assert centroids.requires_grad and not labels.requires_grad
    (grad,) = torch.autograd.grad(centroids[0].sum(), x)
    # ∂M_0/∂x_i = 1/n_0 for the members of cluster 0, zero elsewhere
    members = (labels == 0).double()
    expected = (members / members.sum())[:, None].expand(-1, 3)
    assert torch.allclose(grad, expected.to(grad.dtype), atol=1e-7)


# ---------------------------------------------------------------------------------- loss
def test_cld_loss_hand_case_raw_and_normalised():
    # Both views are the 4 points of the first k-means test, τ_G = 1, k = 2. Each row's target
    # logit is 0.9 and the other −0.9 → L = log(1 + e^{−1.8}); normalised centroids make the
    # logits ±√0.9 → L = log(1 + e^{−2√0.9}).
    g = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.8, 0.6], [-0.8, -0.6]])
    assert cld_loss(g, g.clone(), 2, 1.0).item() == pytest.approx(0.152978, abs=1e-6)
    normalised = cld_loss(g, g.clone(), 2, 1.0, centroid_mode="normalized").item()
    assert normalised == pytest.approx(math.log1p(math.exp(-2 * math.sqrt(0.9))), abs=1e-6)
    assert normalised == pytest.approx(0.139730, abs=1e-6)


def test_cld_loss_empty_cluster_raw_logit_zero_vs_masked():
    # Duplicated rows leave cluster 1 empty (zero centroid). Raw: logits [1, 0, −1] →
    # log(1 + e^{−1} + e^{−2}); normalized masks the empty cluster → log(1 + e^{−2}).
    g = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])
    raw = cld_loss(g, g.clone(), 3, 1.0).item()
    assert raw == pytest.approx(math.log(1 + math.exp(-1) + math.exp(-2)), abs=1e-6)
    masked = cld_loss(g, g.clone(), 3, 1.0, centroid_mode="normalized").item()
    assert masked == pytest.approx(math.log1p(math.exp(-2)), abs=1e-6)


def reference_cld(g1: torch.Tensor, g2: torch.Tensor, k: int, tau: float, iters: int) -> float:
    """Loops in float64: k-means per view (reference), then ½ of the two cross-entropies."""
    z = [F.normalize(g.double(), dim=1) for g in (g1, g2)]
    clustered = [reference_kmeans(v, k, iters) for v in z]
    total = 0.0
    for anchor, (labels, centroids) in ((z[0], clustered[1]), (z[1], clustered[0])):
        for i in range(anchor.shape[0]):
            logits = [float(anchor[i] @ centroids[j]) / tau for j in range(k)]
            top = max(logits)
            log_norm = top + math.log(sum(math.exp(v - top) for v in logits))
            total += (log_norm - logits[int(labels[i])]) / anchor.shape[0]
    return total / 2


@pytest.mark.parametrize("n,k,tau", [(12, 3, 0.2), (9, 9, 0.5), (6, 8, 0.1)])
def test_cld_loss_matches_loop_reference(n, k, tau):
    generator = torch.Generator().manual_seed(10 * n + k)
    g1, g2 = torch.randn(n, 5, generator=generator), torch.randn(n, 5, generator=generator)
    loss = cld_loss(g1 * 3.0, g2, k, tau, 5)  # scale: normalised inside
    assert loss.item() == pytest.approx(reference_cld(g1, g2, k, tau, 5), rel=1e-5)


def test_cld_gradients_through_centroids_and_stop_gradient_option():
    generator = torch.Generator().manual_seed(5)
    g1 = torch.randn(8, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    g2 = torch.randn(8, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    # Assignments are locally constant, so the loss is smooth at a generic point: finite
    # differences check the gradient through the means (and through the normalisations).
    for mode in ("raw", "normalized"):
        assert torch.autograd.gradcheck(
            lambda a, b, m=mode: cld_loss(a, b, 3, 0.3, centroid_mode=m), (g1, g2), fast_mode=True
        )
    # centroid_grad=False: the view-1→2 term reaches g2 only through M⁽²⁾, so detaching M leaves
    # g2 with exactly the gradient of the view-2→1 term.
    detached = cld_loss(g1, g2, 3, 0.3, centroid_grad=False)
    (grad_g2,) = torch.autograd.grad(detached, g2)
    m1, labels1 = spherical_kmeans(F.normalize(g1.detach(), dim=1), 3, 5)
    only_anchor = 0.5 * cross_level_cross_entropy(g2, m1, labels1, 0.3)
    (expected,) = torch.autograd.grad(only_anchor, g2)
    assert torch.allclose(grad_g2, expected)
    (full,) = torch.autograd.grad(cld_loss(g1, g2, 3, 0.3), g2)
    assert not torch.allclose(full, expected)


def test_cross_level_terms_report_accuracy_and_clusters():
    g = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.8, 0.6], [-0.8, -0.6]])
    terms = cross_level_discrimination(g, g.clone(), 2, 1.0)
    assert terms.accuracy.item() == 1.0 and terms.clusters_used.item() == 2.0
    assert not terms.accuracy.requires_grad


# ---------------------------------------------------------------------------------- method
def small_cld(**options) -> torch.nn.Module:
    defaults = {"queue_size": 8, "dim": 4, "clusters": 3}
    return build_method("cld", TinyBackbone(), **{**defaults, **options})


def test_normlinear_starts_with_unit_columns_of_a_uniform_draw():
    # CLD's NormedLinear: weight (in, out) = uniform(-1, 1), each column renormalised to norm 1.
    # Our weight is (out, in), so CLD's columns are its rows.
    torch.manual_seed(0)
    layer = NormLinear(96, 128)
    norms = layer.weight.norm(dim=1)
    assert norms.shape == (128,)
    torch.testing.assert_close(norms, torch.ones(128), atol=1e-6, rtol=0)
    torch.manual_seed(0)
    draw = torch.empty(96, 128).uniform_(-1, 1)
    torch.testing.assert_close(layer.weight, (draw / draw.norm(dim=0, keepdim=True)).T)
    assert float(draw.abs().max()) <= 1.0 and float(draw.std()) == pytest.approx(3**-0.5, abs=0.01)
    # as many random numbers as nn.Linear's init: the draws after it are unchanged
    after_norm = torch.rand(3)
    torch.manual_seed(0)
    torch.nn.init.kaiming_uniform_(torch.empty(128, 96), a=math.sqrt(5))
    torch.testing.assert_close(torch.rand(3), after_norm)
    # both heads of the default preset (normlinear) start at unit norm, not Kaiming's ≈ 0.58
    torch.manual_seed(0)
    method = small_cld(dim=16)
    for head in (method.head, method.group_head):
        assert isinstance(head, NormLinear)
        torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(16), atol=1e-6, rtol=0)


def test_step_grads_reach_online_heads_and_not_the_key_encoder():
    torch.manual_seed(0)
    method = small_cld()
    out = method.training_step(tiny_views(4, views=3), torch.arange(4))
    assert set(out) == {"loss", "loss_instance", "loss_cld", "cld_accuracy", "clusters_used"}
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    assert out["loss"].item() == pytest.approx(
        out["loss_instance"].item() + 0.8 * out["loss_cld"].item(), rel=1e-6
    )
    out["loss"].backward()
    for module in (method.backbone, method.head, method.group_head):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert all(p.grad is None for p in method.key_encoder.parameters())
    assert not method.queue.data.requires_grad


def test_queue_and_ema_after_optimizer_steps():
    torch.manual_seed(1)
    method = small_cld(momentum=0.5)  # default ema_timing=after_step (CLD CIFAR code)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5)
    for step in range(2):
        views = tiny_views(4, views=3, seed=step)
        with torch.no_grad():
            keys = F.normalize(method.key_encoder(views[2]), dim=1)
        online = [p.detach().clone() for p in method.online.parameters()]
        ema = [p.detach().clone() for p in method.key_encoder.parameters()]
        out = method.training_step(views, torch.arange(4))
        # the third view's keys land at the queue pointer, once per step
        assert torch.allclose(method.queue.data[4 * step : 4 * step + 4], keys, atol=1e-6)
        assert int(method.queue.pointer) == (4 * step + 4) % 8
        # nothing moves the key encoder before the optimiser step
        for old, new in zip(ema, method.key_encoder.parameters(), strict=True):
            assert torch.equal(old, new)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        assert not all(
            torch.equal(a, b) for a, b in zip(online, method.online.parameters(), strict=True)
        )
        method.after_optimizer_step(step, 2)
        for old, q, new in zip(
            ema, method.online.parameters(), method.key_encoder.parameters(), strict=True
        ):
            assert torch.allclose(new, 0.5 * old + 0.5 * q, atol=1e-6)


def test_lambda_zero_is_moco_cld_base_step_for_step():
    base_options = {
        "queue_size": 8,
        "dim": 4,
        "temperature": 0.07,
        "head": "normlinear",
        "views": 3,
        "ema_timing": "after_step",
        "queue_init": "uniform",
    }
    losses = {}
    for name, extra in (("moco", {}), ("cld", {"cld_lambda": 0.0, "clusters": 3})):
        torch.manual_seed(7)
        method = build_method(name, TinyBackbone(), **base_options, **extra)
        optimizer = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        losses[name] = []
        for step in range(3):
            out = method.training_step(tiny_views(4, views=3, seed=step), torch.arange(4))
            optimizer.zero_grad()
            out["loss"].backward()
            optimizer.step()
            method.after_optimizer_step(step, 3)
            losses[name].append(out["loss"].item())
    assert losses["cld"] == losses["moco"]


def test_variants_train_a_step():
    torch.manual_seed(2)
    for options in (
        {"views": 2, "direction": "symmetric"},
        {"base_loss": "simclr", "views": 2},
        {"head": "normmlp", "ema_timing": "before_keys"},
        {"head": "linear"},
        {"centroids": "normalized", "centroid_grad": False, "kmeans_init": "random"},
        {"kmeans_scope": "local"},
    ):
        method = small_cld(**options)
        views = tiny_views(4, views=len(method.view_kinds()))
        out = method.training_step(views, torch.arange(4))
        out["loss"].backward()
        method.after_optimizer_step(0, 1)
        assert torch.isfinite(out["loss"]), options
    symmetric = small_cld(views=2, direction="symmetric")
    symmetric.training_step(tiny_views(4, views=2), torch.arange(4))
    assert int(symmetric.queue.pointer) == 0  # both key batches: 2 × 4 rows into a queue of 8
    simclr = small_cld(base_loss="simclr", views=2)
    # composed from MoCo's pieces: the SimCLR base builds neither momentum encoder nor queue
    assert not hasattr(simclr, "key_encoder") and not hasattr(simclr, "queue")
    assert not any(k.startswith(("key_encoder.", "queue.")) for k in simclr.state_dict())
    assert not simclr.uses_shuffle_bn() and simclr.local_bn_modules() == []
    assert simclr.view_kinds() == ["shared", "shared"]
    simclr.check_batch(6, 100)  # no queue, so no multiple-of-batch rule


def test_random_kmeans_init_reproducible_from_global_seed():
    losses = []
    for _ in range(2):
        torch.manual_seed(3)
        method = small_cld(kmeans_init="random")
        torch.manual_seed(11)  # the engine reseeds the global RNG per epoch
        losses.append(method.training_step(tiny_views(6, views=3), torch.arange(6))["loss"].item())
    assert losses[0] == losses[1]


def test_partial_last_batch_with_fewer_images_than_clusters_still_trains():
    method = small_cld(clusters=6)
    method.check_batch(8, 100)
    # 5 images < 6 clusters (the official loader's last batch): every point is its own cluster
    out = method.training_step(tiny_views(5, views=3), torch.arange(5))
    assert torch.isfinite(out["loss"]) and out["clusters_used"].item() == 5.0
    out["loss"].backward()


def test_loss_is_float32_under_autocast():
    method = small_cld()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method.training_step(tiny_views(4, views=3), torch.arange(4))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])


def test_batch_errors_name_the_numbers():
    method = build_method("cld", TinyBackbone(), queue_size=1024, clusters=200)
    with pytest.raises(MethodConfigError, match="clusters=200 exceeds the 128 images"):
        method.check_batch(128, 1437)
    with pytest.raises(MethodConfigError, match="1024 is not a multiple of the global batch 384"):
        method.check_batch(384, 1437)
    method.check_batch(256, 1437)
    symmetric = build_method("cld", TinyBackbone(), queue_size=768, views=2, direction="symmetric")
    with pytest.raises(MethodConfigError, match="768 is not a multiple of the global batch 512"):
        symmetric.check_batch(256, 1437)


def test_config_errors_list_valid_values():
    with pytest.raises(MethodConfigError, match="raw, normalized"):
        build_method("cld", TinyBackbone(), centroids="unit")
    with pytest.raises(MethodConfigError, match="normmlp"):
        build_method("cld", TinyBackbone(), head="bn_mlp")
    with pytest.raises(MethodConfigError, match="direction=symmetric"):
        build_method("cld", TinyBackbone(), views=2)
    with pytest.raises(MethodConfigError, match="views=2"):
        build_method("cld", TinyBackbone(), base_loss="simclr")
    with pytest.raises(MethodConfigError, match="clusters=0"):
        build_method("cld", TinyBackbone(), clusters=0)
    with pytest.raises(MethodConfigError, match="cld_lambda"):
        build_method("cld", TinyBackbone(), cld_lambda=-1.0)


def test_kmeans_shortlist_is_exact_under_reduced_matmul_precision(monkeypatch):
    # With TF32 matmuls (or mixed TF32 flags, where torch will not report the precision) the
    # expanded-form shortlist widens; the direct-form result must not change.
    x = F.normalize(torch.randn(64, 16, generator=torch.Generator().manual_seed(9)), dim=1)
    expected_labels, expected = reference_kmeans(x, 40, 5)

    def refuse() -> str:
        raise RuntimeError("mixed legacy and new TF32 flags")

    for precision in (lambda: "high", refuse):
        monkeypatch.setattr(torch, "get_float32_matmul_precision", precision)
        centroids, labels = spherical_kmeans(x, 40, 5)
        assert torch.equal(labels, expected_labels)
        assert torch.allclose(centroids, expected, atol=1e-6)
