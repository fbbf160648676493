"""Differentiable sorting networks: every back end against diffsort 0.2.0, plus bitonic_merge,
autocast and input validation."""

from __future__ import annotations

import math

import diffsort
import diffsort.networks as dn
import pytest
import torch

from methods import sorting
from methods.sorting import DISTRIBUTIONS, network_layers, rank_mass, soft_sort

NETS = ("odd_even", "bitonic")
NS = (2, 3, 8, 11, 16, 21, 64)
# 3.0 is not exact in float32 after 1/x, which exercises diffsort's gaussian backward quirk.
BETA = 3.0

CASES = [
    pytest.param(net, dist, n, dtype, id=f"{net}-{dist}-{n}-{name}")
    for name, dtype, ns in (("f64", torch.float64, NS), ("f32", torch.float32, (3, 11, 64)))
    for net in NETS
    for dist in DISTRIBUTIONS
    for n in ns
]
# In float32 diffsort's own gradients are off the float64 truth by up to 2e-6 (cauchy) and
# 2e-5 (optimal, gaussian, logistic) to 1e-3 (logistic_phi) times max|grad| (measured on these
# inputs), so gradients of those four are held to 1e-5 * max(1, max|grad|); everything else to 1e-6.
F32_GRAD_LOOSE = ("logistic", "logistic_phi", "gaussian", "optimal")


# tiny tensors: one intra-op thread for the whole module (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def _tol(dtype: torch.dtype) -> dict[str, float]:
    tol = 1e-10 if dtype == torch.float64 else 1e-6
    return {"atol": tol, "rtol": tol}


def _assert_grad_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, distribution: str
) -> None:
    if dtype == torch.float32 and distribution in F32_GRAD_LOOSE:
        scale = max(1.0, expected.abs().max().item())
        torch.testing.assert_close(actual, expected, atol=1e-5 * scale, rtol=0)
    else:
        torch.testing.assert_close(actual, expected, **_tol(dtype))


def _seed(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(sum(ord(c) for c in repr(parts)) * 7919)


def _input(n: int, dtype: torch.dtype, gen: torch.Generator, bsz: int = 3) -> torch.Tensor:
    return torch.randn(bsz, n, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)


def _grad(
    out: torch.Tensor | tuple[torch.Tensor, ...], ups: tuple, x: torch.Tensor
) -> torch.Tensor:
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o * u).sum() for o, u in zip(outs, ups, strict=True))
    return torch.autograd.grad(loss, x, retain_graph=True)[0]


@pytest.mark.parametrize(("network", "distribution", "n", "dtype"), CASES)
def test_backends_match_diffsort(network: str, distribution: str, n: int, dtype: torch.dtype):
    gen = _seed(network, distribution, n, str(dtype))
    x = _input(n, dtype, gen)
    tol = _tol(dtype)
    ref_net = diffsort.DiffSortNet(network, n, steepness=BETA, distribution=distribution)
    ref_sorted, ref_p = ref_net(x)
    ups = (
        torch.randn(ref_sorted.shape, generator=gen, dtype=dtype),
        torch.randn(ref_p.shape, generator=gen, dtype=dtype),
    )
    ref_grad = _grad((ref_sorted, ref_p), ups, x)
    mask = torch.arange(n) >= n - max(1, n // 4)
    ref_q = ref_p[:, :, mask].sum(-1)
    up_q = (torch.randn(ref_q.shape, generator=gen, dtype=dtype),)
    ref_grad_q = _grad(ref_q, up_q, x)

    for backend in ("columns", "diffsort"):
        out_sorted, out_p = soft_sort(x, network, distribution, BETA, backend=backend)
        assert out_sorted.dtype == dtype and out_p.shape == (3, n, n)
        torch.testing.assert_close(out_sorted, ref_sorted, **tol)
        torch.testing.assert_close(out_p, ref_p, **tol)
        _assert_grad_close(_grad((out_sorted, out_p), ups, x), ref_grad, dtype, distribution)
    for backend in ("group_sum", "columns", "diffsort"):
        q = rank_mass(x, mask, network, distribution, BETA, backend=backend)
        torch.testing.assert_close(q, ref_q, **tol)
        _assert_grad_close(_grad(q, up_q, x), ref_grad_q, dtype, distribution)


@pytest.mark.parametrize("network", NETS)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_ties_and_identities_match_diffsort(network: str, distribution: str):
    """Exact ties (d = 0), a constant row and GroCo's beta = 1, in float64.

    logistic_phi's derivative at d = 0 is beta / 1e-10^lambda but about beta / |d|^lambda one
    float32 ulp away, so in float32 its tie gradients follow one-ulp differences; float64 only.
    """
    n = 11
    gen = _seed(network, distribution, "ties")
    x = torch.randn(4, n, generator=gen, dtype=torch.float64)
    x[0, 3] = x[0, 7] = x[0, 1]
    x[1] = 0.25
    x[2, 5] = x[2, 6]
    x.requires_grad_(True)
    ref_sorted, ref_p = diffsort.DiffSortNet(network, n, steepness=1.0, distribution=distribution)(
        x
    )
    mask = torch.arange(n) >= 10
    up = torch.randn(4, n, generator=gen, dtype=torch.float64)
    ref_grad = _grad(ref_p[:, :, mask].sum(-1), (up,), x)
    tol = _tol(torch.float64)
    for backend in ("group_sum", "columns"):
        q = rank_mass(x, mask, network, distribution, 1.0, backend=backend)
        torch.testing.assert_close(q, ref_p[:, :, mask].sum(-1), **tol)
        torch.testing.assert_close(_grad(q, (up,), x), ref_grad, **tol)
    torch.testing.assert_close(soft_sort(x, network, distribution, 1.0)[0], ref_sorted, **tol)


@pytest.mark.parametrize("network", NETS)
def test_rank_mass_arbitrary_masks(network: str):
    n = 21
    gen = _seed(network, "masks")
    x = _input(n, torch.float64, gen, bsz=5)
    _, ref_p = diffsort.DiffSortNet(network, n, steepness=2.0, distribution="cauchy")(x)
    for _ in range(3):
        mask = torch.rand(n, generator=gen) < 0.5
        up = torch.randn(5, n, generator=gen, dtype=torch.float64)
        ref_q = ref_p[:, :, mask].sum(-1)
        q = rank_mass(x, mask.tolist(), network, "cauchy", 2.0)
        torch.testing.assert_close(q, ref_q, atol=1e-12, rtol=0)
        torch.testing.assert_close(
            _grad(q, (up,), x), torch.autograd.grad((ref_q * up).sum(), x, retain_graph=True)[0]
        )
    q = rank_mass(x, [False] * n, network)
    assert torch.equal(q, torch.zeros_like(q))
    torch.testing.assert_close(rank_mass(x, [True] * n, network), torch.ones(5, n, dtype=x.dtype))


def test_values_bit_identical_for_plain_arithmetic_relaxations():
    """reciprocal and optimal use only correctly rounded IEEE operations, so the same operation
    order gives the same bits (cauchy and gaussian also do here, through atan / erf)."""
    gen = _seed("bits")
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(4, 21, generator=gen, dtype=torch.float64).to(dtype)
        for network in NETS:
            for dist in ("reciprocal", "optimal"):
                ref = diffsort.DiffSortNet(network, 21, steepness=BETA, distribution=dist)(x)
                out = soft_sort(x, network, dist, BETA)
                assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_group_sum_recomputed_alpha_matches(monkeypatch: pytest.MonkeyPatch):
    gen = _seed("recompute")
    x = _input(16, torch.float64, gen, bsz=4)
    mask = torch.arange(16) >= 12
    up = torch.randn(4, 16, generator=gen, dtype=torch.float64)
    for dist in ("logistic_phi", "cauchy"):
        kept = _grad(rank_mass(x, mask, "odd_even", dist, BETA), (up,), x)
        monkeypatch.setattr(sorting, "_STORE_ALPHA_BYTES", 0)
        recomputed = _grad(rank_mass(x, mask, "odd_even", dist, BETA), (up,), x)
        monkeypatch.undo()
        assert torch.equal(kept, recomputed)


@pytest.mark.parametrize("backend", ["group_sum", "columns"])
def test_no_grad_paths_and_single_backward(backend: str):
    gen = _seed("nograd", backend)
    x = _input(11, torch.float64, gen)
    mask = torch.arange(11) >= 10
    with_grad = rank_mass(x, mask, backend=backend)
    with torch.no_grad():
        assert torch.equal(rank_mass(x, mask, backend=backend), with_grad.detach())
    assert torch.equal(rank_mass(x.detach(), mask, backend=backend), with_grad.detach())
    q = rank_mass(x, mask, backend=backend)
    q.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        q.sum().backward()


def test_permutation_matrix_is_doubly_stochastic():
    x = _input(13, torch.float64, _seed("ds"))
    for network in NETS:
        sorted_x, p = soft_sort(x, network)
        torch.testing.assert_close(p.sum(1), torch.ones(3, 13, dtype=x.dtype))
        torch.testing.assert_close(p.sum(2), torch.ones(3, 13, dtype=x.dtype))
        torch.testing.assert_close(sorted_x, (x.unsqueeze(1) @ p).squeeze(1))


@pytest.mark.parametrize("n", (2, 3, 5, 8, 11, 12, 16, 21, 33))
def test_comparators_come_from_diffsort_builders(n: int):
    """The sparse recorder runs diffsort's own builder code; it must equal the dense matrices."""
    for network, builder in (("odd_even", dn.odd_even_network), ("bitonic", dn.bitonic_network)):
        dense = sorting._matrices_to_layers(builder(n), n)
        assert network_layers(network, n) == [tuple(list(v) for v in layer) for layer in dense]


def test_hard_limit_sorts_exactly():
    """logistic at beta = 1e4 on integer-spaced values is exactly 0/1 in float64."""
    gen = _seed("hard")
    for n in (3, 5, 6, 7, 11, 12, 13, 20, 33):
        x = torch.stack([torch.randperm(3 * n, generator=gen)[:n] for _ in range(4)]).double()
        hard = torch.sort(x, dim=1)
        onehot = torch.zeros(4, n, n, dtype=x.dtype)
        onehot.scatter_(1, hard.indices.unsqueeze(1), 1.0)
        mask = torch.arange(n) >= n // 2
        for network in NETS:
            for backend in ("columns", "diffsort"):
                sorted_x, p = soft_sort(x, network, "logistic", 1e4, backend=backend)
                assert torch.equal(sorted_x, hard.values) and torch.equal(p, onehot)
            q = rank_mass(x, mask, network, "logistic", 1e4)
            assert torch.equal(q, onehot[:, :, mask].sum(-1))


# ------------------------------------------------------------------------------------------
# bitonic_merge
# ------------------------------------------------------------------------------------------


def _two_runs(k: int, m: int, gen: torch.Generator, rows: int = 8) -> torch.Tensor:
    n = k + m
    vals = torch.stack([torch.randperm(3 * n, generator=gen)[:n] for _ in range(rows)]).double()
    return torch.cat([vals[:, :k].sort(1).values, vals[:, k:].sort(1).values], dim=1)


def test_bitonic_merge_layer_count():
    assert [len(network_layers("bitonic_merge", n)) for n in (2, 3, 4, 11, 16, 17)] == [
        1,
        2,
        2,
        4,
        4,
        5,
    ]


@pytest.mark.parametrize("k", (5, 7, 10, 16))
def test_bitonic_merge_hard_limit(k: int):
    gen = _seed("merge-hard", k)
    for m in (1, 2, 3, 6, 16):
        n = k + m
        x = _two_runs(k, m, gen)
        hard = torch.sort(x, dim=1)
        onehot = torch.zeros(x.shape[0], n, n, dtype=x.dtype)
        onehot.scatter_(1, hard.indices.unsqueeze(1), 1.0)
        for backend in ("columns", "diffsort"):
            sorted_x, p = soft_sort(x, "bitonic_merge", "logistic", 1e4, backend=backend, split=k)
            assert torch.equal(sorted_x, hard.values) and torch.equal(p, onehot)
        mask = torch.arange(n) >= k
        q = rank_mass(x, mask, "bitonic_merge", "logistic", 1e4, split=k)
        assert torch.equal(q, onehot[:, :, mask].sum(-1))


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_bitonic_merge_backends_agree(distribution: str):
    """columns and group_sum against diffsort.sort run on the merge matrices (float64)."""
    gen = _seed("merge", distribution)
    for k, m in ((10, 1), (10, 3), (4, 4)):
        n = k + m
        x = (_two_runs(k, m, gen, rows=3) / n).requires_grad_(True)
        ref_sorted, ref_p = soft_sort(x, "bitonic_merge", distribution, backend="diffsort", split=k)
        ups = (
            torch.randn(3, n, generator=gen, dtype=x.dtype),
            torch.randn(3, n, n, generator=gen, dtype=x.dtype),
        )
        out = soft_sort(x, "bitonic_merge", distribution, split=k)
        torch.testing.assert_close(out[0], ref_sorted, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(out[1], ref_p, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(
            _grad(out, ups, x), _grad((ref_sorted, ref_p), ups, x), atol=1e-10, rtol=1e-10
        )
        mask = torch.arange(n) >= k
        ref_q = rank_mass(x, mask, "bitonic_merge", distribution, backend="diffsort", split=k)
        q = rank_mass(x, mask, "bitonic_merge", distribution, split=k)
        torch.testing.assert_close(q, ref_q, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(
            _grad(q, ups[:1], x), _grad(ref_q, ups[:1], x), atol=1e-10, rtol=1e-10
        )


def test_bitonic_merge_is_a_different_relaxation():
    gen = _seed("merge-differs")
    neg = (torch.rand(16, 10, generator=gen, dtype=torch.float64) * 0.8 - 0.2).sort(1).values
    pos = (torch.rand(16, 1, generator=gen, dtype=torch.float64) * 0.7 + 0.2).sort(1).values
    x = torch.cat([neg, pos], dim=1)
    mask = torch.arange(11) >= 10
    merged = rank_mass(x, mask, "bitonic_merge", split=10)
    full = rank_mass(x, mask, "odd_even")
    assert (merged - full).abs().max() > 1e-2
    # Same marginals though: both are doubly stochastic.
    torch.testing.assert_close(merged.sum(1), full.sum(1))


# ------------------------------------------------------------------------------------------
# dtype, autocast, device, caching
# ------------------------------------------------------------------------------------------


def test_autocast_sorts_in_float32():
    gen = _seed("autocast")
    a = torch.randn(4, 8, generator=gen, requires_grad=True)
    w = torch.randn(8, 11, generator=gen)
    mask = torch.arange(11) >= 10
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = a @ w
        assert x.dtype == torch.bfloat16
        sorted_x, p = soft_sort(x)
        q = rank_mass(x, mask)
        q_ds = rank_mass(x, mask, backend="diffsort")
    assert sorted_x.dtype == p.dtype == q.dtype == q_ds.dtype == torch.float32
    ref_sorted, ref_p = soft_sort(x.detach().float())
    assert torch.equal(sorted_x, ref_sorted) and torch.equal(p, ref_p)
    torch.testing.assert_close(q, ref_p[:, :, mask].sum(-1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(q_ds, q, atol=1e-6, rtol=1e-6)
    (grad,) = torch.autograd.grad(q.sum() + sorted_x.sum(), a)
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()


def test_half_input_is_sorted_in_float32():
    x = torch.randn(2, 8, generator=_seed("half")).half()
    sorted_x, p = soft_sort(x)
    assert sorted_x.dtype == p.dtype == torch.float32
    assert torch.equal(sorted_x, soft_sort(x.float())[0])


def test_runs_on_input_device_and_caches_diffsort_net():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        x = torch.randn(2, 11, device=device)
        sorted_x, p = soft_sort(x, backend="diffsort")
        assert sorted_x.device == p.device == x.device
        assert rank_mass(x, torch.arange(11) >= 10).device == x.device
        net = sorting._diffsort_net("odd_even", 11, x.device, 1.0, 0.25, "cauchy")
        assert net is sorting._diffsort_net("odd_even", 11, x.device, 1.0, 0.25, "cauchy")
        assert net.sorting_network[0][0].device == x.device
        assert net.distribution == "cauchy"
        if device != "cpu":
            torch.testing.assert_close(soft_sort(x)[1].cpu(), soft_sort(x.cpu())[1])


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------

_X = torch.randn(2, 5)
_MASK = torch.arange(5) >= 3
_BAD_FIRST = torch.tensor([[0.1, 0.3, 0.2, 0.4, 0.5]])
_BAD_SECOND = torch.tensor([[0.1, 0.2, 0.3, 0.5, -1.0]])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: soft_sort(torch.randn(2, 1)), r"n=1"),
        (lambda: soft_sort(torch.randn(5)), r"2-D.*\(5,\)"),
        (lambda: soft_sort(torch.randn(2, 3, 4)), r"2-D.*\(2, 3, 4\)"),
        (lambda: soft_sort([[1.0, 2.0]]), r"torch\.Tensor.*list"),
        (lambda: soft_sort(torch.arange(6).view(2, 3)), r"floating point.*int64"),
        (lambda: soft_sort(torch.tensor([[0.0, math.nan]])), r"finite.*x\[0, 1\] = nan"),
        (lambda: rank_mass(torch.tensor([[math.inf, 0.0]]), [True, False]), r"finite.*inf"),
        (lambda: soft_sort(_X, network="quick"), r"'quick'.*odd_even, bitonic, bitonic_merge"),
        (lambda: soft_sort(_X, distribution="sigmoid"), r"'sigmoid'.*logistic, logistic_phi"),
        (lambda: soft_sort(_X, backend="cuda"), r"'cuda'.*columns, diffsort"),
        (lambda: soft_sort(_X, backend="group_sum"), r"'group_sum'.*rank_mass.*columns, diffsort"),
        (lambda: rank_mass(_X, _MASK, backend="dense"), r"'dense'.*group_sum, columns, diffsort"),
        (lambda: soft_sort(_X, steepness=0.0), r"steepness.*> 0.*0\.0"),
        (lambda: soft_sort(_X, steepness=math.nan), r"steepness.*nan"),
        (lambda: soft_sort(_X, art_lambda=-1), r"art_lambda.*-1"),
        (lambda: rank_mass(_X, _MASK[:4]), r"length n=5.*\(4,\)"),
        (lambda: rank_mass(_X, torch.ones(2, 5, dtype=torch.bool)), r"length n=5.*\(2, 5\)"),
        (lambda: rank_mass(_X, torch.tensor([3, 4])), r"boolean.*int64"),
        (lambda: rank_mass(_X, [3, 4]), r"boolean.*\[3, 4\]"),
        (lambda: soft_sort(_X, "bitonic_merge"), r"split.*1 <= split <= n - 1 = 4.*None"),
        (lambda: soft_sort(_X.sort(1).values, "bitonic_merge", split=0), r"split=0"),
        (lambda: soft_sort(_X.sort(1).values, "bitonic_merge", split=5), r"split=5"),
        (lambda: soft_sort(_X.sort(1).values, "bitonic_merge", split=2.0), r"split=2\.0"),
        (
            lambda: rank_mass(_BAD_FIRST, _MASK, "bitonic_merge", split=3),
            r"ascending \(split=3\); row 0 has x\[0, 1\] = 0\.3.* > x\[0, 2\] = 0\.2",
        ),
        (
            lambda: soft_sort(_BAD_SECOND, "bitonic_merge", backend="diffsort", split=3),
            r"ascending \(split=3\); row 0 has x\[0, 3\] = 0\.5 > x\[0, 4\] = -1\.0",
        ),
    ],
)
def test_bad_input_raises_value_error(call, match: str):
    with pytest.raises(ValueError, match=match):
        call()


def test_split_is_ignored_by_full_networks():
    x = torch.randn(2, 6, generator=_seed("split"))
    assert torch.equal(soft_sort(x, split=3)[1], soft_sort(x)[1])
