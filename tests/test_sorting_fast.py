"""group_sum's in-place strided path (methods.sorting._GroupSumFn): the segment plans, both layer
forms (strided views, gathers) against diffsort, and the bit-exact alpha and value pass."""

from __future__ import annotations

import diffsort
import pytest
import torch

from methods import sorting
from methods.sorting import DISTRIBUTIONS, rank_mass, soft_sort

NETWORKS = ("odd_even", "bitonic", "bitonic_merge")
# _VIEW_MIN_ENTRIES per form: "views" takes every layer of at most _MAX_VIEW_SEGMENTS grids as
# strided views, "gathers" only the single-grid ones (the tests' tiny batches pick a mix).
FORMS = {"views": 0, "gathers": 2**62}


# tiny tensors: one intra-op thread for the whole module (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def _seed(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(sum(ord(c) for c in repr(parts)) * 7919)


def _input(network: str, n: int, bsz: int, dtype: torch.dtype, gen: torch.Generator):
    """x (bsz, n) and split; for bitonic_merge two ascending runs, the first of length split."""
    x = torch.randn(bsz, n, generator=gen, dtype=torch.float64)
    split = None
    if network == "bitonic_merge":
        split = max(1, (2 * n) // 3)
        x = torch.cat([x[:, :split].sort(1).values, x[:, split:].sort(1).values], dim=1)
    return x.to(dtype), split


def _reference(x: torch.Tensor, network: str, distribution: str, beta: float, split: int | None):
    """(sorted_x, P) from diffsort itself (its own network, or diffsort.sort on the merge)."""
    if network == "bitonic_merge":
        return soft_sort(x, network, distribution, beta, backend="diffsort", split=split)
    return diffsort.DiffSortNet(network, x.shape[1], steepness=beta, distribution=distribution)(x)


def _grid_rows(seg: sorting._Segment) -> list[int]:
    rows = [seg.offset]
    for size, stride in zip(seg.shape, seg.strides, strict=True):
        rows = [r + j * stride for r in rows for j in range(size)]
    return rows


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("n", (2, 3, 5, 8, 11, 13, 16, 21, 33, 51, 64, 100, 128, 257))
def test_segments_cover_every_comparator_once(network: str, n: int):
    plan = sorting._gs_plan(network, n, torch.device("cpu"))
    layers = sorting._layers(network, n)
    assert len(plan.views) == len(plan.gathers) == len(layers)
    for (wa, wb, lo, hi), view, gather in zip(layers, plan.views, plan.gathers, strict=True):
        want = sorted(zip(wa, wb, lo, hi, strict=True))
        (gathered,) = gather.segments
        assert gathered.rows_ab.tolist() == wa + wb and gathered.rows_lohi.tolist() == lo + hi
        if network == "odd_even":
            assert view is not None and len(view.segments) == 1  # the fast path: one view
        if view is None:
            continue
        got, start = [], 0
        for seg in view.segments:
            assert seg.rows_ab is None and seg.start == start
            start = seg.stop
            for lower in _grid_rows(seg):
                upper = lower + seg.pair
                low, high = (lower, upper) if seg.lo == 0 else (upper, lower)
                a, b = (low, high) if seg.sigma > 0 else (high, low)
                got.append((a, b, low, high))
        assert start == view.k == len(wa)
        assert sorted(got) == want
        assert view.sigma == (seg.sigma if len({s.sigma for s in view.segments}) == 1 else 0.0)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_both_forms_match_diffsort(
    monkeypatch: pytest.MonkeyPatch, form: str, network: str, distribution: str
):
    """q and dL/dx in float64 for sizes with padding (bitonic 21, 13) and without (16)."""
    monkeypatch.setattr(sorting, "_VIEW_MIN_ENTRIES", FORMS[form])
    for n in (13, 16, 21):
        gen = _seed(form, network, distribution, n)
        x, split = _input(network, n, 4, torch.float64, gen)
        x.requires_grad_(True)
        _, ref_p = _reference(x, network, distribution, 3.0, split)
        mask = torch.rand(n, generator=gen) < 0.4
        ref_q = ref_p[:, :, mask].sum(-1)
        up = torch.randn(ref_q.shape, generator=gen, dtype=x.dtype)
        (ref_grad,) = torch.autograd.grad((ref_q * up).sum(), x)
        q = rank_mass(x, mask, network, distribution, 3.0, split=split)
        (grad,) = torch.autograd.grad((q * up).sum(), x)
        torch.testing.assert_close(q, ref_q, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(grad, ref_grad, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("network", NETWORKS)
def test_float32_larger_batch_matches_diffsort(
    monkeypatch: pytest.MonkeyPatch, form: str, network: str
):
    """float32, GroCo's settings (cauchy, beta 1), B = 64 so that more layers are viewed."""
    monkeypatch.setattr(sorting, "_VIEW_MIN_ENTRIES", FORMS[form])
    n = 51
    gen = _seed(form, network, "f32")
    x, split = _input(network, n, 64, torch.float32, gen)
    x = (0.3 * x).requires_grad_(True)
    _, ref_p = _reference(x, network, "cauchy", 1.0, split)
    mask = torch.arange(n) >= n - 3
    ref_q = ref_p[:, :, mask].sum(-1)
    up = torch.randn(ref_q.shape, generator=gen)
    (ref_grad,) = torch.autograd.grad((ref_q * up).sum(), x)
    q = rank_mass(x, mask, network, "cauchy", 1.0, split=split)
    (grad,) = torch.autograd.grad((q * up).sum(), x)
    torch.testing.assert_close(q, ref_q, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("steepness", (1.0, 3.0, 0.7))
def test_alpha_is_bit_identical(distribution: str, dtype: torch.dtype, steepness: float):
    d = torch.randn(7, 33, generator=_seed(distribution, str(dtype), steepness), dtype=dtype)
    d[0, :5] = torch.tensor([0.0, -0.0, 0.2, -0.25, 0.25], dtype=dtype)
    consts = sorting._consts(dtype, d.device, steepness)
    params = (distribution, steepness, 0.25)
    ref = sorting._alpha(d, *params)
    out = sorting._alpha_into(d, torch.empty_like(d), consts, *params)
    assert torch.equal(out, ref)
    layer = sorting._GSLayer(k=7, segments=(), sigma=1.0)
    beta = torch.empty_like(d)
    alpha, omega = sorting._beta_into(d, layer, beta, torch.empty_like(d), consts, params)
    assert torch.equal(alpha, ref) and torch.equal(omega, 1 - ref) and omega is beta


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_value_pass_is_bit_identical(
    monkeypatch: pytest.MonkeyPatch, form: str, network: str, dtype: torch.dtype
):
    """The in-place value pass ends on diffsort's sorted values, bit for bit (relaxations made of
    correctly rounded operations, and cauchy through atan)."""
    monkeypatch.setattr(sorting, "_VIEW_MIN_ENTRIES", FORMS[form])
    for n in (13, 16, 21):
        for distribution in ("reciprocal", "optimal", "cauchy"):
            x, split = _input(network, n, 6, dtype, _seed(form, network, str(dtype), n))
            ref_sorted, _ = _reference(x, network, distribution, 3.0, split)
            state = x.t().clone(memory_format=torch.contiguous_format)
            if network == "bitonic_merge":  # on the positions of the bitonic arrangement
                state = x.t().index_select(0, sorting._merge_perm_tensor(n, split, x.device))
            layers = sorting._gs_plan(network, n, x.device).layers(x.shape[0])
            consts = sorting._consts(dtype, x.device, 3.0)
            sorting._value_pass(state, layers, consts, (distribution, 3.0, 0.25), keep=False)
            assert torch.equal(state.t(), ref_sorted), (n, distribution)


@pytest.mark.parametrize("network", ("odd_even", "bitonic"))
def test_recomputed_beta_matches_kept_in_mixed_layers(
    monkeypatch: pytest.MonkeyPatch, network: str
):
    """bitonic's views mix ascending and descending grids in a layer (beta = 1 - alpha or alpha
    per grid); recomputing beta in the backward must give the kept bits."""
    monkeypatch.setattr(sorting, "_VIEW_MIN_ENTRIES", 0)
    gen = _seed(network, "recompute")
    x = torch.randn(4, 21, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.arange(21) >= 15
    up = torch.randn(4, 21, generator=gen, dtype=torch.float64)
    assert any(
        v is not None and v.sigma == 0 for v in sorting._gs_plan(network, 21, x.device).views
    ) == (network == "bitonic")
    for distribution in ("logistic_phi", "cauchy", "logistic"):
        q = rank_mass(x, mask, network, distribution, 3.0)
        (kept,) = torch.autograd.grad((q * up).sum(), x)
        monkeypatch.setattr(sorting, "_STORE_ALPHA_BYTES", 0)
        q = rank_mass(x, mask, network, distribution, 3.0)
        (recomputed,) = torch.autograd.grad((q * up).sum(), x)
        monkeypatch.setattr(sorting, "_STORE_ALPHA_BYTES", 64 * 2**20)
        assert torch.equal(kept, recomputed), distribution


@pytest.mark.parametrize("network", NETWORKS)
def test_single_row_leaves_input_alone(network: str):
    """B = 1 makes x.t() contiguous; the in-place passes must work on copies of x and of the
    upstream gradient (here an expanded one from .sum())."""
    x, split = _input(network, 11, 3, torch.float64, _seed(network, "one row"))
    mask = torch.arange(11) >= 8
    batch = rank_mass(x, mask, network, split=split)
    for row in range(3):
        xr = x[row : row + 1].clone().requires_grad_(True)
        before = xr.detach().clone()
        q = rank_mass(xr, mask, network, split=split)
        q.sum().backward()
        assert torch.equal(xr.detach(), before)
        torch.testing.assert_close(q, batch[row : row + 1], atol=1e-14, rtol=0)
        ref = rank_mass(xr, mask, network, split=split, backend="columns")
        (ref_grad,) = torch.autograd.grad(ref.sum(), xr)
        torch.testing.assert_close(xr.grad, ref_grad, atol=1e-12, rtol=1e-12)
