"""Hypothesis fuzzing of every pure loss of the registered methods.

For shapes, batch sizes, view counts and options drawn inside each loss's documented valid range:
the loss and the gradients of every input it differentiates are finite, and permuting the batch
(one permutation applied to every view and every per-sample tensor) leaves the loss unchanged to
1e-5 wherever the definition is a symmetric mean over samples. Outside the range, a bad shape is a
ValueError whose message names the shapes.

The tensors come from a seeded torch generator (hypothesis draws the seed, the shapes and how the
values degenerate: tiny or huge norms, an all-zero row, two identical rows), which keeps every
example cheap. ``derandomize`` makes the examples the same on every run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from methods.all4one import centroid_loss, feature_barlow_loss, feature_rms_loss
from methods.ascl import TARGETS, ascl_loss, byol_ascl_loss, soft_contrastive_loss
from methods.cld import CENTROIDS, cld_loss, cross_level_cross_entropy
from methods.groco import NEGATIVES, groco_loss
from methods.moco import moco_infonce_loss
from methods.nnclr import LOSS_FORMS, nn_infonce, nnclr_loss
from methods.simclr import MULTIVIEW_MODES, nt_xent_loss
from methods.sorting import DISTRIBUTIONS, NETWORKS, RANK_MASS_BACKENDS

FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None)
TEMPERATURES = st.sampled_from([0.05, 0.1, 0.2, 0.5, 1.0])
TOL = {"rtol": 1e-5, "atol": 1e-5}


@dataclass(frozen=True)
class Draw:
    """Everything needed to build the per-sample tensors of one example."""

    batch: int
    dim: int
    seed: int
    scale: float  # the rows' typical norm: cosine losses must not care
    zero_row: bool  # row 0 of every tensor is all zeros (a dead unit, ‖z‖ < 1e-8)
    twin_rows: bool  # row 1 equals row 0 (exact ties in similarities and top-k)

    def tensors(self, n: int, grad: bool = True) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        out = []
        for _ in range(n):
            x = torch.randn(self.batch, self.dim, generator=generator) * self.scale
            if self.twin_rows and self.batch > 1:
                x[1] = x[0]
            if self.zero_row:
                x[0] = 0
            out.append(x.requires_grad_(grad))
        return out

    def permutation(self) -> torch.Tensor:
        return torch.randperm(self.batch, generator=torch.Generator().manual_seed(self.seed + 1))


@st.composite
def draws(draw, min_batch: int = 1, max_batch: int = 10, min_dim: int = 1, max_dim: int = 8) -> Draw:
    return Draw(
        batch=draw(st.integers(min_batch, max_batch)),
        dim=draw(st.integers(min_dim, max_dim)),
        seed=draw(st.integers(0, 2**31 - 1)),
        scale=draw(st.sampled_from([1e-3, 1.0, 1e3])),
        zero_row=draw(st.booleans()),
        twin_rows=draw(st.booleans()),
    )


def unit_rows(rows: int, dim: int, seed: int) -> torch.Tensor:
    """A queue as the methods keep it: detached unit rows."""
    q = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed + 2))
    return torch.nn.functional.normalize(q, dim=1)


def assert_finite_with_finite_grads(loss: torch.Tensor, inputs: list[torch.Tensor]) -> None:
    assert loss.ndim == 0 and torch.isfinite(loss), loss
    loss.backward()
    grads = [x.grad for x in inputs if x.grad is not None]
    assert grads, "no input received a gradient"
    for grad in grads:
        assert torch.isfinite(grad).all(), grad


def assert_permutation_invariant(
    loss_of: Callable[[list[torch.Tensor]], torch.Tensor], per_sample: list[torch.Tensor],
    perm: torch.Tensor,
) -> None:
    with torch.no_grad():
        before = loss_of(per_sample)
        after = loss_of([x[perm] for x in per_sample])
    torch.testing.assert_close(after, before, **TOL)


# --------------------------------------------------------------------------------------------
# SimCLR
# --------------------------------------------------------------------------------------------
@FUZZ
@given(d=draws(), n_views=st.integers(2, 4), temperature=TEMPERATURES,
       multiview=st.sampled_from(MULTIVIEW_MODES), stop_grad=st.booleans(), data=st.data())
def test_nt_xent(d, n_views, temperature, multiview, stop_grad, data):
    negatives = n_views * (d.batch - 1)
    topk = data.draw(st.none() | st.integers(1, negatives)) if negatives else None

    def loss_of(views):
        return nt_xent_loss(views, temperature, multiview, topk, stop_grad)

    views = d.tensors(n_views)
    assert_finite_with_finite_grads(loss_of(views), views)
    assert_permutation_invariant(loss_of, views, d.permutation())


# --------------------------------------------------------------------------------------------
# MoCo
# --------------------------------------------------------------------------------------------
@FUZZ
@given(d=draws(), queue_rows=st.integers(0, 16), temperature=TEMPERATURES)
def test_moco_infonce(d, queue_rows, temperature):
    query, key = d.tensors(2)
    queue = unit_rows(queue_rows, d.dim, d.seed)

    def loss_of(pair):
        return moco_infonce_loss(pair[0], pair[1], queue, temperature)

    assert_finite_with_finite_grads(loss_of([query, key]), [query, key])
    assert key.grad is None  # the key is detached
    # The queue is not per-sample: permuting the batch keeps it, and its order is no order
    # of negatives either (a sum over them).
    assert_permutation_invariant(loss_of, [query, key], d.permutation())
    with torch.no_grad():
        flipped = moco_infonce_loss(query, key, queue.flip(0), temperature)
        torch.testing.assert_close(flipped, loss_of([query, key]), **TOL)


# --------------------------------------------------------------------------------------------
# GroCo
# --------------------------------------------------------------------------------------------
@FUZZ
@given(d=draws(min_batch=2, max_batch=8, max_dim=6), n_views=st.integers(2, 3),
       negatives=st.sampled_from(NEGATIVES), network=st.sampled_from(NETWORKS),
       distribution=st.sampled_from(DISTRIBUTIONS), backend=st.sampled_from(RANK_MASS_BACKENDS),
       steepness=st.sampled_from([0.5, 1.0, 4.0]), stop_grad=st.booleans(), data=st.data())
def test_groco(d, n_views, negatives, network, distribution, backend, steepness, stop_grad, data):
    available = d.batch - 1 if negatives == "same_view" else n_views * (d.batch - 1)
    topk = data.draw(st.integers(1, min(available, 6)), label="topk_neg")
    n_pos = data.draw(st.integers(2, n_views), label="n_pos_views")

    def loss_of(views):
        return groco_loss(views, topk_neg=topk, steepness=steepness, n_pos_views=n_pos,
                          network=network, distribution=distribution, stop_grad=stop_grad,
                          backend=backend, negatives=negatives)

    views = d.tensors(n_views)
    assert_finite_with_finite_grads(loss_of(views), views)
    assert_permutation_invariant(loss_of, views, d.permutation())


# --------------------------------------------------------------------------------------------
# NNCLR
# --------------------------------------------------------------------------------------------
@FUZZ
@given(d=draws(), temperature=TEMPERATURES, form=st.sampled_from(LOSS_FORMS))
def test_nnclr(d, temperature, form):
    tensors = d.tensors(4)

    def loss_of(t):
        return nnclr_loss(t[0], t[1], t[2], t[3], temperature, form)

    assert_finite_with_finite_grads(loss_of(tensors), tensors)
    assert_permutation_invariant(loss_of, tensors, d.permutation())
    anchor, candidates = d.tensors(2)
    assert_finite_with_finite_grads(nn_infonce(anchor, candidates, temperature), [anchor, candidates])
    assert_permutation_invariant(lambda t: nn_infonce(t[0], t[1], temperature),
                                 [anchor, candidates], d.permutation())


# --------------------------------------------------------------------------------------------
# CLD
# --------------------------------------------------------------------------------------------
@FUZZ
@given(d=draws(), clusters=st.integers(1, 6), temperature=TEMPERATURES,
       mode=st.sampled_from(CENTROIDS))
def test_cld_cross_entropy(d, clusters, temperature, mode):
    (anchors,) = d.tensors(1)
    generator = torch.Generator().manual_seed(d.seed + 3)
    centroids = (torch.rand(clusters, d.dim, generator=generator) - 0.5).requires_grad_()
    labels = torch.randint(0, clusters, (d.batch,), generator=generator)

    def loss_of(t):
        return cross_level_cross_entropy(t[0], centroids, t[1], temperature, mode)

    assert_finite_with_finite_grads(loss_of([anchors, labels]), [anchors, centroids])
    # the sample's own cluster label moves with it; the centroids are not per-sample
    assert_permutation_invariant(loss_of, [anchors, labels], d.permutation())


@FUZZ
@given(d=draws(), clusters=st.integers(1, 12), num_iters=st.integers(1, 4),
       temperature=TEMPERATURES, mode=st.sampled_from(CENTROIDS), centroid_grad=st.booleans(),
       init=st.sampled_from(["first_k", "random"]))
def test_cld_loss(d, clusters, num_iters, temperature, mode, centroid_grad, init):
    # clusters > batch is in range: the surplus clusters stay empty (zero centroids)
    group1, group2 = d.tensors(2)
    loss = cld_loss(group1, group2, clusters, temperature, num_iters, centroid_mode=mode,
                    centroid_grad=centroid_grad, kmeans_init=init,
                    generator=torch.Generator().manual_seed(d.seed))
    assert_finite_with_finite_grads(loss, [group1, group2])
    # No permutation check: k-means starts from the first k rows (first_k) or from row positions
    # drawn from the generator (random), so which clusters form depends on the order of the rows.


# --------------------------------------------------------------------------------------------
# ASCL
# --------------------------------------------------------------------------------------------
@FUZZ
@given(d=draws(), queue_rows=st.integers(1, 16), temperature=TEMPERATURES,
       teacher_temperature=TEMPERATURES, target=st.sampled_from(TARGETS), data=st.data())
def test_ascl(d, queue_rows, temperature, teacher_temperature, target, data):
    nn_num = data.draw(st.integers(1, queue_rows), label="nn_num")
    query, key = d.tensors(2)
    queue = unit_rows(queue_rows, d.dim, d.seed)

    def loss_of(pair):
        return ascl_loss(pair[0], pair[1], queue, temperature, teacher_temperature, target, nn_num)

    assert_finite_with_finite_grads(loss_of([query, key]), [query, key])
    # each row's soft target is a function of its own key and the shared queue
    assert_permutation_invariant(loss_of, [query, key], d.permutation())


@FUZZ
@given(d=draws(), queue_rows=st.integers(0, 16), temperature=TEMPERATURES)
def test_soft_contrastive(d, queue_rows, temperature):
    query, key = d.tensors(2)
    queue = unit_rows(queue_rows, d.dim, d.seed)
    targets = torch.rand(d.batch, 1 + queue_rows, generator=torch.Generator().manual_seed(d.seed))
    targets = targets / targets.sum(dim=1, keepdim=True)

    def loss_of(t):
        return soft_contrastive_loss(t[0], t[1], queue, t[2], temperature)

    assert_finite_with_finite_grads(loss_of([query, key, targets]), [query, key])
    assert_permutation_invariant(loss_of, [query, key, targets], d.permutation())


@FUZZ
@given(d=draws(), teacher_temperature=TEMPERATURES, target=st.sampled_from(["ascl", "normal"]),
       nn_num=st.integers(1, 4))
def test_byol_ascl(d, teacher_temperature, target, nn_num):
    prediction, key = d.tensors(2)

    def loss_of(pair):
        return byol_ascl_loss(pair[0], pair[1], teacher_temperature, target, nn_num)

    assert_finite_with_finite_grads(loss_of([prediction, key]), [prediction, key])
    # in-batch relations: permuting both permutes the target matrix's rows and columns alike
    assert_permutation_invariant(loss_of, [prediction, key], d.permutation())


# --------------------------------------------------------------------------------------------
# All4One
# --------------------------------------------------------------------------------------------
@FUZZ
@given(d=draws(min_dim=2), scale=st.sampled_from([1.0, 10.0]))
# found by this test: all-zero features give no off-diagonal correlation, and the square root's
# infinite slope at 0 made every gradient NaN
@example(d=Draw(batch=1, dim=2, seed=0, scale=1.0, zero_row=True, twin_rows=False), scale=1.0)
def test_feature_rms(d, scale):
    tensors = d.tensors(4)

    def loss_of(t):
        return feature_rms_loss(t[0], t[1], t[2], t[3], scale)

    assert_finite_with_finite_grads(loss_of(tensors), tensors)
    assert_permutation_invariant(loss_of, tensors, d.permutation())


@FUZZ
@given(d=draws(), lambd=st.sampled_from([5e-3, 1.0]))
def test_feature_barlow(d, lambd):
    tensors = d.tensors(4)

    def loss_of(t):
        return feature_barlow_loss(t[0], t[1], t[2], t[3], lambd)

    assert_finite_with_finite_grads(loss_of(tensors), tensors)
    assert_permutation_invariant(loss_of, tensors, d.permutation())


@FUZZ
@given(d=draws(), temperature=TEMPERATURES)
def test_centroid(d, temperature):
    tensors = d.tensors(4)

    def loss_of(t):
        return centroid_loss(t[:2], t[2:], temperature)

    assert_finite_with_finite_grads(loss_of(tensors), tensors)
    assert_permutation_invariant(loss_of, tensors, d.permutation())


# --------------------------------------------------------------------------------------------
# invalid shapes
# --------------------------------------------------------------------------------------------
def _r(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


# Two inputs that must agree on the batch but do not: (loss on (a, b), where the shapes appear).
MISMATCHED_BATCH: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "nt_xent_loss": lambda a, b: nt_xent_loss([a, b]),
    "moco_infonce_loss": lambda a, b: moco_infonce_loss(a, b, _r(4, a.shape[1])),
    "groco_loss": lambda a, b: groco_loss([a, b], topk_neg=1),
    "nn_infonce": lambda a, b: nn_infonce(a, b, 0.2),
    "nnclr_loss": lambda a, b: nnclr_loss(a, a, b, b),
    "cld_loss": lambda a, b: cld_loss(a, b, 2),
    "ascl_loss": lambda a, b: ascl_loss(a, b, _r(4, a.shape[1])),
    "byol_ascl_loss": lambda a, b: byol_ascl_loss(a, b),
    "feature_rms_loss": lambda a, b: feature_rms_loss(a, a, b, b),
    "feature_barlow_loss": lambda a, b: feature_barlow_loss(a, a, b, b),
    "centroid_loss": lambda a, b: centroid_loss([a, a], [b, b]),
}


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(name=st.sampled_from(sorted(MISMATCHED_BATCH)), rows=st.tuples(
    st.integers(2, 9), st.integers(2, 9)).filter(lambda r: r[0] != r[1]), dim=st.integers(2, 6))
def test_mismatched_batches_name_both_shapes(name, rows, dim):
    a, b = _r(rows[0], dim), _r(rows[1], dim)
    with pytest.raises(ValueError) as err:
        MISMATCHED_BATCH[name](a, b)
    assert f"({rows[0]}, {dim})" in str(err.value) and f"({rows[1]}, {dim})" in str(err.value)


INVALID = [
    ("nt_xent one view", lambda: nt_xent_loss([_r(4, 3)]), "at least 2 views, got 1"),
    ("nt_xent 3-D views", lambda: nt_xent_loss([_r(4, 3, 2)] * 2), "(B, D) of one shape"),
    ("nt_xent empty batch", lambda: nt_xent_loss([_r(0, 3)] * 2), "at least 1 image per view"),
    ("nt_xent topk beyond the negatives", lambda: nt_xent_loss([_r(4, 3)] * 2, topk_neg=7),
     "topk_neg=7 must be in [1, 6]"),
    ("moco queue of another dimension", lambda: moco_infonce_loss(_r(4, 3), _r(4, 3), _r(8, 5)),
     "query (4, 3), queue (8, 5)"),
    ("moco 1-D queue", lambda: moco_infonce_loss(_r(4, 3), _r(4, 3), _r(8)),
     "2-D (rows, D) tensor, got query (4, 3), queue (8,)"),
    ("moco empty batch", lambda: moco_infonce_loss(_r(0, 3), _r(0, 3), _r(8, 3)),
     "at least 1 row(s) per input"),
    ("groco one view", lambda: groco_loss([_r(4, 3)], topk_neg=1), "at least 2 views"),
    ("groco topk beyond the batch", lambda: groco_loss([_r(4, 3)] * 2, topk_neg=4),
     "topk_neg=4 must be a whole number in [1, 3]"),
    ("nnclr empty batch", lambda: nnclr_loss(*[_r(0, 3)] * 4), "at least 1 row(s) per input"),
    ("cld 1-D groups", lambda: cld_loss(_r(4), _r(4), 2), "2-D (rows, D) tensor"),
    ("cld groups of two dimensions", lambda: cld_loss(_r(4, 3), _r(4, 5), 2),
     "group1 (4, 3), group2 (4, 5)"),
    ("cld centroids of another dimension",
     lambda: cross_level_cross_entropy(_r(4, 3), _r(2, 5), torch.tensor([0, 1, 0, 1]), 0.2),
     "anchors (4, 3), centroids (2, 5)"),
    ("cld label out of range",
     lambda: cross_level_cross_entropy(_r(4, 3), _r(2, 3), torch.tensor([0, 1, 2, 0]), 0.2),
     "labels must lie in [0, 2) for 2 centroids, got [0, 2]"),
    ("cld labels of another length",
     lambda: cross_level_cross_entropy(_r(4, 3), _r(2, 3), torch.tensor([0, 1]), 0.2),
     "integer cluster indices of shape (4,)"),
    ("ascl queue of another dimension", lambda: ascl_loss(_r(4, 3), _r(4, 3), _r(8, 5)),
     "key (4, 3), queue (8, 5)"),
    ("ascl targets not (B, 1 + M)",
     lambda: soft_contrastive_loss(_r(4, 3), _r(4, 3), _r(8, 3), torch.ones(4, 5)),
     "targets must be (B, 1 + M) = (4, 9)"),
    ("byol of two dimensions", lambda: byol_ascl_loss(_r(4, 3), _r(4, 5)),
     "prediction (4, 3), key (4, 5)"),
    ("all4one feature loss with D = 1", lambda: feature_rms_loss(*[_r(4, 1)] * 4),
     "embedding dimension D >= 2"),
    ("all4one one view", lambda: centroid_loss([_r(4, 3)], [_r(4, 3)]),
     "got 1 rich and 1 shifted"),
]


@pytest.mark.parametrize("call,needle", [(c, n) for _, c, n in INVALID],
                         ids=[name for name, _, _ in INVALID])
def test_invalid_inputs_raise_clear_value_errors(call, needle):
    with pytest.raises(ValueError) as err:
        call()
    assert needle in str(err.value)


def test_groco_negative_views_of_another_dimension():
    with pytest.raises(ValueError, match="negative_views"):
        groco_loss([_r(4, 3)] * 2, topk_neg=2, negative_views=[_r(8, 5)] * 2)
