"""Linear probe on frozen features (protocol.md §4).

Multinomial logistic regression, tuned on a hold-out of the train split:

1. Hold-out: ``train_test_split(arange(N), test_size=0.1, stratify=y, random_state=split_seed)``
   → fit set (90%) and hold-out (10%).
2. Standardisation: x = (f − μ) / σ, μ and σ (ddof = 0, floored at 1e-6) from the fit set; the
   hold-out uses the same μ, σ.
3. Objective: J(W, b) = (1/N) Σ_i CE(W x_i + b, y_i) + (λ/2) ‖W‖²_F, bias not penalised.
4. λ grid (default 1e-7 … 1e-1): fit on the fit set, score hold-out top-1; pick the best,
   ties to the larger λ; ``lambda_at_edge`` if the pick is the smallest or largest λ.
5. Refit on the whole train split (μ, σ recomputed) with the chosen λ; score the test split once.
6. Solver: full-batch L-BFGS, gradient tolerance ``tol`` = 1e-6, ≤ ``max_iter`` = 1000 iterations.

Back ends:

* ``"sklearn"`` — the reference, ``LogisticRegression(solver="lbfgs", C=1/(λ·N), tol, max_iter)``
  (with lbfgs and ≥ 3 classes scikit-learn 1.9 always fits the multinomial loss; its
  ``multi_class`` argument has been removed, and ``penalty`` is deprecated in favour of the
  default ``l1_ratio=0``, i.e. L2). With exactly 2 classes scikit-learn fits a single binomial vector v; the
  2-class multinomial objective above has its optimum at W = (−v/2, v/2), which is the binomial
  problem with penalty (λ/4)‖v‖², i.e. ``C = 2/(λ·N)``; that is what is used, and the logits
  are mapped back to (−z/2, z/2).
* ``"torch"`` — ``torch.optim.LBFGS`` (strong-Wolfe line search, history 10 like SciPy) on the
  same objective, on the features' device: float64 on CPU, float32 on accelerators. Stopping
  mirrors SciPy's L-BFGS-B as sklearn configures it: max-abs gradient ≤ ``tol``, ``max_iter``
  iterations, 15000 function evaluations, and a tiny change of loss/step (64·eps in float64,
  1e-9 in float32), which SciPy also counts as convergence. Differences that remain: torch's
  line search allows 25 trial steps (sklearn sets 50) and its loss-change test is absolute
  where SciPy's is relative; the test suite checks the two back ends agree.

``converged`` is False when the solver stopped on an iteration/evaluation limit (sklearn: a
``ConvergenceWarning``). Classes absent from a fit set are left out of that fit and get logit
−∞ (never predicted); top-5 uses the same rank rule as the k-NN (ties to the smaller class).

Cost: one loss+gradient evaluation is ~4·N·d·C flops (logits and weight gradient).

* Digits-sized data (1437×96, 10 classes), whole grid + refit on 2 shared CPU cores: about
  0.45 s with ``"sklearn"`` and 0.9 s with ``"torch"`` (measured under a load average of ~6).
  The first torch fit in a process also pays a one-off ~2 s import of ``torch._dynamo``
  triggered by ``torch.optim``. Small CPU problems are fitted single-threaded (see
  ``_SINGLE_THREAD_WORK``).
* ImageNet-100 caches (126k×512, 100 classes): ~2.6e10 flops per evaluation, i.e. a few ms on
  a current GPU in float32; the 8 fits (≤ 1000 iterations each, ~1.1 evaluations per
  iteration, plus ~1 ms of Python per iteration) should take roughly 10 s to 1 min with
  ``backend="torch"`` on GPU (estimate, not measured here). On 2 CPU cores one float64
  evaluation took ~5 s, so either back end on CPU needs hours.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from threadpoolctl import threadpool_limits

__all__ = ["DEFAULT_LAMBDAS", "ProbeResult", "linear_probe"]

DEFAULT_LAMBDAS: tuple[float, ...] = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
SIGMA_FLOOR = 1e-6
_MAX_EVAL = 15000  # SciPy's L-BFGS-B default ``maxfun``, which sklearn leaves unchanged.
# Below this many multiply-adds per logits matmul (N·d·C) a CPU fit is dominated by per-iteration
# overhead; extra threads then only add synchronisation, and on a shared machine their
# spin-waiting made a digits-sized grid ~50x slower (2 s instead of 40 ms per fit).
_SINGLE_THREAD_WORK = 1 << 24


@dataclass
class ProbeResult:
    """Result of :func:`linear_probe`.

    ``top1``/``top5`` are test-split percentages from the refit; ``correct`` is the per-image
    top-1 correctness (bool, CPU). ``converged`` refers to the refit; ``holdout_converged``
    records every grid fit. ``holdout_top1`` maps λ → hold-out top-1 (percent).
    """

    top1: float
    top5: float
    correct: torch.Tensor
    chosen_lambda: float
    lambda_at_edge: bool
    converged: bool
    holdout_top1: dict[float, float]
    backend: str
    holdout_converged: dict[float, bool] = field(default_factory=dict)
    top5_correct: torch.Tensor | None = None
    n_iter: int = 0


@dataclass
class _Fit:
    classes: torch.Tensor  # present class ids, ascending, long, on the logits' device
    weight: torch.Tensor  # (P, d)
    bias: torch.Tensor  # (P,)
    converged: bool
    n_iter: int


def _holdout_split(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.arange(len(y))
    try:
        fit_idx, hold_idx = train_test_split(idx, test_size=0.1, stratify=y, random_state=seed)
    except ValueError as err:
        # e.g. a class with a single image, or fewer hold-out slots than classes.
        warnings.warn(
            f"stratified hold-out split impossible ({err}); using an unstratified split",
            RuntimeWarning,
            stacklevel=3,
        )
        fit_idx, hold_idx = train_test_split(idx, test_size=0.1, random_state=seed)
    return fit_idx, hold_idx


def _standardiser(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu = x.mean(dim=0)
    sigma = x.std(dim=0, unbiased=False).clamp_min(SIGMA_FLOOR)
    return mu, sigma


def _fit_sklearn(x: torch.Tensor, y: torch.Tensor, lam: float, max_iter: int, tol: float) -> _Fit:
    xn = x.double().cpu().numpy()
    yn = y.cpu().numpy()
    classes = np.unique(yn)
    n, d = xn.shape
    if len(classes) == 1:
        return _trivial_fit(classes, d, x)
    c = 1.0 / (lam * n)
    if len(classes) == 2:
        c *= 2.0  # binomial ≡ 2-class multinomial with λ/2 on v = w1 − w0; see module doc
    clf = LogisticRegression(solver="lbfgs", C=c, tol=tol, max_iter=max_iter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(xn, yn)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    for w in caught:
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    weight = torch.from_numpy(clf.coef_.copy())
    bias = torch.from_numpy(clf.intercept_.copy())
    if len(classes) == 2:
        weight = torch.cat([-weight / 2, weight / 2])
        bias = torch.cat([-bias / 2, bias / 2])
    return _Fit(
        classes=torch.from_numpy(clf.classes_.astype(np.int64)),
        weight=weight,
        bias=bias,
        converged=converged,
        n_iter=int(np.max(clf.n_iter_)),
    )


def _trivial_fit(classes: np.ndarray, d: int, like: torch.Tensor) -> _Fit:
    # One class only: CE is identically 0, so W = 0 and the single class is always predicted.
    return _Fit(
        classes=torch.as_tensor(classes, dtype=torch.long, device=like.device),
        weight=torch.zeros(1, d, dtype=like.dtype, device=like.device),
        bias=torch.zeros(1, dtype=like.dtype, device=like.device),
        converged=True,
        n_iter=0,
    )


def _fit_torch(x: torch.Tensor, y: torch.Tensor, lam: float, max_iter: int, tol: float) -> _Fit:
    classes, y_local = torch.unique(y, sorted=True, return_inverse=True)
    n, d = x.shape
    if classes.numel() == 1:
        return _trivial_fit(classes.cpu().numpy(), d, x)
    p = classes.numel()
    weight = torch.zeros(p, d, dtype=x.dtype, device=x.device, requires_grad=True)
    bias = torch.zeros(p, dtype=x.dtype, device=x.device, requires_grad=True)
    eps_change = 64 * torch.finfo(x.dtype).eps if x.dtype == torch.float64 else 1e-9
    opt = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        max_eval=_MAX_EVAL,
        tolerance_grad=tol,
        tolerance_change=eps_change,
        history_size=10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=False)
        logits = torch.addmm(bias, x, weight.T)
        loss = F.cross_entropy(logits, y_local) + 0.5 * lam * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
        state = opt.state[weight]
        n_iter, n_eval = int(state.get("n_iter", 0)), int(state.get("func_evals", 0))
        # The line search may leave .grad from a rejected trial point; re-evaluate at the end.
        closure()
    grad_max = max(weight.grad.abs().max().item(), bias.grad.abs().max().item())
    converged = grad_max <= tol or (n_iter < max_iter and n_eval < _MAX_EVAL)
    return _Fit(
        classes=classes,
        weight=weight.detach(),
        bias=bias.detach(),
        converged=converged,
        n_iter=n_iter,
    )


@contextmanager
def _cpu_threads(device: torch.device, work: int) -> Iterator[None]:
    if device.type != "cpu" or work >= _SINGLE_THREAD_WORK:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(previous)


def _logits(fit: _Fit, x: torch.Tensor, num_classes: int) -> torch.Tensor:
    weight = fit.weight.to(device=x.device, dtype=x.dtype)
    bias = fit.bias.to(device=x.device, dtype=x.dtype)
    full = torch.full((x.shape[0], num_classes), -torch.inf, dtype=x.dtype, device=x.device)
    full[:, fit.classes.to(x.device)] = torch.addmm(bias, x, weight.T)
    return full


def _hits(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 and top-5 hits; rank = #{c: l_c > l_y} + #{c < y: l_c = l_y}."""
    l_y = logits.gather(1, y[:, None])
    class_ids = torch.arange(logits.shape[1], device=logits.device)
    rank = (logits > l_y).sum(dim=1) + ((logits == l_y) & (class_ids[None] < y[:, None])).sum(dim=1)
    return rank == 0, rank < 5


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    backend: str = "torch",
    split_seed: int = 0,
    max_iter: int = 1000,
    tol: float = 1e-6,
) -> ProbeResult:
    """Protocol §4 linear probe: λ chosen on a stratified train hold-out, refit, test once.

    Minimises J(W, b) = (1/N) Σ_i CE(W x_i + b, y_i) + (λ/2)‖W‖²_F on standardised features
    x = (f − μ)/σ. Labels are 0..C−1 with C = 1 + the largest label in either split. Returns
    test top-1/top-5 in percent, per-image correctness, the chosen λ (ties → larger λ), whether
    it lies on the grid's edge, solver convergence and the hold-out curve.
    """
    if backend not in ("torch", "sklearn"):
        raise ValueError(f"backend must be 'torch' or 'sklearn', got {backend!r}")
    lambdas = [float(lam) for lam in lambdas]
    if not lambdas or any(not lam > 0 for lam in lambdas):
        raise ValueError(f"lambdas must be a non-empty list of positive numbers, got {lambdas}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")

    f_train = torch.as_tensor(train_features)
    device = f_train.device
    if backend == "sklearn":
        device = torch.device("cpu")
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    f_train = f_train.to(device=device, dtype=dtype)
    f_test = torch.as_tensor(test_features).to(device=device, dtype=dtype)
    y_train = torch.as_tensor(train_labels).to(device=device, dtype=torch.long)
    y_test = torch.as_tensor(test_labels).to(device=device, dtype=torch.long)
    if f_train.ndim != 2 or f_test.ndim != 2 or f_train.shape[1] != f_test.shape[1]:
        raise ValueError(
            f"features must be (N, d) with equal d, got {tuple(f_train.shape)} and "
            f"{tuple(f_test.shape)}"
        )
    if y_train.shape != (f_train.shape[0],) or y_test.shape != (f_test.shape[0],):
        raise ValueError("labels must be 1-D and match the number of feature rows")
    if f_train.shape[0] < 2:
        raise ValueError(f"need at least 2 train images, got {f_train.shape[0]}")
    if int(y_train.min()) < 0 or (y_test.numel() and int(y_test.min()) < 0):
        raise ValueError("labels must be in 0..C-1")
    num_classes = int(torch.cat([y_train, y_test]).max()) + 1
    fit_fn = _fit_sklearn if backend == "sklearn" else _fit_torch
    with _cpu_threads(device, f_train.shape[0] * f_train.shape[1] * num_classes):
        return _probe(
            fit_fn,
            f_train,
            y_train,
            f_test,
            y_test,
            num_classes,
            lambdas,
            backend,
            split_seed,
            max_iter,
            tol,
        )


def _probe(
    fit_fn: Callable[[torch.Tensor, torch.Tensor, float, int, float], _Fit],
    f_train: torch.Tensor,
    y_train: torch.Tensor,
    f_test: torch.Tensor,
    y_test: torch.Tensor,
    num_classes: int,
    lambdas: list[float],
    backend: str,
    split_seed: int,
    max_iter: int,
    tol: float,
) -> ProbeResult:
    device = f_train.device
    fit_idx, hold_idx = _holdout_split(y_train.cpu().numpy(), split_seed)
    fit_idx_t = torch.as_tensor(fit_idx, device=device)
    hold_idx_t = torch.as_tensor(hold_idx, device=device)
    x_fit, y_fit = f_train[fit_idx_t], y_train[fit_idx_t]
    x_hold, y_hold = f_train[hold_idx_t], y_train[hold_idx_t]
    mu, sigma = _standardiser(x_fit)
    x_fit = (x_fit - mu) / sigma
    x_hold = (x_hold - mu) / sigma

    hold_counts: dict[float, int] = {}
    holdout_top1: dict[float, float] = {}
    holdout_converged: dict[float, bool] = {}
    for lam in lambdas:
        fit = fit_fn(x_fit, y_fit, lam, max_iter, tol)
        top1_hits, _ = _hits(_logits(fit, x_hold, num_classes), y_hold)
        # Compare integer counts so that equal accuracies tie exactly.
        hold_counts[lam] = int(top1_hits.sum())
        holdout_top1[lam] = 100.0 * hold_counts[lam] / len(hold_idx)
        holdout_converged[lam] = fit.converged
    chosen = max(lambdas, key=lambda lam: (hold_counts[lam], lam))
    at_edge = chosen in (min(lambdas), max(lambdas))

    mu, sigma = _standardiser(f_train)
    fit = fit_fn((f_train - mu) / sigma, y_train, chosen, max_iter, tol)
    top1_hits, top5_hits = _hits(_logits(fit, (f_test - mu) / sigma, num_classes), y_test)
    n_test = max(y_test.numel(), 1)
    correct = top1_hits.cpu()
    correct5 = top5_hits.cpu()
    return ProbeResult(
        top1=100.0 * int(correct.sum()) / n_test,
        top5=100.0 * int(correct5.sum()) / n_test,
        correct=correct,
        chosen_lambda=chosen,
        lambda_at_edge=at_edge,
        converged=fit.converged,
        holdout_top1=holdout_top1,
        backend=backend,
        holdout_converged=holdout_converged,
        top5_correct=correct5,
        n_iter=fit.n_iter,
    )
