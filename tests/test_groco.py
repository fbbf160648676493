"""GroCo: the loss against hand-computed values, the loss-scale table of docs/methods/groco.md
and an independent diffsort-based reimplementation; options, stop-gradients, errors, and an
ablation grid on digits through the CLI that ends in the report's group-size table and plot."""

from __future__ import annotations

import json
import math

import diffsort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from methods import MethodConfigError, build_method
from methods.groco import groco_loss, group_ordering_loss
from tests.conftest import run_cli
from tests.tiny import TinyBackbone

BACKENDS = ("group_sum", "columns", "diffsort")


# ------------------------------------------------------------------------------- reference
def reference_groco(
    views: list[torch.Tensor], k: int, n_pos: int | None = None, steepness: float = 1.0,
    network: str = "odd_even", stop_grad: bool = True,
) -> torch.Tensor:
    """The official loss written out plainly (learning_by_sorting losses/groco.py, one process):
    diffsort's DiffSortNet forms P, both BCE halves on its column sums."""
    n_views = len(views)
    n_pos = n_views if n_pos is None else n_pos
    total = 0.0
    for a in range(n_views):
        anchor = F.normalize(views[a], dim=1, eps=1e-8)
        keys = [F.normalize(v, dim=1, eps=1e-8) for v in views]
        keys = [key.detach() for key in keys] if stop_grad else keys
        pos = torch.stack([(anchor * keys[p]).sum(1) for p in range(n_pos) if p != a], 1)
        pos = pos.sort(1).values
        neg = anchor @ keys[a].T
        neg = neg.masked_fill(torch.eye(len(anchor), dtype=torch.bool), -math.inf)
        neg = neg.topk(k, dim=1).values.flip(1)
        group = torch.cat([neg, pos], 1)
        sorter = diffsort.DiffSortNet(network, group.shape[1], steepness=steepness,
                                      distribution="cauchy")
        _, perm = sorter(group)
        q_pos = perm[:, :, k:].sum(2).clip(0, 1)
        q_neg = perm[:, :, :k].sum(2).clip(0, 1)
        labels = (torch.arange(group.shape[1]) >= k).to(group.dtype).expand_as(q_pos)
        total = total + (F.binary_cross_entropy(q_pos, labels)
                         + F.binary_cross_entropy(q_neg, 1 - labels)) / 2
    return total / n_views


def random_views(n_views: int, batch: int, dim: int, dtype=torch.float64, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dim, generator=generator, dtype=dtype).requires_grad_()
            for _ in range(n_views)]


# ------------------------------------------------------------------------------- values
def test_two_element_groups_by_hand():
    """k = 1, one positive: one comparator, α = ½ + arctan(pos − neg)/π, and ℓ = −log α."""
    s = math.sqrt(0.75)
    view0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    view1 = torch.tensor([[0.5, s], [s, 0.5]], dtype=torch.float64)
    # anchor view 0: pos = 0.5 and neg = 0 for both images; anchor view 1: pos 0.5, neg = 2·0.5·s
    def alpha(d: float) -> float:
        return 0.5 + math.atan(d) / math.pi

    expected = 0.5 * (-math.log(alpha(0.5)) - math.log(alpha(0.5 - 2 * 0.5 * s)))
    for backend in BACKENDS:
        loss = groco_loss([view0, view1], topk_neg=1, backend=backend)
        assert loss.item() == pytest.approx(expected, abs=1e-12), backend


@pytest.mark.parametrize("steepness,expected", [
    (1.0, (0.147, 0.202, 0.264)), (5.0, (0.030, 0.202, 0.411)), (10.0, (0.015, 0.202, 0.475)),
])
def test_loss_scale_table(steepness, expected):
    """docs/methods/groco.md §3 for n = 11: perfectly ordered, all tied, fully inverted groups."""
    k = 10
    groups = torch.tensor([[-1.0] * k + [1.0], [0.0] * 11, [1.0] * k + [-1.0]], dtype=torch.float64)
    for backend in BACKENDS:
        values = [group_ordering_loss(g[None], k, steepness=steepness, backend=backend).item()
                  for g in groups]
        assert values == pytest.approx(expected, abs=6e-4), backend


@pytest.mark.parametrize("n_views,n_pos,k", [(2, None, 10), (3, None, 5), (4, None, 7), (5, 2, 6)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_the_official_formulation_in_float64(n_views, n_pos, k, backend):
    views = random_views(n_views, 24, 16)
    expected = reference_groco(views, k, n_pos)
    expected_grads = torch.autograd.grad(expected, views)
    loss = groco_loss(views, topk_neg=k, n_pos_views=n_pos, backend=backend)
    grads = torch.autograd.grad(loss, views)
    assert abs(loss.item() - expected.item()) < 1e-10
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("network", ["odd_even", "bitonic"])
def test_matches_the_official_formulation_in_float32(backend, network):
    views = random_views(2, 64, 32, dtype=torch.float32, seed=3)
    expected = reference_groco(views, 10, network=network)
    expected_grads = torch.autograd.grad(expected, views)
    loss = groco_loss(views, topk_neg=10, network=network, backend=backend)
    grads = torch.autograd.grad(loss, views)
    assert abs(loss.item() - expected.item()) < 1e-6
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_stop_grad_changes_gradients_not_the_value():
    views = random_views(2, 16, 8, seed=1)
    detached = groco_loss(views, topk_neg=5, stop_grad=True)
    through = groco_loss(views, topk_neg=5, stop_grad=False)
    assert detached.item() == pytest.approx(through.item(), abs=1e-14)
    g_detached = torch.autograd.grad(detached, views)
    g_through = torch.autograd.grad(through, views)
    assert (g_detached[0] - g_through[0]).abs().max() > 1e-4
    ref = reference_groco(views, 5, stop_grad=False)
    for got, want in zip(g_through, torch.autograd.grad(ref, views), strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_with_stop_grad_a_view_learns_only_through_its_own_anchor_terms():
    """Under stop-gradient, the gradient on view 1 is that of ℓ_1 / V alone: recomputing the loss
    with view 0 replaced by a detached copy changes nothing on view 1."""
    views = random_views(2, 16, 8, seed=2)
    full = torch.autograd.grad(groco_loss(views, topk_neg=4), views[1])[0]
    frozen = [views[0].detach(), views[1]]
    alone = torch.autograd.grad(groco_loss(frozen, topk_neg=4), views[1])[0]
    torch.testing.assert_close(full, alone, atol=1e-14, rtol=0)


def test_all_views_negatives_differ_and_include_other_views():
    views = random_views(3, 12, 6, seed=4)
    same = groco_loss(views, topk_neg=11)
    every = groco_loss(views, topk_neg=11, negatives="all_views")
    assert abs(same.item() - every.item()) > 1e-4
    # 3 views × 11 other images = 33 candidates: k = 33 is allowed only with all_views
    groco_loss(views, topk_neg=33, negatives="all_views")
    with pytest.raises(ValueError, match="topk_neg=33"):
        groco_loss(views, topk_neg=33)


def test_permuting_the_batch_leaves_the_loss_unchanged():
    views = random_views(2, 20, 8, seed=5)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    a = groco_loss(views, topk_neg=6)
    b = groco_loss([v[perm] for v in views], topk_neg=6)
    assert a.item() == pytest.approx(b.item(), abs=1e-12)


def test_well_separated_groups_give_a_small_loss_in_the_steep_limit():
    """Every network sorts exactly in the hard limit: ordered groups cost ~0, inverted ones a lot."""
    ordered = torch.tensor([[-0.9, -0.5, -0.2, 0.1, 0.6, 0.8, 0.9]], dtype=torch.float64)
    for network in ("odd_even", "bitonic", "bitonic_merge"):
        loss = group_ordering_loss(ordered, 5, network=network, steepness=1e6)
        assert loss.item() < 1e-5, network
        inverted = torch.tensor([[0.5, 0.6, 0.7, 0.8, 0.9, -0.9, -0.5]], dtype=torch.float64)
        assert group_ordering_loss(inverted, 5, network=network, steepness=1e6).item() > 1.0


def test_bitonic_merge_is_a_different_relaxation():
    """docs/sorting-networks.md §8: at β = 1 the merge mixes negatives with positives more strongly."""
    generator = torch.Generator().manual_seed(0)
    neg = (torch.rand(64, 10, generator=generator, dtype=torch.float64) * 0.8 - 0.2).sort(1).values
    pos = (torch.rand(64, 1, generator=generator, dtype=torch.float64) * 0.7 + 0.2)
    groups = torch.cat([neg, pos], 1)
    odd_even = group_ordering_loss(groups, 10).item()
    merge = group_ordering_loss(groups, 10, network="bitonic_merge").item()
    assert odd_even == pytest.approx(0.197, abs=0.02)
    assert merge == pytest.approx(0.304, abs=0.03)
    assert merge > odd_even + 0.05


def test_half_precision_inputs_are_computed_in_float32():
    views = random_views(2, 16, 8, dtype=torch.float32, seed=6)
    want = groco_loss(views, topk_neg=5)
    got = groco_loss([v.detach().bfloat16().float().bfloat16() for v in views], topk_neg=5)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(
        groco_loss([v.detach().bfloat16().float() for v in views], topk_neg=5).item(), abs=1e-6)
    assert math.isfinite(want.item())


# ------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs,needles", [
    ({"topk_neg": 16}, ["topk_neg=16", "[1, 15]"]),
    ({"topk_neg": 0}, ["topk_neg=0"]),
    ({"n_pos_views": 1}, ["n_pos_views=1", "[2, 2]"]),
    ({"network": "quick"}, ["quick", "odd_even", "bitonic_merge"]),
    ({"distribution": "normal"}, ["normal", "cauchy", "optimal"]),
    ({"backend": "dense"}, ["dense", "group_sum", "columns", "diffsort"]),
    ({"steepness": 0.0}, ["steepness=0.0"]),
    ({"negatives": "other"}, ["other", "same_view", "all_views"]),
])
def test_bad_arguments_name_the_value_and_the_valid_ones(kwargs, needles):
    views = random_views(2, 16, 8)
    with pytest.raises(ValueError) as err:
        groco_loss(views, **kwargs)
    for needle in needles:
        assert needle in str(err.value)


def test_non_finite_similarities_are_refused():
    views = random_views(2, 16, 8)
    bad = views[1].detach().clone()
    bad[3, 0] = math.nan
    with pytest.raises(ValueError, match="non-finite similarity"):
        groco_loss([views[0], bad], topk_neg=5)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="at least 2 views"):
        groco_loss([torch.randn(4, 3)])
    with pytest.raises(ValueError, match="one shape"):
        groco_loss([torch.randn(4, 3), torch.randn(5, 3)])


# ------------------------------------------------------------------------------- method
def test_method_heads_views_and_gradients():
    torch.manual_seed(0)
    method = build_method("groco", TinyBackbone(), proj_output_dim=16)
    linears = [m for m in method.projector.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 8), (8, 8), (8, 16)]
    assert method.view_kinds() == ["shared", "shared"]
    views = [torch.randn(12, 3, 4, 4) for _ in range(2)]
    out = method.training_step(views, torch.arange(12))
    out["loss"].backward()
    assert 0.1 < out["loss"].item() < 0.3  # GroCo's whole range at β = 1 is 0.147-0.264
    assert all(p.grad is not None for p in method.backbone.parameters())
    multicrop = build_method("groco", TinyBackbone(), multicrop=True, local_views=3)
    assert multicrop.view_kinds() == ["global1", "global2", "local", "local", "local"]
    assert multicrop.n_pos_views == 2


@pytest.mark.parametrize("options,needles", [
    ({"sorter": {"network": "quick"}}, ["method.sorter.network='quick'", "odd_even"]),
    ({"sorter": {"distribution": "normal"}}, ["normal", "cauchy"]),
    ({"sorter": {"backend": "dense"}}, ["dense", "group_sum"]),
    ({"topk_neg": 0}, ["method.topk_neg=0"]),
    ({"views": 1}, ["method.views=1"]),
    ({"n_pos_views": 3}, ["method.n_pos_views=3", "[2, 2]"]),
    ({"gather_backward": "mean"}, ["mean", "local", "sum"]),
    ({"sorter": {"speed": 2}}, ["speed", "network"]),
])
def test_bad_options_fail_when_the_method_is_built(options, needles):
    with pytest.raises(MethodConfigError) as err:
        build_method("groco", TinyBackbone(), **options)
    for needle in needles:
        assert needle in str(err.value)


def test_batch_too_small_for_topk_is_refused():
    method = build_method("groco", TinyBackbone(), topk_neg=10)
    method.check_batch(11, 100)
    with pytest.raises(MethodConfigError, match="topk_neg=10.*batch_size=10"):
        method.check_batch(10, 100)


# ------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_topk_ablation_grid_on_digits_then_report(tmp_path):
    common = ["trainer.epochs=1", "trainer.max_steps_per_epoch=2", "trainer.progress=false",
              "eval.linear=false", f"results_dir={tmp_path}"]
    result = run_cli(["eval.grid", "-m", "method=groco", "method.topk_neg=5,20", "seed=0",
                      "method.sorter.network=odd_even", *common])
    assert result.returncode == 0, result.stderr[-3000:]
    records = sorted((tmp_path / "runs" / "digits" / "groco-default").rglob("record.json"))
    assert len(records) == 2
    ks = sorted(json.loads(r.read_text())["config"]["method"]["topk_neg"] for r in records)
    assert ks == [5, 20]
    for path in records:
        record = json.loads(path.read_text())
        assert record["status"] == "finished"
        assert 10.0 < record["metrics"]["knn20_top1"] <= 100.0
        assert 0.05 < record["history"][0]["loss"] < math.log(2)  # below a coin flip per entry
    out = tmp_path / "table.md"
    report = run_cli(["eval.report", "--runs", str(tmp_path / "runs"), "--plots-dir", str(tmp_path)])
    assert report.returncode == 0, report.stderr[-3000:]
    out.write_text(report.stdout)
    text = report.stdout
    assert "method.topk_neg" in text
    assert "accuracy_vs_group_size.png" in text
    assert (tmp_path / "accuracy_vs_group_size.png").stat().st_size > 1000
