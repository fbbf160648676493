"""Tests for eval.knn, eval.linear and eval.stats (docs/protocol.md §3–§5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

import eval.linear as linear_module
from eval.knn import (
    _group_columns,
    _largest,
    agreement_from_neighbours,
    knn_evaluate,
    knn_from_neighbours,
    knn_top1,
    nearest_neighbours,
    neighbour_label_agreement,
    resolve_k,
)
from eval.linear import (
    DEFAULT_LAMBDAS,
    _fit_sklearn,
    _fit_torch,
    _standardiser,
    linear_probe,
)
from eval.stats import (
    NO_MATCHED_SEEDS,
    bootstrap_ci,
    fmt_acc,
    fmt_p,
    paired_bootstrap,
    paired_comparison,
    t_interval,
)

# ---------------------------------------------------------------------------------------------
# k-NN
# ---------------------------------------------------------------------------------------------


def _ref_knn(train, ytr, test, yte, k, temperature, num_classes):
    """Brute force, one query at a time, float64: sort, take k, vote (protocol §3)."""
    bank = train.double().numpy()
    bank = bank / np.maximum(np.linalg.norm(bank, axis=1, keepdims=True), 1e-12)
    queries = test.double().numpy()
    queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    ytr, yte = ytr.numpy(), yte.numpy()
    top1, top5 = [], []
    n_boundary_ties = n_score_ties = 0
    for q, y in zip(queries, yte, strict=True):
        s = np.array([float(np.dot(q, b)) for b in bank])
        order = np.lexsort((np.arange(len(s)), -s))  # similarity desc, then index asc
        if k < len(s) and s[order[k - 1]] == s[order[k]]:
            n_boundary_ties += 1
        scores = np.zeros(num_classes)
        for j in order[:k]:  # accumulated in descending-similarity order
            scores[ytr[j]] += math.exp(s[j] / temperature)
        ranking = sorted(range(num_classes), key=lambda c: (-scores[c], c))
        if scores[ranking[0]] == scores[ranking[1]]:
            n_score_ties += 1
        top1.append(ranking[0] == y)
        top5.append(y in ranking[:5])
    return np.array(top1), np.array(top5), n_boundary_ties, n_score_ties


def _random_case(seed, n_train=150, n_test=60, d=12, c=7):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, d, generator=g)
    ytr = torch.randint(0, c, (n_train,), generator=g)
    yte = torch.randint(0, c, (n_test,), generator=g)
    xtr = centres[ytr] + 1.5 * torch.randn(n_train, d, generator=g)
    xte = centres[yte] + 1.5 * torch.randn(n_test, d, generator=g)
    return xtr, ytr, xte, yte, c


def _tie_case(seed, n_train=120, n_test=50, c=6):
    """Vectors in {-1,0,1}^8 with four non-zeros: norm 2, so every cosine is an exact
    multiple of 1/4 and a small pool of distinct vectors yields many exact ties."""
    g = np.random.default_rng(seed)
    pool = np.zeros((12, 8), dtype=np.float32)
    for row in pool:
        pos = g.choice(8, size=4, replace=False)
        row[pos] = g.choice([-1.0, 1.0], size=4)
    xtr = torch.from_numpy(pool[g.integers(0, len(pool), n_train)])
    xte = torch.from_numpy(pool[g.integers(0, len(pool), n_test)])
    ytr = torch.from_numpy(g.integers(0, c, n_train))
    yte = torch.from_numpy(g.integers(0, c, n_test))
    return xtr, ytr, xte, yte, c


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.07), (20, 0.07), (50, 0.1), (150, 1.0)])
def test_knn_matches_bruteforce_random(k, temperature):
    xtr, ytr, xte, yte, c = _random_case(seed=k)
    res = knn_evaluate(xtr, ytr, xte, yte, k=k, temperature=temperature, chunk_size=16)
    ref1, ref5, _, _ = _ref_knn(xtr, ytr, xte, yte, k, temperature, c)
    assert res.correct.dtype == torch.bool and res.correct.shape == (len(yte),)
    np.testing.assert_array_equal(res.correct.numpy(), ref1)
    np.testing.assert_array_equal(res.top5_correct.numpy(), ref5)
    assert res.top1 == pytest.approx(100 * ref1.mean())
    assert res.top5 == pytest.approx(100 * ref5.mean())
    assert (res.k, res.temperature) == (k, temperature)


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (3, 0.5), (10, 0.07), (40, 1.0), (120, 0.1)])
def test_knn_matches_bruteforce_with_ties(k, temperature):
    xtr, ytr, xte, yte, c = _tie_case(seed=k)
    ref1, ref5, n_boundary, _ = _ref_knn(xtr, ytr, xte, yte, k, temperature, c)
    if k < len(ytr):
        assert n_boundary > 0  # the fixture really exercises the boundary-tie rule
    for chunk in (1, 7, 1024):
        res = knn_evaluate(xtr, ytr, xte, yte, k=k, temperature=temperature, chunk_size=chunk)
        np.testing.assert_array_equal(res.correct.numpy(), ref1)
        np.testing.assert_array_equal(res.top5_correct.numpy(), ref5)


def test_knn_tie_fixture_has_score_ties():
    xtr, ytr, xte, yte, c = _tie_case(seed=3)
    _, _, _, n_score = _ref_knn(xtr, ytr, xte, yte, 3, 0.5, c)
    assert n_score > 0


def test_knn_chunk_size_independence():
    xtr, ytr, xte, yte, _ = _random_case(seed=11, n_train=300, n_test=257)
    results = [knn_evaluate(xtr, ytr, xte, yte, chunk_size=cs) for cs in (1, 3, 64, 256, 10_000)]
    for r in results[1:]:
        assert torch.equal(r.correct, results[0].correct)
        assert torch.equal(r.top5_correct, results[0].top5_correct)
        assert r.top1 == results[0].top1 and r.top5 == results[0].top5


def test_knn_top5_and_absent_classes():
    # Query near class 1; k=2 neighbours are class 1 and 0; classes 2..6 score 0 and fill the
    # remaining top-5 slots in index order (ties to the smaller class index).
    xtr = torch.tensor([[1.0, 0.0], [0.8, 0.6], [-1.0, 0.0], [0.0, -1.0]])
    ytr = torch.tensor([1, 0, 5, 6])
    xte = torch.tensor([[1.0, 0.0]] * 4)
    yte = torch.tensor([0, 3, 4, 6])
    res = knn_evaluate(xtr, ytr, xte, yte, k=2, num_classes=7)
    assert res.correct.tolist() == [False, False, False, False]
    # ranking: 1, 0, 2, 3, 4, 5, 6 -> 0, 3, 4 in top 5; 6 is not.
    assert res.top5_correct.tolist() == [True, True, True, False]
    assert res.top5 == 75.0


def test_knn_errors():
    xtr, ytr, xte, yte, _ = _random_case(seed=0, n_train=30)
    with pytest.raises(ValueError, match=r"k=31.*N_train=30"):
        knn_evaluate(xtr, ytr, xte, yte, k=31)
    with pytest.raises(ValueError, match="k must be >= 1"):
        knn_evaluate(xtr, ytr, xte, yte, k=0)
    with pytest.raises(ValueError, match="num_classes"):
        knn_evaluate(xtr, ytr, xte, yte, k=5, num_classes=2)
    with pytest.raises(ValueError, match="k=50.*N_train=30"):
        neighbour_label_agreement(xtr, ytr, xte, yte, ks=(1, 50))


def test_torch_argmax_returns_first_max():
    # knn_evaluate relies on this for "ties go to the smaller class index".
    scores = torch.tensor([[0.0, 3.0, 3.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 5.0]])
    assert scores.argmax(dim=1).tolist() == [1, 0, 3]


def test_knn_top1_hand_made():
    # Bank: b0 = (1, 0) class 1; b1, b2 at cosine 0.8 to the query, both class 0.
    xtr = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]])
    ytr = torch.tensor([1, 0, 0])
    xte = torch.tensor([[2.0, 0.0]])  # norm 2: the normalisation must not matter
    yte = torch.tensor([1])
    # T = 0.07: exp(1/0.07) ≈ 1.6e6 > 2·exp(0.8/0.07) ≈ 1.8e5 -> class 1.
    assert knn_top1(xtr, ytr, xte, yte, k=3, temperature=0.07) == 100.0
    # T = 1: e ≈ 2.72 < 2·e^0.8 ≈ 4.45 -> class 0.
    assert knn_top1(xtr, ytr, xte, yte, k=3, temperature=1.0) == 0.0
    # k = 1: the nearest is b0 -> class 1.
    assert knn_top1(xtr, ytr, xte, yte, k=1, temperature=1.0) == 100.0

    # Three queries, k = 2; known answers: correct, correct, wrong -> 66.67 %.
    xtr = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    ytr = torch.tensor([0, 0, 1, 2])
    xte = torch.tensor([[1.0, 0.05], [0.1, 1.0], [-1.0, 0.2]])
    yte = torch.tensor([0, 1, 0])
    assert knn_top1(xtr, ytr, xte, yte, k=2) == pytest.approx(200 / 3)


def test_knn_tie_rules_hand_made():
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # Equal class scores (3 and 1): the smaller class index wins.
    ytr = torch.tensor([3, 1])
    q = torch.tensor([[1.0, 0.0]])
    assert knn_top1(same, ytr, q, torch.tensor([1]), k=2) == 100.0
    assert knn_top1(same, ytr, q, torch.tensor([3]), k=2) == 0.0
    # k = 1 with two bank entries tied at the boundary: the smaller train index is taken.
    assert knn_top1(same, ytr, q, torch.tensor([3]), k=1) == 100.0
    assert knn_top1(same, torch.tensor([1, 3]), q, torch.tensor([1]), k=1) == 100.0
    # Zero feature vector: normalised with max(‖f‖, 1e-12), all similarities 0, all tied.
    zeros = torch.zeros(1, 2)
    assert knn_top1(same, ytr, zeros, torch.tensor([3]), k=1) == 100.0


def test_neighbour_label_agreement_hand_made():
    xtr = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.7, 0.7], [0.0, 1.0], [-1.0, 0.0]])
    ytr = torch.tensor([0, 0, 1, 1, 0])
    xte = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    yte = torch.tensor([0, 1])
    # Query 0 neighbours (labels): 0, 0, 1, 1, 0 -> 100, 100, 66.7, 60 for k = 1, 2, 3, 5.
    # Query 1 neighbours (labels): 1, 1, 0, then 0, 0 -> 100, 100, 66.7, 40.
    got = neighbour_label_agreement(xtr, ytr, xte, yte, ks=(5, 1, 2, 3))
    assert list(got) == [1, 2, 3, 5]
    assert got[1] == pytest.approx(100.0)
    assert got[2] == pytest.approx(100.0)
    assert got[3] == pytest.approx(200 / 3)
    assert got[5] == pytest.approx(50.0)


def test_neighbour_label_agreement_bruteforce():
    xtr, ytr, xte, yte, _ = _tie_case(seed=5)
    ks = (1, 5, 20, 50)
    bank = xtr.double().numpy() / 2.0  # all norms are 2
    queries = xte.double().numpy() / 2.0
    expected = {k: 0.0 for k in ks}
    for q, y in zip(queries, yte.numpy(), strict=True):
        s = bank @ q
        order = np.lexsort((np.arange(len(s)), -s))
        for k in ks:
            expected[k] += (ytr.numpy()[order[:k]] == y).mean() / len(yte) * 100
    for chunk in (1, 13, 1024):
        got = neighbour_label_agreement(xtr, ytr, xte, yte, ks=ks, chunk_size=chunk)
        for k in ks:
            assert got[k] == pytest.approx(expected[k], abs=1e-9)


def test_nearest_neighbours_canonical_lists_bruteforce():
    """Neighbour lists equal a float64 brute-force lexsort (similarity desc, index asc) on a
    fixture full of exact ties, including rows whose k-th and (k+1)-th similarities tie (the
    only rows re-examined) and k = N_train (every bank entry)."""
    xtr, _, xte, _, _ = _tie_case(seed=7)
    bank = xtr.double().numpy() / 2.0  # all norms are 2: cosines are exact multiples of 1/4
    queries = xte.double().numpy() / 2.0
    n_train = len(bank)
    for k in (1, 4, 17, n_train - 1, n_train):
        n_boundary = 0
        for chunk in (1, 9, 1024):
            top_s, top_i = nearest_neighbours(xtr, xte, k, chunk_size=chunk)
            for row, q in enumerate(queries):
                s = bank @ q
                order = np.lexsort((np.arange(n_train), -s))
                np.testing.assert_array_equal(top_i[row].numpy(), order[:k])
                np.testing.assert_allclose(top_s[row].numpy(), s[order[:k]], atol=1e-6)
                n_boundary += int(k < n_train and s[order[k - 1]] == s[order[k]])
        assert k == n_train or n_boundary > 0


@pytest.mark.parametrize("m", [2, 21, 201])
@pytest.mark.parametrize("case", ["random", "ties", "one_group"])
def test_largest_preselection_equals_topk(m, case):
    """The grouped preselection returns exactly topk's values (sorted) and columns holding them,
    with a tail of columns outside the groups, many exact ties, and the top values crowded into
    a few groups (where a group holds many of the m largest)."""
    n_rows, n_cols = 40, 5003
    g = torch.Generator().manual_seed(m)
    sims = torch.randn(n_rows, n_cols, generator=g)
    group = _group_columns(n_cols, m, sims.device)
    n_groups = n_cols // group
    assert group >= 4 and n_groups * group < n_cols  # the preselection runs, with a tail
    if case == "ties":
        sims = (sims * 4).round() / 4
    elif case == "one_group":
        for row in range(n_rows):
            start = int(torch.randint(0, n_groups, (1,), generator=g))
            members = torch.arange(start, n_groups * group, n_groups)
            sims[row, members] = 10 + torch.rand(len(members), generator=g)
        sims[:, n_groups * group :] = 20.0  # the tail holds the very largest
    values, cols = _largest(sims, m)
    ref_values, _ = sims.topk(m, dim=1)
    assert torch.equal(values, ref_values)
    assert torch.equal(sims.gather(1, cols), values)
    assert all(len(set(row.tolist())) == m for row in cols)


def test_nearest_neighbours_canonical_lists_at_scale():
    """Lists from the grouped preselection (a 4,001-entry bank, k = 20 and 200) equal the
    float64 lexsort (similarity desc, index asc) where almost every boundary is an exact tie:
    vectors in {-1, 0, 1}^8 with four non-zeros, so every cosine is a multiple of 1/4."""
    g = np.random.default_rng(3)

    def vectors(n: int) -> np.ndarray:
        out = np.zeros((n, 8), dtype=np.float32)
        for row in out:
            row[g.choice(8, size=4, replace=False)] = g.choice([-1.0, 1.0], size=4)
        return out

    bank, queries = vectors(4001), vectors(25)
    for k in (20, 200):
        assert _group_columns(len(bank), k + 1, torch.device("cpu")) >= 4
        top_s, top_i = nearest_neighbours(torch.from_numpy(bank), torch.from_numpy(queries), k)
        n_boundary = 0
        for row, q in enumerate(queries):
            s = bank.astype(np.float64) @ q / 4.0
            order = np.lexsort((np.arange(len(bank)), -s))
            np.testing.assert_array_equal(top_i[row].numpy(), order[:k])
            np.testing.assert_array_equal(top_s[row].numpy(), s[order[:k]])
            n_boundary += int(s[order[k - 1]] == s[order[k]])
        assert n_boundary > 0


def test_knn_from_neighbours_prefix_equals_knn_evaluate():
    """One neighbour pass at the largest k gives, bit for bit, every smaller k's result."""
    xtr, ytr, xte, yte, c = _tie_case(seed=8)
    top_s, top_i = nearest_neighbours(xtr, xte, 60, chunk_size=13)
    for k, temperature in ((1, 0.07), (5, 0.5), (20, 0.07), (60, 0.1)):
        ref = knn_evaluate(xtr, ytr, xte, yte, k=k, temperature=temperature, num_classes=c)
        got = knn_from_neighbours(top_s, top_i, ytr, yte, k, temperature, c, chunk_size=7)
        assert torch.equal(got.correct, ref.correct)
        assert torch.equal(got.top5_correct, ref.top5_correct)
        assert (got.top1, got.top5, got.k) == (ref.top1, ref.top5, k)
    got = agreement_from_neighbours(top_i, ytr, yte, (1, 5, 20, 60))
    assert got == neighbour_label_agreement(xtr, ytr, xte, yte, ks=(1, 5, 20, 60))
    with pytest.raises(ValueError, match=r"1\.\.60"):
        knn_from_neighbours(top_s, top_i, ytr, yte, 61, 0.1, c)


def test_knn_k_above_bank_size_raises_or_names_k_used():
    """Protocol: k > N_train is an error naming both numbers. With ``clamp_k`` every bank entry
    votes and the result names the k actually used (what the engine records as knn<k>_k_used)."""
    xtr, ytr, xte, yte, c = _random_case(seed=4, n_train=30)
    with pytest.raises(ValueError, match=r"k=200.*N_train=30"):
        knn_evaluate(xtr, ytr, xte, yte, k=200)
    got = knn_evaluate(xtr, ytr, xte, yte, k=200, temperature=0.1, clamp_k=True)
    ref = knn_evaluate(xtr, ytr, xte, yte, k=30, temperature=0.1)
    assert (got.k, got.k_requested) == (30, 200)
    assert torch.equal(got.correct, ref.correct) and got.top1 == ref.top1
    assert knn_evaluate(xtr, ytr, xte, yte, k=20).k_requested == 20
    assert resolve_k(200, 30, clamp_k=True) == 30 and resolve_k(20, 30) == 20
    with pytest.raises(ValueError, match="k must be >= 1"):
        resolve_k(0, 30, clamp_k=True)


def test_evaluate_features_one_pass_equals_separate_calls():
    """The engine's single neighbour pass gives the same numbers as one knn_evaluate per
    setting / curve point, and names the k used when the bank is smaller than k."""
    from engine.evaluate import CURVE_KS, CURVE_TEMPERATURE, evaluate_features

    xtr, ytr, xte, yte, c = _random_case(seed=9, n_train=150, n_test=70)
    settings = [{"k": 20, "temperature": 0.07}, {"k": 200, "temperature": 0.1}]
    out = evaluate_features(xtr, ytr, xte, yte, settings, linear=False, chunk_size=16)
    metrics = out["metrics"]
    ref20 = knn_evaluate(xtr, ytr, xte, yte, k=20, temperature=0.07, num_classes=c)
    ref150 = knn_evaluate(xtr, ytr, xte, yte, k=150, temperature=0.1, num_classes=c)
    assert (metrics["knn20_top1"], metrics["knn20_top5"]) == (ref20.top1, ref20.top5)
    assert (metrics["knn200_top1"], metrics["knn200_top5"]) == (ref150.top1, ref150.top5)
    assert metrics["knn200_k_used"] == 150 and "knn20_k_used" not in metrics
    assert "linear_holdout_stratified" not in metrics  # linear=False
    with_probe = evaluate_features(xtr, ytr, xte, yte, settings[:1], chunk_size=16)["metrics"]
    assert with_probe["linear_holdout_stratified"] is True
    assert metrics["knn_curve"] == {
        str(k): knn_evaluate(xtr, ytr, xte, yte, k=k, temperature=CURVE_TEMPERATURE,
                             num_classes=c).top1
        for k in CURVE_KS if k <= 150
    }
    assert metrics["neighbour_agreement"] == {
        str(k): v for k, v in neighbour_label_agreement(xtr, ytr, xte, yte, ks=(1, 5, 20, 50)).items()
    }

@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_evaluate_features_refuses_features_that_are_not_finite(linear, bad):
    """A diverged network's NaN features once gave made-up k-NN numbers (knn20_top5 = 100 with
    a tenth of the bank NaN) or, with the probe, an unrelated linear-algebra error."""
    from engine.evaluate import evaluate_features

    xtr, ytr, xte, yte, _ = _random_case(seed=9, n_train=150, n_test=70)
    settings = [{"k": 20, "temperature": 0.07}]
    broken = xtr.clone()
    broken[::10, 0] = bad
    message = r"^train_features contains NaN or Inf \(15 of 150 rows\)$"
    with pytest.raises(ValueError, match=message):
        evaluate_features(broken, ytr, xte, yte, settings, linear=linear)
    broken = xte.clone()
    broken[3] = bad
    with pytest.raises(ValueError, match=r"^test_features contains NaN or Inf \(1 of 70 rows\)$"):
        evaluate_features(xtr, ytr, broken, yte, settings, linear=linear)



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_knn_cuda_matches_cpu():
    xtr, ytr, xte, yte, _ = _random_case(seed=2, n_train=400, n_test=200)
    cpu = knn_evaluate(xtr, ytr, xte, yte)
    gpu = knn_evaluate(xtr.cuda(), ytr.cuda(), xte.cuda(), yte.cuda())
    assert torch.equal(cpu.correct, gpu.correct)


# ---------------------------------------------------------------------------------------------
# Linear probe
# ---------------------------------------------------------------------------------------------


def _blobs(n_train, n_test, d, c, noise, seed):
    g = np.random.default_rng(seed)
    centres = g.normal(size=(c, d))

    def draw(n):
        y = np.arange(n) % c
        g.shuffle(y)
        x = centres[y] + noise * g.normal(size=(n, d))
        return torch.tensor(x, dtype=torch.float32), torch.tensor(y)

    return (*draw(n_train), *draw(n_test))


def test_linear_probe_separable():
    xtr, ytr, xte, yte = _blobs(600, 200, 32, 10, 0.05, seed=0)
    res = linear_probe(xtr, ytr, xte, yte)
    assert res.backend == "torch"
    assert res.top1 >= 99.0 and res.top5 == 100.0
    assert res.correct.dtype == torch.bool and res.correct.shape == (200,)
    assert res.top1 == pytest.approx(100 * res.correct.float().mean().item())
    assert set(res.holdout_top1) == set(DEFAULT_LAMBDAS)
    # Every λ is perfect on the hold-out: the tie goes to the larger λ, which is the edge.
    assert all(v == 100.0 for v in res.holdout_top1.values())
    assert res.chosen_lambda == max(DEFAULT_LAMBDAS) and res.lambda_at_edge
    assert res.converged and all(res.holdout_converged.values())


def test_linear_probe_tie_goes_to_larger_lambda_unsorted_grid():
    xtr, ytr, xte, yte = _blobs(300, 50, 16, 5, 0.05, seed=1)
    res = linear_probe(xtr, ytr, xte, yte, lambdas=(1e-3, 1e-5, 1e-4), backend="sklearn")
    assert res.holdout_top1 == {1e-3: 100.0, 1e-5: 100.0, 1e-4: 100.0}
    assert res.chosen_lambda == 1e-3 and res.lambda_at_edge


def test_linear_probe_tie_inside_grid(monkeypatch):
    # Only λ ∈ {1e-3, 1e-2} produce a real classifier; the others predict nothing useful.
    # Both good λ tie at 100 % on the hold-out -> 1e-2, which is not on the edge.
    def fake_fit(x, y, lam, max_iter, tol, init=None):
        fit = linear_module._fit_sklearn(x, y, lam, max_iter, tol)
        if lam not in (1e-3, 1e-2):
            fit.weight = torch.zeros_like(fit.weight)
            fit.bias = torch.zeros_like(fit.bias)
        return fit

    monkeypatch.setattr(linear_module, "_fit_torch", fake_fit)
    xtr, ytr, xte, yte = _blobs(300, 50, 16, 5, 0.05, seed=2)
    res = linear_probe(xtr, ytr, xte, yte, lambdas=(1e-4, 1e-3, 1e-2, 1e-1))
    assert res.holdout_top1[1e-3] == res.holdout_top1[1e-2] == 100.0
    assert res.holdout_top1[1e-4] == res.holdout_top1[1e-1] == 20.0
    assert res.chosen_lambda == 1e-2 and not res.lambda_at_edge
    assert res.top1 >= 99.0


def test_linear_probe_torch_matches_sklearn():
    """The torch back end is the default only because of this test: within 0.1 point of the
    sklearn reference on a noisy 10-class fixture (1500×64), with the same chosen λ."""
    xtr, ytr, xte, yte = _blobs(1500, 500, 64, 10, 2.5, seed=1)
    ref = linear_probe(xtr, ytr, xte, yte, backend="sklearn")
    fast = linear_probe(xtr, ytr, xte, yte, backend="torch")
    assert 60.0 < ref.top1 < 99.0  # non-trivial fixture
    assert abs(fast.top1 - ref.top1) <= 0.1
    assert abs(fast.top5 - ref.top5) <= 0.1
    assert fast.chosen_lambda == ref.chosen_lambda
    assert fast.lambda_at_edge == ref.lambda_at_edge
    # Hold-out curves agree where the problem is well conditioned (λ ≥ 1e-4); at tiny λ the
    # gradient tolerance stops both solvers far out along nearly flat directions.
    for lam in DEFAULT_LAMBDAS:
        if lam >= 1e-4:
            assert fast.holdout_top1[lam] == pytest.approx(ref.holdout_top1[lam], abs=1.0)
    assert ref.converged and fast.converged


@pytest.mark.parametrize("n_classes", [2, 4])
def test_backends_solve_the_same_objective(n_classes):
    # Same minimiser up to solver tolerance: checks C = 1/(λN) (and 2/(λN) for 2 classes).
    xtr, ytr, _, _ = _blobs(400, 1, 8, n_classes, 1.5, seed=n_classes)
    x = xtr.double()
    mu, sigma = _standardiser(x)
    x = (x - mu) / sigma
    for lam in (1e-2, 1e-1):
        with linear_module._cpu_threads(x.device, 0):
            a = _fit_sklearn(x, ytr, lam, 1000, 1e-8)
            b = _fit_torch(x, ytr, lam, 1000, 1e-8)
        la = x @ a.weight.T + a.bias
        lb = x @ b.weight.T + b.bias
        # Logits are defined up to a per-row constant; compare centred logits.
        la = la - la.mean(dim=1, keepdim=True)
        lb = lb - lb.mean(dim=1, keepdim=True)
        assert torch.allclose(la, lb, atol=1e-4), (lam, (la - lb).abs().max())
        assert torch.allclose(a.weight, b.weight, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "sklearn"])
def test_linear_probe_absent_classes(backend):
    xtr, ytr, xte, yte = _blobs(300, 100, 8, 5, 0.3, seed=3)
    keep = ytr != 3  # class 3 absent from the train split, present in the test split
    xtr, ytr = xtr[keep], ytr[keep]
    xtr = torch.cat([xtr, torch.full((1, 8), 5.0)])
    ytr = torch.cat([ytr, torch.tensor([5])])  # class 5: one image, cannot be stratified
    with pytest.warns(RuntimeWarning, match="stratified"):
        res = linear_probe(xtr, ytr, xte, yte, backend=backend, lambdas=(1e-3, 1e-2))
    assert not res.correct[yte == 3].any()
    assert res.correct[yte != 3].all()
    assert res.top1 == pytest.approx(80.0)
    assert res.backend == backend and res.holdout_stratified is False
    stratifiable = ytr != 5
    full = linear_probe(xtr[stratifiable], ytr[stratifiable], xte, yte, backend=backend,
                        lambdas=(1e-3, 1e-2))
    assert full.holdout_stratified is True


@pytest.mark.parametrize("backend", ["torch", "sklearn"])
def test_linear_probe_records_nonconvergence(backend):
    xtr, ytr, xte, yte = _blobs(300, 100, 16, 5, 1.0, seed=4)
    res = linear_probe(xtr, ytr, xte, yte, backend=backend, lambdas=(1e-5, 1e-3), max_iter=2)
    assert not res.converged
    assert not any(res.holdout_converged.values())
    assert res.n_iter == 2
    assert res.iterations == {"1e-05": 2, "1e-03": 2, "refit": 2}


def _overlapping_gaussians(n_train, n_test, d, c, seed):
    """Class-conditional Gaussians with overlap and correlated dimensions (an ill-conditioned
    Gram matrix, like pooled CNN features): x = (μ_y + z) A, z ~ N(0, I), A fixed."""
    g = torch.Generator().manual_seed(seed)
    centres = 0.6 * torch.randn(c, d, generator=g, dtype=torch.float64)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    mix = mix * torch.logspace(0, -2, d, dtype=torch.float64)[None]  # column scales 1 … 0.01

    def draw(n):
        y = torch.randint(0, c, (n,), generator=g)
        return (centres[y] + torch.randn(n, d, generator=g, dtype=torch.float64)) @ mix + 3.0, y

    return (*draw(n_train), *draw(n_test))


def _max_abs_grad(x, y, lam, fit):
    """max |∇J| at ``fit``, by autograd in float64 (independent of the solver's own gradient)."""
    w = fit.weight.double().clone().requires_grad_()
    b = fit.bias.double().clone().requires_grad_()
    _, y_local = torch.unique(y, sorted=True, return_inverse=True)
    loss = torch.nn.functional.cross_entropy(x @ w.T + b, y_local) + 0.5 * lam * w.pow(2).sum()
    gw, gb = torch.autograd.grad(loss, (w, b))
    return max(gw.abs().max().item(), gb.abs().max().item())


def test_newton_fit_matches_converged_sklearn_coefficients():
    """10 classes, overlapping and correlated features: the Newton-CG fit and scikit-learn's
    lbfgs, both run to a tight tolerance, give the same W, b (b up to a common shift) and
    the same predictions; the returned point meets the gradient tolerance."""
    xtr, ytr, _, _ = _overlapping_gaussians(600, 1, 16, 10, seed=0)
    mu, sigma = _standardiser(xtr)
    x = (xtr - mu) / sigma
    for lam in (1e-4, 1e-2):
        with linear_module._cpu_threads(x.device, 0):
            ref = _fit_sklearn(x, ytr, lam, 5000, 1e-10)
            fit = _fit_torch(x, ytr, lam, 1000, 1e-8)
        assert fit.converged and fit.n_iter >= 1 and fit.n_hess >= 1
        assert _max_abs_grad(x, ytr, lam, fit) <= 1e-8
        assert torch.allclose(fit.weight, ref.weight, atol=1e-5), (fit.weight - ref.weight).abs().max()
        shift = (fit.bias - ref.bias).mean()
        assert torch.allclose(fit.bias - shift, ref.bias, atol=1e-5)
        pred = lambda f: (x @ f.weight.T + f.bias).argmax(dim=1)  # noqa: E731
        assert torch.equal(pred(fit), pred(ref))


def test_newton_warm_start_reaches_the_same_solution():
    xtr, ytr, _, _ = _overlapping_gaussians(500, 1, 12, 5, seed=1)
    mu, sigma = _standardiser(xtr)
    x = (xtr - mu) / sigma
    with linear_module._cpu_threads(x.device, 0):
        start = _fit_torch(x, ytr, 1e-5, 1000, 1e-8)  # the previous λ of the grid
        cold = _fit_torch(x, ytr, 1e-6, 1000, 1e-8)
        warm = _fit_torch(x, ytr, 1e-6, 1000, 1e-8, init=start)
    assert cold.converged and warm.converged
    assert warm.n_iter < cold.n_iter and warm.n_hess < cold.n_hess
    # Same minimiser: |ΔW| ≤ ‖∇J‖/λ_min(H) ~ 1e-8/1e-6 at most; observed ~2e-6 on |W| ~ 11.
    assert torch.allclose(warm.weight, cold.weight, atol=1e-5)


def test_linear_probe_converges_at_every_lambda_and_matches_sklearn():
    """The whole protocol on overlapping, correlated 10-class features: every grid fit and the
    refit converge (max |∇J| ≤ tol, checked independently), iterations are recorded for each,
    and top-1/top-5 agree with the scikit-learn reference within 0.1 point."""
    xtr, ytr, xte, yte = _overlapping_gaussians(2000, 1000, 24, 10, seed=2)
    ref = linear_probe(xtr, ytr, xte, yte, backend="sklearn", max_iter=5000)
    res = linear_probe(xtr, ytr, xte, yte)
    assert 30.0 < ref.top1 < 95.0  # a non-trivial problem
    assert ref.converged and all(ref.holdout_converged.values())
    assert res.converged and all(res.holdout_converged.values())
    assert abs(res.top1 - ref.top1) <= 0.1 and abs(res.top5 - ref.top5) <= 0.1
    assert res.chosen_lambda == ref.chosen_lambda
    keys = ["1e-07", "1e-06", "1e-05", "1e-04", "1e-03", "1e-02", "1e-01", "refit"]
    assert sorted(res.iterations) == sorted(keys) == sorted(res.hessian_products)
    assert all(1 <= res.iterations[key] <= 100 for key in keys)
    assert res.n_iter == res.iterations["refit"]
    # The same refit from zero: it meets the tolerance (checked independently) and costs more
    # than the warm-started refit of the probe.
    mu, sigma = _standardiser(xtr)
    cold = _fit_torch((xtr - mu) / sigma, ytr, res.chosen_lambda, 1000, 1e-6)
    assert _max_abs_grad((xtr - mu) / sigma, ytr, res.chosen_lambda, cold) <= 1e-6
    assert res.hessian_products["refit"] < cold.n_hess


def test_lambda_key():
    assert [linear_module.lambda_key(lam) for lam in DEFAULT_LAMBDAS] == [
        "1e-07", "1e-06", "1e-05", "1e-04", "1e-03", "1e-02", "1e-01"
    ]
    assert linear_module.lambda_key(2.5e-4) == "0.00025"


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def _t975_df2() -> float:
    # Student t, 2 d.o.f.: F⁻¹(p) = (2p − 1) / sqrt(2p(1 − p)).
    p = 0.975
    return (2 * p - 1) / math.sqrt(2 * p * (1 - p))


def _t975_df4() -> float:
    # Student t, 4 d.o.f.: F⁻¹(p) = 2·sqrt(q − 1), q = cos(arccos(√a)/3)/√a, a = 4p(1 − p).
    p = 0.975
    a = 4 * p * (1 - p)
    q = math.cos(math.acos(math.sqrt(a)) / 3) / math.sqrt(a)
    return 2 * math.sqrt(q - 1)


T975_DF2 = _t975_df2()  # 4.302652729749462
T975_DF4 = _t975_df4()  # 2.7764451051977934


def test_t_interval_hand_computed():
    s = t_interval([1.0, 2.0, 3.0])
    assert (s.mean, s.std, s.n) == (2.0, 1.0, 3)
    assert s.half_width == pytest.approx(T975_DF2 / math.sqrt(3), rel=1e-12)
    assert s.half_width == pytest.approx(2.4841377117503303, rel=1e-12)
    assert s.low == pytest.approx(2.0 - s.half_width)

    # values 70, 71, 72, 73, 74: mean 72, s = sqrt(10/4), half-width t_{.975,4} · s/√5.
    s = t_interval([70, 71, 72, 73, 74])
    assert s.mean == 72.0
    assert s.std == pytest.approx(math.sqrt(2.5), rel=1e-12)
    assert s.half_width == pytest.approx(T975_DF4 * math.sqrt(2.5) / math.sqrt(5), rel=1e-12)


def test_t_interval_single_seed():
    s = t_interval([81.5])
    assert s.mean == 81.5 and s.n == 1
    assert math.isnan(s.std) and math.isnan(s.half_width)
    with pytest.raises(ValueError):
        t_interval([])


def test_bootstrap_ci():
    rng = np.random.default_rng(123)
    correct = rng.random(500) < 0.7
    mean, low, high = bootstrap_ci(correct)
    assert mean == pytest.approx(100 * correct.mean())
    assert low < mean < high and 0.0 <= low and high <= 100.0
    # Determinism, and the documented index sets.
    assert bootstrap_ci(correct) == (mean, low, high)
    idx = np.random.default_rng(0).integers(0, 500, size=(1000, 500))
    accs = 100 * correct[idx].mean(axis=1)
    assert (low, high) == tuple(np.percentile(accs, [2.5, 97.5]))
    # Roughly the binomial standard error: 1.96 · sqrt(.7·.3/500) ≈ 4.0 points.
    assert 6.0 < high - low < 10.0
    assert bootstrap_ci(correct, seed=1) != (mean, low, high)
    assert bootstrap_ci(torch.tensor(correct)) == (mean, low, high)
    assert bootstrap_ci([True] * 10) == (100.0, 100.0, 100.0)


def test_paired_comparison_vs_hand_and_scipy():
    method = {0: 71.2, 1: 70.5, 2: 72.0, 3: 71.1}
    base = {0: 70.0, 1: 70.1, 2: 70.9, 4: 69.0}
    r = paired_comparison(method, base)
    assert r.n == 3
    assert [s for s, _ in r.diffs] == [0, 1, 2]
    assert [d for _, d in r.diffs] == pytest.approx([1.2, 0.4, 1.1])
    assert r.mean_diff == pytest.approx(0.9)
    # deviations 0.3, -0.5, 0.2 -> s² = 0.38 / 2 = 0.19
    assert r.std_diff == pytest.approx(math.sqrt(0.19))
    assert r.half_width == pytest.approx(T975_DF2 * math.sqrt(0.19 / 3))
    # Student t with 2 d.o.f.: CDF(t) = 1/2 + t / (2·sqrt(2 + t²)) -> p = 1 − t/sqrt(2 + t²).
    t = 0.9 / math.sqrt(0.19 / 3)
    assert r.p_value == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)
    assert r.p_value == pytest.approx(
        sps.ttest_rel([71.2, 70.5, 72.0], [70.0, 70.1, 70.9]).pvalue, rel=1e-12
    )
    assert r.unmatched_method == [3] and r.unmatched_base == [4]


def test_paired_comparison_degenerate_cases():
    r = paired_comparison({1: 70.0, 2: 71.0}, {3: 69.0})
    assert r.n == 0 and r.note == NO_MATCHED_SEEDS and r.diffs == []
    assert math.isnan(r.mean_diff) and math.isnan(r.p_value)
    assert r.unmatched_method == [1, 2] and r.unmatched_base == [3]

    r = paired_comparison({1: 70.0, 2: 71.0}, {2: 69.5})
    assert r.n == 1 and r.diffs == [(2, 1.5)] and r.mean_diff == 1.5
    assert math.isnan(r.half_width) and math.isnan(r.p_value)
    assert "paired_bootstrap" in r.note and r.unmatched_method == [1]


def test_paired_bootstrap():
    rng = np.random.default_rng(7)
    base = rng.random(400) < 0.6
    method = base.copy()
    flip = rng.choice(400, size=40, replace=False)
    method[flip[:30]] = True
    method[flip[30:]] = False
    diff, low, high = paired_bootstrap(method, base)
    assert diff == pytest.approx(100 * (method.mean() - base.mean()))
    assert low <= diff <= high
    assert paired_bootstrap(method, base) == (diff, low, high)
    # Same index sets for both vectors: the resampled differences, computed by hand.
    idx = np.random.default_rng(0).integers(0, 400, size=(1000, 400))
    diffs = 100 * (method[idx].mean(axis=1) - base[idx].mean(axis=1))
    assert (low, high) == pytest.approx(tuple(np.percentile(diffs, [2.5, 97.5])))
    # Pairing makes the interval narrower than independent resampling would.
    _, lm, hm = bootstrap_ci(method, seed=0)
    _, lb, hb = bootstrap_ci(base, seed=1)
    assert high - low < math.hypot(hm - lm, hb - lb)
    assert paired_bootstrap(base, base) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="length"):
        paired_bootstrap(method[:-1], base)


def test_formatting():
    assert fmt_acc(12.3456) == "12.35"
    assert fmt_acc(99.999) == "100.00"
    assert fmt_acc(7.0) == "7.00"
    assert fmt_p(0.012345) == "0.0123"
    assert fmt_p(0.5) == "0.500"
    assert fmt_p(1.0) == "1.00"
    assert fmt_p(1.2345e-5) == "1.23e-05"
    assert fmt_p(float("nan")) == "nan"
