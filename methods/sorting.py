"""Differentiable sorting networks (diffsort 0.2.0 semantics) with three exact back ends.

A sorting network is a fixed list of layers of disjoint comparators. diffsort relaxes each
comparator (wa, wb) -> (lo, hi) with a weight alpha = f(b - a), a = x[wa], b = x[wb]::

    x'[lo] = alpha * a + (1 - alpha) * b          (soft minimum)
    x'[hi] = (1 - alpha) * a + alpha * b          (soft maximum)

and mixes the columns of a running matrix X (B, n, n), X_0 = I, the same way. After the last layer
``P = X_L`` is a doubly stochastic soft permutation with diffsort's code convention
``sorted ~= x @ P``: ``P[b, r, c]`` is the probability that input element r ends at ascending
rank c. Writing one layer as ``X' = X M_l`` gives ``P = M_1 M_2 ... M_L``.

Three formulations. All compute each alpha and each soft min / max with diffsort's own
operations in diffsort's order, so sorted values and P are bit-identical to diffsort's (up to one
ulp of torch.sigmoid for logistic / logistic_phi, see ``_alpha``); rank mass and gradients agree
to rounding (1e-10 in float64).

``diffsort``
    The package itself: every layer multiplies X by dense 0/1 selection matrices (n x k, k ~ n/2),
    O(n^3) per row and layer, i.e. O(n^4) per row for odd_even and O(n^3 log^2 n) for bitonic, and
    autograd keeps several (B, n, n) tensors per layer.
``columns``
    A comparator touches exactly two columns of X, so a layer gathers those columns and mixes them:
    O(n^2) per row and layer (O(n^3) for odd_even overall). X is kept wire-major so that each wire
    is one contiguous block; the values x ride along as an extra column. Hand-written backward
    (``_ColumnsFn``) keeping one (n, n + 1) state per row and layer, O(n^2 * layers) memory.
``group_sum`` (``rank_mass`` only)
    A loss that needs only ``q = P 1_R`` (mass on a set R of ranks) never needs P:
    ``q = M_1 (M_2 (... (M_L 1_R)))``. One forward pass over x stores every alpha, then the layers
    are applied in reverse to the indicator vector: O(n) per row and layer, O(n * layers) in all.
    All four passes (values, indicator, and the two of the hand-written backward,
    ``_GroupSumFn``) run in place on a wire-major (n, B) state. A layer's comparators are a few
    regular grids of wire pairs (one per odd_even layer, see ``_Segment``), read and written as
    strided views: about 22 elementwise ops on (k, B) tensors per layer and no gather / scatter
    (layers of small or many grids are gathered). Per layer it keeps at most three (k, B)
    tensors (two when they get large: alpha is then recomputed), about 320 MiB at n = 512,
    B = 256.

Networks: ``odd_even`` (n layers of odd-even transposition), ``bitonic`` (K(K+1)/2 layers,
K = ceil(log2 n), first 2^K - n wires virtual exactly as diffsort pads them), both taken from
diffsort's own builders (run against a sparse recorder, see ``_SparseMatrix``; half comparators,
which are exact identities, are dropped), and ``bitonic_merge``, Batcher's merging stage only, for
inputs that are already two ascending runs (see ``soft_sort``).

Inputs in float16/bfloat16, or calls under autocast, are sorted in float32 with autocast disabled.
"""

from __future__ import annotations

import math
import numbers
import types
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch.autograd.function import once_differentiable

__all__ = [
    "DISTRIBUTIONS",
    "NETWORKS",
    "RANK_MASS_BACKENDS",
    "SORT_BACKENDS",
    "network_layers",
    "rank_mass",
    "soft_sort",
]

NETWORKS = ("odd_even", "bitonic", "bitonic_merge")
DISTRIBUTIONS = ("logistic", "logistic_phi", "gaussian", "reciprocal", "cauchy", "optimal")
SORT_BACKENDS = ("columns", "diffsort")
RANK_MASS_BACKENDS = ("group_sum", "columns", "diffsort")

# Above this many bytes per stack, group_sum recomputes alpha (beta) in the backward instead of
# keeping it.
_STORE_ALPHA_BYTES = 64 * 2**20


# --------------------------------------------------------------------------------------------
# Comparator lists from diffsort's builders
# --------------------------------------------------------------------------------------------


class _SparseMatrix:
    """Records the entries diffsort's builders write into their ``np.zeros`` matrices.

    diffsort's ``odd_even_network(n)`` allocates four dense float64 k x n matrices per layer, about
    2 GB for n = 512. Running the builder's own code against this recorder keeps the wiring
    diffsort's while costing a few bytes per comparator (flat arrays, not a dict of tuples).
    """

    __slots__ = ("cols", "rows", "shape", "vals")

    def __init__(self, shape: Sequence[int]):
        self.shape = (int(shape[0]), int(shape[1]))
        self.rows, self.cols, self.vals = array("l"), array("l"), array("d")

    def __setitem__(self, key: tuple[int, int], value: float) -> None:
        i, j = int(key[0]), int(key[1])
        if not (0 <= i < self.shape[0] and 0 <= j < self.shape[1]):
            raise IndexError(f"index {(i, j)} out of range for shape {self.shape}")
        # The builders write each entry once; duplicates are rejected in _matrices_to_layers.
        self.rows.append(i)
        self.cols.append(j)
        self.vals.append(float(value))

    def __getitem__(self, key: tuple[slice, slice]) -> _SparseMatrix:
        rows, cols = key
        if not (isinstance(rows, slice) and isinstance(cols, slice)):
            raise TypeError("only 2-D slicing is recorded")
        r0, r1, rs = rows.indices(self.shape[0])
        c0, c1, cs = cols.indices(self.shape[1])
        if rs != 1 or cs != 1:
            raise TypeError("only unit-step slicing is recorded")
        out = _SparseMatrix((max(r1 - r0, 0), max(c1 - c0, 0)))
        for i, j, v in zip(self.rows, self.cols, self.vals, strict=True):
            if r0 <= i < r1 and c0 <= j < c1:
                out[i - r0, j - c0] = v
        return out


class _SparseNumpy:
    """numpy with ``zeros`` replaced by the recorder; everything else is numpy itself."""

    @staticmethod
    def zeros(shape: Sequence[int], *args: Any, **kwargs: Any) -> _SparseMatrix:
        return _SparseMatrix(shape)

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


def _run_builder_sparse(builder: types.FunctionType, n: int) -> list:
    # Same code object, fresh globals: diffsort's module is not touched.
    scope = dict(builder.__globals__)
    scope["np"] = _SparseNumpy()
    fn = types.FunctionType(
        builder.__code__, scope, builder.__name__, builder.__defaults__, builder.__closure__
    )
    return fn(n)


def _entries(m: Any) -> list[tuple[int, int, float]]:
    if isinstance(m, _SparseMatrix):
        return [(i, j, v) for i, j, v in zip(m.rows, m.cols, m.vals, strict=True) if v != 0]
    arr = np.asarray(m)
    rows, cols = np.nonzero(arr)
    return [(int(i), int(j), float(arr[i, j])) for i, j in zip(rows, cols, strict=True)]


_Layers = list[tuple[list[int], list[int], list[int], list[int]]]


def _matrices_to_layers(matrices: list, n: int) -> _Layers:
    """(split_a, split_b, combine_min, combine_max) per layer -> (wa, wb, lo, hi) index lists.

    Half comparators (both weights 1/2 on one wire) are exact identities in diffsort's arithmetic
    (alpha = 1/2 at a == b for every distribution, and 1/2*(a/2 + a/2) + 1/2*(a/2 + a/2) == a), so
    they are dropped. Every wire must be covered exactly once per layer, otherwise diffsort's
    combine matrices would zero it and the shortcut would not be exact.
    """
    layers: _Layers = []
    for idx, (split_a, split_b, combine_min, combine_max) in enumerate(matrices):
        k = split_a.shape[0]
        src_a: dict[int, int] = {}
        src_b: dict[int, int] = {}
        dst_min: dict[int, list[tuple[int, float]]] = {}
        dst_max: dict[int, list[tuple[int, float]]] = {}
        for j, w, v in _entries(split_a):
            if v != 1.0 or j in src_a:
                raise RuntimeError(f"unexpected diffsort split_a in layer {idx}")
            src_a[j] = w
        for j, w, v in _entries(split_b):
            if v != 1.0 or j in src_b:
                raise RuntimeError(f"unexpected diffsort split_b in layer {idx}")
            src_b[j] = w
        for w, j, v in _entries(combine_min):
            dst_min.setdefault(j, []).append((w, v))
        for w, j, v in _entries(combine_max):
            dst_max.setdefault(j, []).append((w, v))
        wa, wb, lo, hi = [], [], [], []
        covered = [0] * n
        for j in range(k):
            a, b = src_a.get(j), src_b.get(j)
            mins, maxs = dst_min.get(j, []), dst_max.get(j, [])
            if a is None or b is None or len(mins) != 1 or len(maxs) != 1:
                raise RuntimeError(f"unexpected diffsort comparator {j} in layer {idx}")
            (w_lo, c_lo), (w_hi, c_hi) = mins[0], maxs[0]
            if a == b:
                if not (w_lo == w_hi == a and c_lo == c_hi == 0.5):
                    raise RuntimeError(f"unexpected diffsort half comparator {j} in layer {idx}")
                covered[a] += 1
                continue
            if c_lo != 1.0 or c_hi != 1.0 or {w_lo, w_hi} != {a, b}:
                raise RuntimeError(f"unexpected diffsort comparator {j} in layer {idx}")
            wa.append(a)
            wb.append(b)
            lo.append(w_lo)
            hi.append(w_hi)
            covered[a] += 1
            covered[b] += 1
        if any(c != 1 for c in covered):
            raise RuntimeError(f"diffsort layer {idx} does not cover every wire exactly once")
        if wa:
            layers.append((wa, wb, lo, hi))
    return layers


def _bitonic_merge_matrices(n: int) -> list[tuple[np.ndarray, ...]]:
    """Batcher's bitonic merger in diffsort's matrix format, padded the way diffsort pads bitonic.

    Acts on positions of the bitonic arrangement [run 1 ascending | run 2 reversed]; the first
    2^K - n wires are virtual (they would hold -inf), so a comparator touching one of them is an
    identity half comparator on its real wire and one touching two is dropped. K layers of
    ascending half-cleaners with strides 2^(K-1), ..., 1.
    """
    num_blocks = math.ceil(math.log2(n))
    size = 2**num_blocks
    pad = size - n
    network = []
    for layer_idx in range(num_blocks):
        m = size // 2 ** (layer_idx + 1)
        split_a, split_b = np.zeros((size // 2, n)), np.zeros((size // 2, n))
        combine_min, combine_max = np.zeros((n, size // 2)), np.zeros((n, size // 2))
        count = 0
        for i in range(0, size, 2 * m):
            for j in range(m):
                a, b = i + j - pad, i + j + m - pad
                if a >= 0:
                    split_a[count, a], split_b[count, b] = 1, 1
                    combine_min[a, count], combine_max[b, count] = 1, 1
                elif b >= 0:
                    split_a[count, b], split_b[count, b] = 1, 1
                    combine_min[b, count], combine_max[b, count] = 0.5, 0.5
                else:
                    continue
                count += 1
        network.append(
            (split_a[:count], split_b[:count], combine_min[:, :count], combine_max[:, :count])
        )
    return network


@lru_cache(maxsize=64)
def _layers(network: str, n: int) -> _Layers:
    import diffsort.networks as dn

    if network == "odd_even":
        return _matrices_to_layers(_run_builder_sparse(dn.odd_even_network, n), n)
    if network == "bitonic":
        return _matrices_to_layers(_run_builder_sparse(dn.bitonic_network, n), n)
    if network == "bitonic_merge":
        return _matrices_to_layers(_bitonic_merge_matrices(n), n)
    raise ValueError(f"unknown network {network!r}; valid choices: {', '.join(NETWORKS)}")


def network_layers(network: str, n: int) -> list[tuple[list[int], list[int], list[int], list[int]]]:
    """Comparator layers ``(wa, wb, lo, hi)`` (half comparators dropped) used by the own back ends.

    ``odd_even`` and ``bitonic`` come from diffsort's builders; ``bitonic_merge`` is given on the
    positions of the bitonic arrangement [run 1 | reversed run 2] (no split applied).
    """
    _check_choice("network", network, NETWORKS)
    _check_n(n)
    return [tuple(list(v) for v in layer) for layer in _layers(network, n)]


def _merge_perm(n: int, split: int) -> list[int]:
    # Position p of the bitonic arrangement holds input element perm[p]; an involution.
    return list(range(split)) + list(range(n - 1, split - 1, -1))


# --------------------------------------------------------------------------------------------
# Device plans (index tensors, cached per network, n, split and device)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layer:
    k: int
    col_ab3: torch.Tensor  # [wa, wb, wa] as positions in the columns back end's running layout
    col_idle: torch.Tensor | None  # positions of wires this layer leaves alone


@dataclass(frozen=True)
class _Plan:
    n: int
    layers: tuple[_Layer, ...]
    col_out: torch.Tensor  # col_out[c]: row holding rank c in the columns layout at the end


@lru_cache(maxsize=64)
def _plan(network: str, n: int, split: int | None, device: torch.device) -> _Plan:
    layers = _layers(network, n)
    if network == "bitonic_merge":
        # Relabel merge positions to input elements so the reversal of run 2 costs nothing.
        perm = _merge_perm(n, split)
        layers = [tuple([perm[w] for w in ws] for ws in layer) for layer in layers]
        final_slot = perm
    else:
        final_slot = list(range(n))

    def idx(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    pos = list(range(n))  # pos[wire] = row in the columns layout
    planned = []
    for wa, wb, lo, hi in layers:
        busy = set(wa) | set(wb)
        idle = [w for w in range(n) if w not in busy]
        col_ab3 = [pos[w] for w in wa + wb + wa]
        col_idle = [pos[w] for w in idle]
        for row, w in enumerate(lo + hi + idle):
            pos[w] = row
        planned.append(
            _Layer(
                k=len(wa),
                col_ab3=idx(col_ab3),
                col_idle=idx(col_idle) if idle else None,
            )
        )
    return _Plan(n=n, layers=tuple(planned), col_out=idx([pos[w] for w in final_slot]))


# group_sum walks the layers in place on a wire-major state S (n, B). The comparators of a layer
# are split into segments, each a regular grid whose two rows per comparator form one strided
# view of S, so a layer costs a few elementwise ops and no gather / scatter. odd_even layers are
# one segment each (pairs (i, i + 1), i = p, p + 2, ...); bitonic layers two or three (ascending
# and descending comparators, plus the pieces the padding cuts off); bitonic_merge, run on the
# positions of the bitonic arrangement, one or two. Every segment costs its own ops, so a layer
# whose segments are small (few comparators times B, where per-op overhead beats memory traffic)
# or too many is gathered into one buffer and scattered back instead.
_MAX_VIEW_SEGMENTS = 4
# Views win once a segment has about this many entries (comparators x B), measured on a 2-core
# CPU with one thread: bitonic n = 32, B = 2048 (~20k per segment) is 5% faster with views,
# n = 21 (~10k) 11% slower; with two threads the crossover is a little higher (n = 51, ~23k: 9%
# slower, n = 128, ~37k: 20% faster).
_VIEW_MIN_ENTRIES = 16384


@dataclass(frozen=True)
class _Segment:
    """Comparators ``start:stop`` of a layer (their slice of the per-comparator (k, B) tensors).

    View segment (``rows_ab is None``): comparator j of the grid ``shape`` (row-major) has its
    lower wire at row ``offset + sum_i j_i strides[i]`` of S and its upper wire ``pair`` rows
    further, so ``S.as_strided((2, *shape, B), ...)`` is the (2, *shape, B) pair view [lower,
    upper]. ``lo`` is the pair index of diffsort's lo wire, ``sigma`` +1 when wa is the lo wire
    (wb the hi one) and -1 when the comparator is reversed (wa is the hi wire).

    Gather segment: passes that read the wa / wb wires gather rows ``rows_ab`` = [wa; wb] into a
    contiguous (2, k, B) buffer and scatter the result to ``rows_lohi`` = [lo; hi], the other
    passes the other way round; in buffer coordinates that is ``lo = 0, sigma = +1``.
    """

    start: int
    stop: int
    shape: tuple[int, ...]
    offset: int
    pair: int
    strides: tuple[int, ...]
    lo: int
    sigma: float
    whole: bool  # the only segment of its layer, with a 1-D grid: its slices are the full tensors
    rows_ab: torch.Tensor | None = None
    rows_lohi: torch.Tensor | None = None
    key: tuple = field(init=False)  # geometry of the pair view

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", (self.offset, self.pair, self.shape, self.strides))


@dataclass(frozen=True)
class _GSLayer:
    k: int
    segments: tuple[_Segment, ...]
    sigma: float  # the segments' common sigma, 0.0 if they differ


@dataclass(frozen=True)
class _GSPlan:
    n: int
    views: tuple[_GSLayer | None, ...]  # segments as strided views (None: too many segments)
    gathers: tuple[_GSLayer, ...]  # each layer as one gather segment
    # Several view segments per layer only on CPU. Elsewhere kernel launches dominate: a layer
    # costs about 12 launches per view segment + 10 (over the four passes), gathered about 30.
    multi_views: bool

    def layers(self, bsz: int) -> tuple[_GSLayer, ...]:
        """Per layer the cheaper form for B = bsz (see ``_VIEW_MIN_ENTRIES``)."""

        def use_views(view: _GSLayer | None) -> bool:
            if view is None:
                return False
            if len(view.segments) == 1:
                return True
            return self.multi_views and view.k * bsz >= _VIEW_MIN_ENTRIES * len(view.segments)

        return tuple(
            view if use_views(view) else gather
            for view, gather in zip(self.views, self.gathers, strict=True)
        )


def _grids(starts: list[int]) -> list[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """Split sorted row numbers into few regular grids ``(offset, shape, strides)``, <= 3-D.

    Runs with the smallest step, runs of equal length at a constant distance, and groups of
    those at a constant distance: exactly the shapes of odd_even, bitonic (with its padding cut)
    and bitonic_merge layers.
    """
    if len(starts) == 1:
        return [(starts[0], (1,), (1,))]
    step = min(b - a for a, b in zip(starts, starts[1:], strict=False))
    runs: list[list[int]] = []
    for s in starts:
        if runs and s - runs[-1][-1] == step:
            runs[-1].append(s)
        else:
            runs.append([s])

    def group(items: list[tuple[int, Any]]) -> list[tuple[int, int, int, Any]]:
        # (first, count, stride, inner) for consecutive items with equal inner at equal distance
        out: list[tuple[int, int, int, Any]] = []
        for first, inner in items:
            if out:
                f0, cnt, stride, inn = out[-1]
                last = f0 + (cnt - 1) * stride
                if inn == inner and (cnt == 1 or first - last == stride):
                    out[-1] = (f0, cnt + 1, first - f0 if cnt == 1 else stride, inn)
                    continue
            out.append((first, 1, 0, inner))
        return out

    level2 = group([(r[0], len(r)) for r in runs])
    level3 = group([(f, (cnt, stride, length)) for f, cnt, stride, length in level2])
    grids = []
    for first, n3, s3, (n2, s2, n1) in level3:
        dims = [(size, stride) for size, stride in ((n3, s3), (n2, s2), (n1, step)) if size > 1]
        dims = dims or [(1, 1)]
        grids.append((first, tuple(s for s, _ in dims), tuple(t for _, t in dims)))
    return grids


@lru_cache(maxsize=64)
def _gs_plan(network: str, n: int, device: torch.device) -> _GSPlan:
    # bitonic_merge stays on the positions of the bitonic arrangement (rank_mass permutes x and
    # q once) where its layers are regular; relabelled to input elements they are not.

    def idx(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    views: list[_GSLayer | None] = []
    gathers: list[_GSLayer] = []
    for wa, wb, lo, hi in _layers(network, n):
        k = len(wa)
        gathered = _Segment(0, k, (k,), 0, 0, (), 0, 1.0, True, idx(wa + wb), idx(lo + hi))
        gathers.append(_GSLayer(k=k, segments=(gathered,), sigma=1.0))
        groups: dict[tuple[int, int, float], list[int]] = {}
        for a, b, low in zip(wa, wb, lo, strict=True):
            lower, upper = min(a, b), max(a, b)
            key = (upper - lower, 0 if low == lower else 1, 1.0 if low == a else -1.0)
            groups.setdefault(key, []).append(lower)
        found = [(key, grid) for key, rows in groups.items() for grid in _grids(sorted(rows))]
        if len(found) > _MAX_VIEW_SEGMENTS:
            views.append(None)
            continue
        segments = []
        start = 0
        for (pair, low, sigma), (offset, shape, strides) in found:
            stop = start + math.prod(shape)
            whole = len(found) == 1 and len(shape) == 1
            segments.append(_Segment(start, stop, shape, offset, pair, strides, low, sigma, whole))
            start = stop
        sigmas = {seg.sigma for seg in segments}
        common = sigmas.pop() if len(sigmas) == 1 else 0.0
        views.append(_GSLayer(k=k, segments=tuple(segments), sigma=common))
    return _GSPlan(
        n=n, views=tuple(views), gathers=tuple(gathers), multi_views=device.type == "cpu"
    )


@lru_cache(maxsize=64)
def _merge_perm_tensor(n: int, split: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(_merge_perm(n, split), dtype=torch.long, device=device)


# --------------------------------------------------------------------------------------------
# Relaxations: exactly diffsort's expressions, d = b - a
# --------------------------------------------------------------------------------------------


class _NormalCDF(torch.autograd.Function):
    """diffsort's ``NormalCDF``, including its backward's sigma rounded through ``torch.tensor``.

    diffsort saves ``torch.tensor(sigma)`` (default dtype, float32) for the backward, so for
    float64 inputs and a sigma that is not exact in float32 its gradient uses the rounded sigma.
    """

    @staticmethod
    def forward(ctx: Any, v: torch.Tensor, sigma: float) -> torch.Tensor:
        ctx.save_for_backward(v)
        ctx.sigma_bwd = float(torch.tensor(sigma))
        return 0.5 + 0.5 * torch.erf(v / sigma / math.sqrt(2))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (v,) = ctx.saved_tensors
        s = ctx.sigma_bwd
        return grad * 1 / s / math.sqrt(math.pi * 2) * torch.exp(-0.5 * (v / s).pow(2)), None


def _alpha(d: torch.Tensor, distribution: str, steepness: float, art_lambda: float) -> torch.Tensor:
    """alpha = f(d), d = b - a, with v = steepness * d:

    logistic      sigma(v)
    logistic_phi  sigma(v / (|d| + 1e-10)^art_lambda)
    gaussian      Phi(v) = 1/2 + 1/2 erf(d / (1/steepness) / sqrt 2)
    reciprocal    1/2 (v / (2 + |v|) + 1)
    cauchy        arctan(v) / pi + 1/2
    optimal       clamp(v, -1/4, 1/4) + 1/2 + sign_{|v|>1/4}(v) (1/4 - 1/16 / (|v| + 1e-10))

    Written operation for operation as diffsort 0.2.0 does, so alpha is bit-identical, except
    that torch.sigmoid's SIMD body and scalar tail can differ by one ulp and diffsort's (B, k)
    layout (half comparators included) decides which element takes which path: logistic and
    logistic_phi agree with diffsort to rounding, not bit for bit.
    """
    if distribution == "logistic":
        return torch.sigmoid(d * steepness)
    if distribution == "logistic_phi":
        return torch.sigmoid(d * steepness / (d.abs() + 1.0e-10).pow(art_lambda))
    if distribution == "gaussian":
        return _NormalCDF.apply(d, 1 / steepness)
    v = steepness * d
    if distribution == "reciprocal":
        return 0.5 * (v / (2 + v.abs()) + 1)
    if distribution == "cauchy":
        return 1 / math.pi * torch.atan(v) + 0.5
    if distribution == "optimal":
        return (
            torch.clamp(v, -0.25, 0.25)
            + 0.5
            + ((v > 0.25).float() - (v < -0.25).float()) * (0.25 - 1 / 16 / (v.abs() + 1e-10))
        )
    raise ValueError(
        f"unknown distribution {distribution!r}; valid choices: {', '.join(DISTRIBUTIONS)}"
    )


def _alpha_grad(
    d: torch.Tensor, alpha: torch.Tensor, distribution: str, steepness: float, art_lambda: float
) -> torch.Tensor:
    """d alpha / d d, matching what autograd computes through ``_alpha`` (incl. |0|' = 0).

    logistic      b s(1 - s)                      with s = alpha
    logistic_phi  s(1 - s) b / p (1 - lambda |d| / t),  t = |d| + 1e-10, p = t^lambda
    gaussian      exp(-d^2 / (2 sigma^2)) / (sigma sqrt(2 pi)),  sigma = float32(1 / b)
    reciprocal    b / (2 + |v|)^2
    cauchy        b / (pi (1 + v^2))
    optimal       b if |v| <= 1/4 else b / (16 (|v| + 1e-10)^2)
    """
    b = steepness
    if distribution == "logistic":
        return alpha * (1 - alpha) * b
    if distribution == "logistic_phi":
        t = d.abs() + 1.0e-10
        p = t.pow(art_lambda)
        return alpha * (1 - alpha) * (b / p) * (1 - art_lambda * d.abs() / t)
    if distribution == "gaussian":
        s = float(torch.tensor(1 / b))
        return torch.exp(-0.5 * (d / s).pow(2)) * (1 / s / math.sqrt(math.pi * 2))
    v = b * d
    if distribution == "reciprocal":
        return b / (2 + v.abs()).pow(2)
    if distribution == "cauchy":
        return (b / math.pi) / (1 + v * v)
    if distribution == "optimal":
        inside = (v >= -0.25) & (v <= 0.25)
        return torch.where(inside, b, (b / 16) / (v.abs() + 1e-10).pow(2))
    raise ValueError(
        f"unknown distribution {distribution!r}; valid choices: {', '.join(DISTRIBUTIONS)}"
    )


# --------------------------------------------------------------------------------------------
# Back ends
# --------------------------------------------------------------------------------------------


class _ColumnsFn(torch.autograd.Function):
    """Column mixing on S (wires, B, n + 1), S[w, b, :n] = X[b, :, w], S[w, b, n] = x[b, w].

    Forward: per layer gather the rows [A, B, A] (A = wa rows, B = wb rows), compute alpha from
    the value entries, write ``alpha A + (1 - alpha) B`` (lo) and ``alpha B + (1 - alpha) A`` (hi)
    exactly as diffsort does, and lay the new state out as [lo rows | hi rows | idle rows]
    (``plan.col_*`` track where each wire sits). Returns the final S in that layout.

    Backward (hand-written: autograd would zero-fill a full-size gradient for every gather and
    overlapping slice): with G the gradient of S_l and Gd = G_lo - G_hi,
    dL/dalpha = sum_e Gd (A - B) over the n + 1 entries of each row, dL/dd = dL/dalpha f'(d),
    and the gradient of S_{l-1} is G_hi + alpha Gd on the wa rows and G_lo - alpha Gd on the wb
    rows (value entries -dL/dd and +dL/dd), G_idle on the idle rows.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        plan: _Plan,
        distribution: str,
        steepness: float,
        art_lambda: float,
        keep: bool,
    ) -> torch.Tensor:
        bsz, n = x.shape
        width = n + 1
        eye = torch.eye(n, dtype=x.dtype, device=x.device).unsqueeze(1).expand(n, bsz, n)
        state = torch.cat([eye, x.t().unsqueeze(-1)], dim=2)
        states, alphas, ds = [], [], []
        for layer in plan.layers:
            k = layer.k
            g = state.index_select(0, layer.col_ab3)  # [A, B, A]
            d = g[k : 2 * k, :, n] - g[:k, :, n]
            alpha = _alpha(d, distribution, steepness, art_lambda)
            one_minus = 1 - alpha
            # rows 0..k-1: alpha*A + (1-alpha)*B (min); rows k..2k-1: alpha*B + (1-alpha)*A (max)
            mixed = alpha.unsqueeze(-1) * g[: 2 * k].view(2, k, bsz, width)
            mixed += one_minus.unsqueeze(-1) * g[k:].view(2, k, bsz, width)
            mixed = mixed.view(2 * k, bsz, width)
            if layer.col_idle is not None:
                mixed = torch.cat([mixed, state.index_select(0, layer.col_idle)], dim=0)
            if keep:
                states.append(state)
                alphas.append(alpha)
                ds.append(d)
            state = mixed
        if keep:
            ctx.plan = plan
            ctx.params = (distribution, steepness, art_lambda)
            ctx.states, ctx.alphas, ctx.ds = states, alphas, ds
        return state

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_state: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        plan: _Plan = ctx.plan
        states, alphas, ds = ctx.states, ctx.alphas, ctx.ds
        if states is None:
            raise RuntimeError("the columns back end supports one backward pass only")
        ctx.states = None
        distribution, steepness, art_lambda = ctx.params
        g = grad_state.contiguous()
        _, bsz, width = g.shape
        sign = torch.tensor([1.0, -1.0], dtype=g.dtype, device=g.device).view(2, 1, 1, 1)
        for i in range(len(plan.layers) - 1, -1, -1):
            layer, prev, alpha, d = plan.layers[i], states[i], alphas[i], ds[i]
            k = layer.k
            ab = prev.index_select(0, layer.col_ab3[: 2 * k])  # [A, B]
            gdiff = g[:k] - g[k : 2 * k]
            grad_alpha = (gdiff * (ab[:k] - ab[k:])).sum(-1)
            grad_d = grad_alpha.mul_(_alpha_grad(d, alpha, distribution, steepness, art_lambda))
            out = g[: 2 * k].view(2, k, bsz, width).flip(0)  # [G_hi, G_lo], a copy
            out.addcmul_(sign, alpha.unsqueeze(-1) * gdiff)
            out[0, :, :, width - 1].sub_(grad_d)
            out[1, :, :, width - 1].add_(grad_d)
            g_prev = torch.empty_like(prev)
            g_prev.index_copy_(0, layer.col_ab3[: 2 * k], out.view(2 * k, bsz, width))
            if layer.col_idle is not None:
                g_prev.index_copy_(0, layer.col_idle, g[2 * k :])
            g = g_prev
            states[i] = alphas[i] = ds[i] = None  # free as we go
        return g[:, :, width - 1].t(), None, None, None, None, None


@dataclass(frozen=True)
class _Consts:
    """0-dim tensors on the state's device and dtype.

    A Python scalar in an elementwise op is turned into a tensor on every call (one more
    dispatch and copy each); these are made once. Same values as the scalars after that
    conversion, so the same bits.
    """

    one: torch.Tensor
    half: torch.Tensor
    inv_pi: torch.Tensor
    steepness: torch.Tensor
    pi_over_b: torch.Tensor
    signs: dict[tuple[int, int], torch.Tensor]  # (lo, grid dims) -> s, s[lo] = -1, s[1 - lo] = 1


@lru_cache(maxsize=64)
def _consts(dtype: torch.dtype, device: torch.device, steepness: float) -> _Consts:
    def scalar(value: float) -> torch.Tensor:
        return torch.tensor(value, dtype=dtype, device=device)

    signs = {}
    for lo in (0, 1):
        s = torch.tensor([-1.0, 1.0] if lo == 0 else [1.0, -1.0], dtype=dtype, device=device)
        for dims in (1, 2, 3):
            signs[lo, dims] = s.view(2, *([1] * (dims + 1)))  # (2, 1, ..., 1) for (2, *grid, B)
    return _Consts(
        one=scalar(1.0),
        half=scalar(0.5),
        inv_pi=scalar(1 / math.pi),
        steepness=scalar(steepness),
        pi_over_b=scalar(math.pi / steepness),
        signs=signs,
    )


def _pair(
    state: torch.Tensor, seg: _Segment, rows: torch.Tensor | None, cache: dict
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pair, lower, upper) of ``seg`` in ``state``: strided views (cached per pass and
    geometry, odd_even has two), or for a gather segment a gathered copy."""
    bsz = state.shape[1]
    if rows is not None:
        pv = state.index_select(0, rows).view(2, *seg.shape, bsz)
        return pv, pv[0], pv[1]
    hit = cache.get(seg.key)
    if hit is None:
        pv = state.as_strided(
            (2, *seg.shape, bsz),
            (seg.pair * bsz, *(s * bsz for s in seg.strides), 1),
            state.storage_offset() + seg.offset * bsz,
        )
        lower, upper = pv.unbind(0)
        hit = cache[seg.key] = (pv, lower, upper)
    return hit


class _Cuts(dict):
    """``cut(buf, k)``: the first k rows of a scratch buffer, made once per buffer and k (per-op
    overhead is a good part of the cost at small n, and a slice is one more dispatch)."""

    def cut(self, buf: torch.Tensor, k: int) -> torch.Tensor:
        if k == buf.shape[-2]:
            return buf
        key = (id(buf), k)
        hit = self.get(key)
        if hit is None:
            hit = self[key] = buf[..., :k, :]
        return hit


def _part(t: torch.Tensor, seg: _Segment) -> torch.Tensor:
    """``seg``'s slice of a per-comparator tensor (k, B) (or (c, k, B)), shaped like its grid."""
    if seg.whole:
        return t
    if t.dim() == 2:
        return t[seg.start : seg.stop].view(*seg.shape, t.shape[-1])
    return t[:, seg.start : seg.stop].view(t.shape[0], *seg.shape, t.shape[-1])


def _alpha_into(
    d: torch.Tensor,
    out: torch.Tensor,
    consts: _Consts,
    distribution: str,
    steepness: float,
    art_lambda: float,
) -> torch.Tensor:
    """alpha = f(d) into ``out``, bit for bit as ``_alpha`` (same operations, same order)."""
    if distribution != "cauchy":
        return out.copy_(_alpha(d, distribution, steepness, art_lambda))
    # 1 / pi * atan(steepness * d) + 0.5; the multiply is skipped at steepness 1, where it is
    # exact.
    if steepness == 1.0:
        torch.atan(d, out=out)
    else:
        torch.mul(d, consts.steepness, out=out).atan_()
    return out.mul_(consts.inv_pi).add_(consts.half)


def _beta_into(
    d: torch.Tensor,
    layer: _GSLayer,
    beta: torch.Tensor,
    spare: torch.Tensor,
    consts: _Consts,
    params: tuple[str, float, float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, 1 - alpha) of a layer, one of them written into ``beta`` (see ``_GroupSumFn``):
    1 - alpha for sigma = +1, alpha for sigma = -1, per segment when the layer mixes both.
    ``spare`` (k, B) takes the other; a mixed layer needs ``beta`` filled by the caller."""
    if layer.sigma > 0:
        alpha, omega = spare, beta
    elif layer.sigma < 0:
        alpha, omega = beta, spare
    else:
        alpha, omega = spare, torch.empty_like(spare)
    _alpha_into(d, alpha, consts, *params)
    torch.sub(consts.one, alpha, out=omega)
    if layer.sigma == 0:
        for seg in layer.segments:
            _part(beta, seg).copy_(_part(omega if seg.sigma > 0 else alpha, seg))
    return alpha, omega


def _grad_d_(
    grad: torch.Tensor,
    d: torch.Tensor,
    beta: torch.Tensor,
    scratch: torch.Tensor,
    consts: _Consts,
    params: tuple[str, float, float],
) -> torch.Tensor:
    """grad * f'(d), in place. f' is even in d and symmetric under alpha <-> 1 - alpha, so beta
    (alpha or 1 - alpha) stands in for alpha."""
    distribution, steepness, art_lambda = params
    if distribution == "cauchy":
        # f' = (b / pi) / (1 + b^2 d^2): 1 / f' in one addcmul, then one division.
        inv = torch.addcmul(consts.pi_over_b, d, d, value=math.pi * steepness, out=scratch)
        return grad.div_(inv)
    return grad.mul_(_alpha_grad(d, beta, distribution, steepness, art_lambda))


def _value_pass(
    state: torch.Tensor,
    layers: tuple[_GSLayer, ...],
    consts: _Consts,
    params: tuple[str, float, float],
    keep: bool,
) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """Runs the values ``state`` (n, B) through the network in place; returns per layer d
    (``keep`` only) and beta (see ``_GroupSumFn``). Bit for bit diffsort's soft min / max."""
    bsz = state.shape[1]
    dtype, device = state.dtype, state.device
    kmax = max(layer.k for layer in layers)

    def scratch(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, kmax, bsz, dtype=dtype, device=device)

    spare, prod, d_buf = scratch(), scratch(4), None if keep else scratch()
    cuts = _Cuts()
    ds: list[torch.Tensor | None] = []
    betas: list[torch.Tensor | None] = []
    views: dict = {}
    mixing: dict = {}
    for layer in layers:
        k = layer.k
        d = torch.empty(k, bsz, dtype=dtype, device=device) if d_buf is None else cuts.cut(d_buf, k)
        pairs = [_pair(state, seg, seg.rows_ab, views) for seg in layer.segments]
        for seg, (_, lower, upper) in zip(layer.segments, pairs, strict=True):
            a, b = (lower, upper) if (seg.lo == 0) == (seg.sigma > 0) else (upper, lower)
            torch.sub(b, a, out=_part(d, seg))
        beta = torch.empty(k, bsz, dtype=dtype, device=device)
        alpha, omega = _beta_into(d, layer, beta, cuts.cut(spare, k), consts, params)
        for seg, (pv, lower, upper) in zip(layer.segments, pairs, strict=True):
            ia = seg.lo if seg.sigma > 0 else 1 - seg.lo  # pair index of a = x[wa]
            key = (k, seg.start, seg.key, ia)
            hit = mixing.get(key)
            if hit is None:
                p = _part(cuts.cut(prod, k), seg)
                # [alpha lower, alpha upper], [(1 - alpha) lower, (1 - alpha) upper], and the
                # terms of lo = alpha a + (1 - alpha) b and hi = (1 - alpha) a + alpha b
                hit = mixing[key] = (p[0:2], p[2:4], p[ia], p[3 - ia], p[2 + ia], p[1 - ia])
            p_alpha, p_omega, lo_a, lo_b, hi_a, hi_b = hit
            torch.mul(pv, _part(alpha, seg), out=p_alpha)
            torch.mul(pv, _part(omega, seg), out=p_omega)
            out_lo, out_hi = (lower, upper) if seg.lo == 0 else (upper, lower)
            torch.add(lo_a, lo_b, out=out_lo)
            torch.add(hi_a, hi_b, out=out_hi)
            if seg.rows_lohi is not None:
                state.index_copy_(0, seg.rows_lohi, pv.view(2 * (seg.stop - seg.start), bsz))
        betas.append(beta)
        ds.append(d if keep else None)
    return ds, betas


class _GroupSumFn(torch.autograd.Function):
    """q = M_1 (M_2 (... (M_L v))), hand-written backward; x (B, n) in, q (B, n) out.

    Every pass works in place on a wire-major state (n, B) (for bitonic_merge on the positions
    of the bitonic arrangement: ``perm``), a layer at a time, through the pair views of the
    layer's segments (see ``_Segment``): [lower wire, upper wire] of each comparator, ``lo`` the
    index of diffsort's lo wire. Per layer, with alpha = f(d), d = x[wb] - x[wa]:

    value pass   d = b - a (a = x[wa], b = x[wb]); with [alpha a, alpha b] and [(1 - alpha) a,
                 (1 - alpha) b] (two multiplies of the pair), pair[lo] = alpha a + (1 - alpha) b
                 and pair[hi] = (1 - alpha) a + alpha b (two adds): diffsort's operations in
                 diffsort's order.
    reverse pass from the rank indicator v_L: v_{l-1}[wa] = alpha v_l[lo] + (1 - alpha) v_l[hi],
                 v_{l-1}[wb] = (1 - alpha) v_l[lo] + alpha v_l[hi], keeping vdiff_l = v_l[lo] -
                 v_l[hi]: pair[lo] -= beta vdiff, pair[hi] += beta vdiff, where beta = 1 - alpha
                 for sigma = +1 (wa is lo) and alpha for sigma = -1.
    backward 1   w_0 = g, w_l = M_l^T w_{l-1}: with e = w[lo row] - w[hi row] = sigma (w[wa] -
                 w[wb]), the direct term is sigma dL/dalpha_l = vdiff_l e, and w is updated like
                 v with e.
    backward 2   the value chain in reverse: with gdiff = gx[lo] - gx[hi], sigma dL/dalpha =
                 direct - sigma gdiff d and u = sigma dL/dd + beta gdiff: pair[lo] -= u,
                 pair[hi] += u (the comparator's transpose, plus -/+ dL/dd on wa / wb).

    Only the value pass must reproduce diffsort's rounding; the other passes use the cheaper
    in-place form y -/+ beta (difference), one multiply per comparator, with the difference they
    keep anyway. Per layer the module keeps d, vdiff (which becomes the direct term) and, while
    they are small, beta (recomputed from d otherwise): three (k, B) tensors. Everything else
    lives in a few (k, B) scratch buffers: the passes are bound by memory traffic, and fresh
    temporaries cost cache misses on every layer.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        v0: torch.Tensor,
        plan: _GSPlan,
        perm: torch.Tensor | None,
        distribution: str,
        steepness: float,
        art_lambda: float,
        keep: bool,
    ) -> torch.Tensor:
        bsz, n = x.shape
        dtype, device = x.dtype, x.device
        consts = _consts(dtype, device, steepness)
        params = (distribution, steepness, art_lambda)
        layers = plan.layers(bsz)
        # A fresh wire-major copy, updated in place (x.t().contiguous() could alias x).
        if perm is not None:
            state = x.t().index_select(0, perm)
        else:
            state = x.t().clone(memory_format=torch.contiguous_format)
        ds, betas = _value_pass(state, layers, consts, params, keep)
        del state
        total = sum(layer.k for layer in layers) * bsz * x.element_size()
        store_beta = keep and total <= _STORE_ALPHA_BYTES
        kmax = max(layer.k for layer in layers)
        cuts = _Cuts()
        v = v0.unsqueeze(1).expand(n, bsz).contiguous()
        vdiffs: list[torch.Tensor | None] = [None] * len(layers)
        u_buf = torch.empty(kmax, bsz, dtype=dtype, device=device)
        views: dict = {}
        for i in range(len(layers) - 1, -1, -1):
            layer = layers[i]
            k = layer.k
            vdiff = torch.empty(k, bsz, dtype=dtype, device=device)
            pairs = [_pair(v, seg, seg.rows_lohi, views) for seg in layer.segments]
            for seg, (_, lower, upper) in zip(layer.segments, pairs, strict=True):
                v_lo, v_hi = (lower, upper) if seg.lo == 0 else (upper, lower)
                torch.sub(v_lo, v_hi, out=_part(vdiff, seg))
            u = torch.mul(betas[i], vdiff, out=cuts.cut(u_buf, k))
            for seg, (pv, _, _) in zip(layer.segments, pairs, strict=True):
                pv.addcmul_(consts.signs[seg.lo, len(seg.shape)], _part(u, seg))
                if seg.rows_ab is not None:
                    v.index_copy_(0, seg.rows_ab, pv.view(2 * (seg.stop - seg.start), bsz))
            if keep:
                vdiffs[i] = vdiff
            if not store_beta:
                betas[i] = None
        if keep:
            ctx.layers, ctx.perm, ctx.params = layers, perm, params
            ctx.ds, ctx.betas, ctx.vdiffs = ds, betas, vdiffs
        return v.t().index_select(1, perm) if perm is not None else v.t().contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_q: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        layers: tuple[_GSLayer, ...] = ctx.layers
        perm: torch.Tensor | None = ctx.perm
        ds, betas, direct = ctx.ds, ctx.betas, ctx.vdiffs
        if direct is None:
            raise RuntimeError("rank_mass(backend='group_sum') supports one backward pass only")
        ctx.vdiffs = None
        params = ctx.params
        bsz, n = grad_q.shape
        dtype, device = grad_q.dtype, grad_q.device
        consts = _consts(dtype, device, params[1])
        num = len(layers)
        kmax = max(layer.k for layer in layers)
        diff_buf, aux_buf, beta_buf = (
            torch.empty(kmax, bsz, dtype=dtype, device=device) for _ in range(3)
        )
        cuts = _Cuts()

        def beta_of(i: int) -> torch.Tensor:
            if betas[i] is not None:
                return betas[i]
            k = layers[i].k
            beta = cuts.cut(beta_buf, k)
            _beta_into(ds[i], layers[i], beta, cuts.cut(aux_buf, k), consts, params)
            return beta

        if perm is not None:
            w = grad_q.t().index_select(0, perm)
        else:
            w = grad_q.t().clone(memory_format=torch.contiguous_format)
        views: dict = {}
        for i, layer in enumerate(layers):
            e = cuts.cut(diff_buf, layer.k)
            pairs = [_pair(w, seg, seg.rows_ab, views) for seg in layer.segments]
            for seg, (_, lower, upper) in zip(layer.segments, pairs, strict=True):
                w_lo, w_hi = (lower, upper) if seg.lo == 0 else (upper, lower)
                torch.sub(w_lo, w_hi, out=_part(e, seg))
            direct[i].mul_(e)  # vdiff becomes sigma * dL/dalpha (direct part)
            if i + 1 < num:
                e.mul_(beta_of(i))
                for seg, (pv, _, _) in zip(layer.segments, pairs, strict=True):
                    pv.addcmul_(consts.signs[seg.lo, len(seg.shape)], _part(e, seg))
                    if seg.rows_lohi is not None:
                        w.index_copy_(0, seg.rows_lohi, pv.view(2 * (seg.stop - seg.start), bsz))
        del w
        gx = torch.zeros(n, bsz, dtype=dtype, device=device)
        views = {}
        for i in range(num - 1, -1, -1):
            layer, d, beta = layers[i], ds[i], beta_of(i)
            k = layer.k
            grad = direct[i]
            pairs = [_pair(gx, seg, seg.rows_lohi, views) for seg in layer.segments]
            if i == num - 1:  # gx is still zero, so is gdiff
                u = _grad_d_(grad, d, beta, cuts.cut(aux_buf, k), consts, params)
            else:
                gdiff = cuts.cut(diff_buf, k)
                for seg, (_, lower, upper) in zip(layer.segments, pairs, strict=True):
                    g_lo, g_hi = (lower, upper) if seg.lo == 0 else (upper, lower)
                    torch.sub(g_lo, g_hi, out=_part(gdiff, seg))
                    if layer.sigma == 0:
                        _part(grad, seg).addcmul_(
                            _part(gdiff, seg), _part(d, seg), value=-seg.sigma
                        )
                if layer.sigma != 0:
                    grad.addcmul_(gdiff, d, value=-layer.sigma)
                u = _grad_d_(grad, d, beta, cuts.cut(aux_buf, k), consts, params)
                u.addcmul_(beta, gdiff)
            for seg, (pv, _, _) in zip(layer.segments, pairs, strict=True):
                pv.addcmul_(consts.signs[seg.lo, len(seg.shape)], _part(u, seg))
                if seg.rows_ab is not None:
                    gx.index_copy_(0, seg.rows_ab, pv.view(2 * (seg.stop - seg.start), bsz))
            direct[i] = betas[i] = ds[i] = None  # free as we go
        grad_x = gx.t().index_select(1, perm) if perm is not None else gx.t()
        return grad_x, None, None, None, None, None, None, None


@lru_cache(maxsize=64)
def _diffsort_net(
    network: str,
    n: int,
    device: torch.device,
    steepness: float,
    art_lambda: float,
    distribution: str,
) -> Any:
    from diffsort import DiffSortNet

    return DiffSortNet(
        network,
        n,
        device=device,
        steepness=steepness,
        art_lambda=art_lambda,
        distribution=distribution,
    )


@lru_cache(maxsize=16)
def _diffsort_merge_matrices(n: int, device: torch.device) -> list[list[torch.Tensor]]:
    # Same conversion as diffsort.networks.get_sorting_network.
    return [
        [torch.from_numpy(m).float().to(device) for m in layer]
        for layer in _bitonic_merge_matrices(n)
    ]


def _diffsort_sort(
    x: torch.Tensor,
    network: str,
    distribution: str,
    steepness: float,
    art_lambda: float,
    split: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[1]
    if network != "bitonic_merge":
        net = _diffsort_net(network, n, x.device, steepness, art_lambda, distribution)
        return net(x)
    from diffsort import sort

    perm = torch.tensor(_merge_perm(n, split), dtype=torch.long, device=x.device)
    sorted_x, p = sort(
        _diffsort_merge_matrices(n, x.device),
        x.index_select(1, perm),
        steepness,
        art_lambda,
        distribution,
    )
    # perm is an involution: row perm[p] of P is row p of the arrangement's P.
    return sorted_x, p.index_select(1, perm)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(choices)}")


def _check_n(n: int) -> None:
    if n < 2:
        raise ValueError(f"n (x.shape[1]) must be >= 2 to sort; got n={n}")


def _check_positive(name: str, value: Any) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
    return float(value)


def _prepare(
    x: Any,
    network: str,
    distribution: str,
    steepness: Any,
    art_lambda: Any,
    backend: str,
    backends: Sequence[str],
    split: Any,
) -> tuple[torch.Tensor, float, float, int | None]:
    _check_choice("network", network, NETWORKS)
    _check_choice("distribution", distribution, DISTRIBUTIONS)
    if backend == "group_sum" and "group_sum" not in backends:
        raise ValueError(
            "backend 'group_sum' never forms P, use rank_mass(); "
            f"valid choices for soft_sort: {', '.join(backends)}"
        )
    _check_choice("backend", backend, backends)
    steepness = _check_positive("steepness", steepness)
    art_lambda = _check_positive("art_lambda", art_lambda)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor of shape (B, n); got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (B, n); got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point; got dtype {x.dtype}")
    n = x.shape[1]
    _check_n(n)
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    # (a data-dependent check: skipped while torch.compile traces, where it would break the graph)
    finite = None if torch.compiler.is_compiling() else torch.isfinite(x)
    if finite is not None and not bool(finite.all()):
        row, col = (int(i) for i in torch.nonzero(~finite)[0])
        raise ValueError(f"x must be finite; x[{row}, {col}] = {x[row, col].item()}")
    if network == "bitonic_merge":
        split = _check_merge_input(x, split)
    return x, steepness, art_lambda, split


def _check_merge_input(x: torch.Tensor, split: Any) -> int:
    n = x.shape[1]
    valid = isinstance(split, numbers.Integral) and not isinstance(split, bool)
    if not valid or not 1 <= split <= n - 1:
        raise ValueError(
            f"network 'bitonic_merge' needs split, the length of the first ascending run, "
            f"an int with 1 <= split <= n - 1 = {n - 1}; got split={split!r}"
        )
    with torch.no_grad():
        for lo, hi in ((0, split), (split, n)):
            run = x[:, lo:hi]
            bad = run[:, 1:] < run[:, :-1]
            if bool(bad.any()):
                row, col = (int(i) for i in torch.nonzero(bad)[0])
                raise ValueError(
                    "network 'bitonic_merge' needs x[:, :split] and x[:, split:] each sorted "
                    f"ascending (split={split}); row {row} has x[{row}, {lo + col}] = "
                    f"{run[row, col].item()} > x[{row}, {lo + col + 1}] = "
                    f"{run[row, col + 1].item()}"
                )
    return int(split)


def _check_ranks(ranks: Any, n: int, device: torch.device) -> torch.Tensor:
    if isinstance(ranks, torch.Tensor):
        mask = ranks
        if mask.dtype != torch.bool:
            raise ValueError(
                f"ranks must be a boolean mask of length n={n}; got dtype {mask.dtype}"
            )
    else:
        values = list(ranks)
        if not all(isinstance(v, (bool, np.bool_)) for v in values):
            raise ValueError(f"ranks must be a boolean mask of length n={n}; got {values!r}")
        mask = torch.tensor(values, dtype=torch.bool)
    if mask.dim() != 1 or mask.shape[0] != n:
        raise ValueError(
            f"ranks must be a boolean mask of length n={n}; got shape {tuple(mask.shape)}"
        )
    return mask.to(device)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


# Under torch.compile the sorters run eagerly, one graph break per call: their autograd Functions
# walk cached Python-side plans (strided views into one state buffer), which dynamo cannot trace.
@torch.compiler.disable
def soft_sort(
    x: torch.Tensor,
    network: str = "odd_even",
    distribution: str = "cauchy",
    steepness: float = 1.0,
    art_lambda: float = 0.25,
    backend: str = "columns",
    *,
    split: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Relaxed ascending sort of each row of x (B, n): returns ``(sorted_x, P)``.

    ``P`` (B, n, n) follows diffsort's code convention: ``P[b, r, c]`` is the probability that
    element r lands at ascending rank c, ``sorted_x ~= x @ P`` (the papers' P is its transpose).
    Each comparator uses alpha = f(b - a) (see ``_alpha`` for the six formulas) and
    ``min = alpha a + (1 - alpha) b``, ``max = (1 - alpha) a + alpha b``.

    ``backend``: ``columns`` (own column mixing) or ``diffsort`` (the package, built on x's device
    and cached per network, n, device, steepness, art_lambda, distribution). Same sorted values
    and P (bit for bit except one-ulp sigmoid differences), gradients to rounding.

    ``network="bitonic_merge"`` needs ``split``: x[:, :split] and x[:, split:] must each be sorted
    ascending, GroCo's ``[negatives ascending | positives ascending]`` (docs/methods/groco.md §3). The
    second run is reversed, which makes the row bitonic, and only Batcher's merger runs:
    K = ceil(log2 n) layers of ascending half-cleaners (strides 2^(K-1), ..., 1 on the padded
    arrangement) instead of a full network. It is a different relaxation with the same hard limit
    (it sorts exactly as steepness -> inf): each element meets only K partners at fixed distances,
    some from its own run (already in order, yet still mixed at finite steepness) and some from
    the other run, instead of the n neighbour comparisons of odd_even. P is therefore a different
    doubly stochastic matrix, mixing across the runs much more at steepness 1: GroCo's loss on
    random similarities (negatives U[-0.2, 0.6], positives U[0.2, 0.9]) is 0.197 with odd_even
    vs 0.304 with the merge for k = 10, m = 1, and 0.242 vs 0.528 for m = 3. It needs its own
    steepness; never compare its losses with odd_even's. ``split`` is ignored by the other
    networks.
    """
    with torch.autocast(device_type=_autocast_device(x), enabled=False):
        x, steepness, art_lambda, split = _prepare(
            x, network, distribution, steepness, art_lambda, backend, SORT_BACKENDS, split
        )
        if backend == "diffsort":
            return _diffsort_sort(x, network, distribution, steepness, art_lambda, split)
        n = x.shape[1]
        plan = _plan(network, n, split if network == "bitonic_merge" else None, x.device)
        keep = torch.is_grad_enabled() and x.requires_grad
        state = _ColumnsFn.apply(x, plan, distribution, steepness, art_lambda, keep)
        state = state.index_select(0, plan.col_out)
        return state[:, :, n].t().contiguous(), state[:, :, :n].permute(1, 2, 0).contiguous()


@torch.compiler.disable
def rank_mass(
    x: torch.Tensor,
    ranks: torch.Tensor | Sequence[bool],
    network: str = "odd_even",
    distribution: str = "cauchy",
    steepness: float = 1.0,
    art_lambda: float = 0.25,
    backend: str = "group_sum",
    *,
    split: int | None = None,
) -> torch.Tensor:
    """``q[b, r] = sum_{c : ranks[c]} P[b, r, c]``, the soft mass element r puts on the ranks in R.

    ``ranks`` is a boolean mask of length n over ascending ranks (GroCo: ``ranks[c] = c >= k``).
    With ``P = M_1 ... M_L``, ``q = M_1 (M_2 (... (M_L 1_R)))``: ``group_sum`` evaluates that
    product right to left without forming P (O(n) per row and layer, hand-written backward);
    ``columns`` and ``diffsort`` form P and sum its columns. Arguments as in ``soft_sort``.
    """
    with torch.autocast(device_type=_autocast_device(x), enabled=False):
        x, steepness, art_lambda, split = _prepare(
            x, network, distribution, steepness, art_lambda, backend, RANK_MASS_BACKENDS, split
        )
        n = x.shape[1]
        mask = _check_ranks(ranks, n, x.device)
        if backend == "diffsort":
            _, p = _diffsort_sort(x, network, distribution, steepness, art_lambda, split)
            return p[:, :, mask].sum(-1)
        keep = torch.is_grad_enabled() and x.requires_grad
        if backend == "columns":
            plan = _plan(network, n, split if network == "bitonic_merge" else None, x.device)
            state = _ColumnsFn.apply(x, plan, distribution, steepness, art_lambda, keep)
            return state.index_select(0, plan.col_out[mask])[:, :, :n].sum(0)
        # Rank c ends on wire c (on position c of the bitonic arrangement for the merge).
        perm = _merge_perm_tensor(n, split, x.device) if network == "bitonic_merge" else None
        return _GroupSumFn.apply(
            x,
            mask.to(x.dtype),
            _gs_plan(network, n, x.device),
            perm,
            distribution,
            steepness,
            art_lambda,
            keep,
        )


def _autocast_device(x: Any) -> str:
    return x.device.type if isinstance(x, torch.Tensor) else "cpu"
