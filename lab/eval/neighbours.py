"""Exact Euclidean nearest neighbours, shared by the geometry evaluators (density peaks, ID
profile, overlap, persistence).

The search screens in float32 and decides in float64, so its result is the float64 one:

1. per chunk of rows, s_ij = |x_j|^2 - 2 x_i.x_j (the squared distance less the row's own
   |x_i|^2) by one float32 matrix product on centred data; its error is at most
   e_i = (D + 16) u (|x_i| + max_j |x_j|)^2 (u = 2^-24: the textbook bound of a (D+1)-term dot
   product and the roundings of its inputs, with room to spare);
2. w_i = the (k + m)-th smallest s of row i (``np.partition``); the points with s <= w_i are the
   candidates (k + m of them, more on ties);
3. the candidates' squared distances |x_i|^2 + |x_j|^2 - 2 x_i.x_j are recomputed in float64
   (a sampled matrix product, in an order that keeps neighbouring points together in memory),
   sorted (ties broken by the lower index) and the first k kept. The row is settled when its k-th
   float64 s is below w_i - e_i: every point left out is then farther. Rows that are not
   (near-ties over the m spare candidates; rare) are searched again in float64 over all points.

:func:`knn_with_label_counts` also counts, in the same pass, how many of each point's k_i nearest
neighbours share its label, for k_i far beyond k (e.g. 0.3 x a class size): the k_i smallest s
are the k_i nearest points when the next smallest s exceeds the k_i-th by more than 2 e_i (a
point left out is farther than every point kept, even at the worst errors); rows with closer
ties are counted from their float64 distances.
"""
from __future__ import annotations

import warnings
from typing import Mapping

import numpy as np
import torch

BLOCK_ENTRIES = 2_560_000  # screened values per chunk (10 MB in float32: stays in cache)
SPARE = 8                  # candidates beyond k per row
BAND = 64                  # screened beyond the widest label neighbourhood (its near-ties)


def nearest_neighbours(X, k: int, chunk_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Exact Euclidean k nearest neighbours of every row of ``X`` [N, D], excluding the row itself.

    Returns (distances [N, k] float64, increasing; indices [N, k] int64); see the module docstring.
    """
    distances, indices, _ = knn_with_label_counts(X, k, chunk_size=chunk_size)
    return distances, indices


def knn_with_label_counts(X, k: int, same_label: Mapping[str, tuple] | None = None,
                          chunk_size: int = 256) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """:func:`nearest_neighbours` plus, for each ``name: (labels [N], k_per_point [N])``, how many of
    each point's ``k_per_point`` nearest neighbours (itself excluded) share its label."""
    X = np.asarray(X, dtype=np.float64)
    n, dim = X.shape
    if not 1 <= k <= n - 1:
        raise ValueError(f"need 1 <= k <= N - 1 neighbours, got k={k} for N={n} points")
    same_label = {name: (np.asarray(labels), np.asarray(ks, dtype=np.int64))
                  for name, (labels, ks) in (same_label or {}).items()}
    for name, (labels, ks) in same_label.items():
        if labels.shape != (n,) or ks.shape != (n,) or ks.min() < 1 or ks.max() > n - 1:
            raise ValueError(f"label set {name!r}: need N={n} labels and neighbour counts in 1..N-1")
    X = X - X.mean(0)
    sq = np.einsum("ij,ij->i", X, X)
    norms = np.sqrt(sq)
    screen = np.float32 if 4 * norms.max() ** 2 < 1e36 else np.float64  # float32 unless it would overflow
    error = (dim + 16) * np.finfo(screen).eps / 2 * (norms + norms.max()) ** 2 + np.finfo(np.float64).tiny
    width = -(-(dim + 1) // 16) * 16  # zero-padded: matrix products run fastest on multiples of 16
    left, right = np.zeros((n, width), dtype=screen), np.zeros((width, n), dtype=screen)
    left[:, :dim], left[:, dim] = X, 1.0           # [x_i, 1]
    right[:dim], right[dim] = -2 * X.T, sq         # [-2 x_j, |x_j|^2]
    m = min(k + SPARE, n - 1)
    widest = min(n - 1, max([m, *(int(ks.max()) for _, ks in same_label.values())]) + BAND)
    pairs, cut = [], np.empty(n)
    counts = {name: np.empty(n, dtype=np.int64) for name in same_label}
    step = max(1, min(chunk_size, BLOCK_ENTRIES // n))
    block, work = np.empty((step, n), dtype=screen), np.empty((step, n), dtype=screen)
    for start in range(0, n, step):
        rows = np.arange(start, min(start + step, n))
        s = np.matmul(left[rows], right, out=block[: len(rows)])
        s[np.arange(len(rows)), rows] = np.inf  # not its own neighbour
        if m == n - 1:  # every other point is a candidate
            cols = np.argsort(s, axis=1)[:, :m]
            pairs.append((np.repeat(rows, m), np.sort(cols, axis=1).ravel()))
            cut[rows] = np.inf
        elif not same_label:  # the candidates: s <= the m-th smallest s, ties included
            r, c, cut[rows] = _smallest(s, m, work)
            pairs.append((r + start, c))
        else:  # the widest label neighbourhood first; the m candidates are among its points
            top = np.argpartition(s, widest, axis=1)[:, : widest + 1] if widest < n - 1 else np.argsort(s, axis=1)
            values = np.take_along_axis(s, top, 1)
            near = np.argpartition(values, m, axis=1)[:, : m + 1]
            cut[rows] = np.take_along_axis(values, near[:, m:], 1)[:, 0]  # the (m + 1)-th smallest
            pairs.append((np.repeat(rows, m), np.sort(np.take_along_axis(top, near[:, :m], 1), axis=1).ravel()))
            for name, (labels, ks) in same_label.items():
                counts[name][rows] = _same_label_counts(X, sq, rows, top, values, error[rows], labels, ks[rows])
    rows, cols = (np.concatenate(p) for p in zip(*pairs))
    distances, indices, kth_s = _refine(X, sq, rows, cols, k)
    unsettled = np.flatnonzero(kth_s >= cut - error)
    if len(unsettled):
        distances[unsettled], indices[unsettled] = _exact_rows(X, sq, unsettled, k)
    return distances, indices, counts


def pair_dots(X: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """x_rows[i] . x_cols[i] in float64 for pairs grouped by row (``rows`` non-decreasing), without
    gathering the rows (a sampled sparse-dense matrix product)."""
    n = X.shape[0]
    starts = np.searchsorted(rows, np.arange(n + 1))
    Xt = torch.from_numpy(np.ascontiguousarray(X))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the CSR layout is marked beta
            pattern = torch.sparse_csr_tensor(torch.from_numpy(starts), torch.from_numpy(np.ascontiguousarray(cols)),
                                              torch.zeros(len(cols), dtype=torch.float64), size=(n, n))
            return torch.sparse.sampled_addmm(pattern, Xt, Xt.T, beta=0.0).values().numpy()
    except (RuntimeError, NotImplementedError):  # a torch build without it: gather in small blocks
        out = np.empty(len(rows))
        for start in range(0, len(rows), 4096):
            part = slice(start, start + 4096)
            out[part] = np.einsum("ij,ij->i", X[rows[part]], X[cols[part]])
        return out


def locality_order(rows: np.ndarray, cols: np.ndarray, n: int) -> np.ndarray:
    """An order of the points in which neighbours sit close together (reverse Cuthill-McKee on the
    candidate graph), so the float64 pass reads from cache."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import reverse_cuthill_mckee

    graph = csr_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    return np.asarray(reverse_cuthill_mckee(graph, symmetric_mode=False), dtype=np.int64)


def _smallest(s: np.ndarray, m: int, work: np.ndarray):
    """(row, column) of every entry of ``s`` [b, N] at most its row's m-th smallest, and that value."""
    part = work[: len(s)]
    np.copyto(part, s)
    part.partition(m - 1, axis=1)
    cut = part[:, m - 1].copy()
    flat = np.flatnonzero(s <= cut[:, None])
    return flat // s.shape[1], flat % s.shape[1], cut


def _refine(X, sq, rows, cols, k) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 distances of the candidate pairs (grouped by row, by index within a row), the first
    k of each row sorted (ties: the lower index first), and each row's k-th squared distance less
    its |x_i|^2."""
    n = len(sq)
    starts = np.searchsorted(rows, np.arange(n + 1))
    sizes = np.diff(starts)
    if (sizes == sizes[0]).all():  # the usual case: no ties at any row's cut
        ids = cols.reshape(n, sizes[0])
    else:  # each row's candidates, by index, padded with -1
        ids = np.full((n, sizes.max()), -1, dtype=np.int64)
        ids[rows, np.arange(len(rows)) - starts[rows]] = cols
    order = locality_order(rows, cols, n)
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    ids, sizes, sq_rows = ids[order], sizes[order], sq[order]   # row p: the candidates of point order[p]
    valid = ids >= 0
    dots = pair_dots(X[order], np.repeat(np.arange(n), sizes), position[ids[valid]])
    if valid.all():
        d2 = np.maximum(sq_rows[:, None] + sq[ids] - 2 * dots.reshape(ids.shape), 0.0)
    else:
        d2 = np.full(ids.shape, np.inf)
        d2[valid] = np.maximum(np.repeat(sq_rows, sizes) + sq[ids[valid]] - 2 * dots, 0.0)
    nearest = np.argsort(d2, axis=1, kind="stable")[:, :k]
    d2 = np.take_along_axis(d2, nearest, 1)
    distances, indices, kth_s = np.empty((n, k)), np.empty((n, k), dtype=np.int64), np.empty(n)
    distances[order], indices[order] = np.sqrt(d2), np.take_along_axis(ids, nearest, 1)
    kth_s[order] = d2[:, -1] - sq_rows
    return distances, indices, kth_s


def _exact_rows(X, sq, rows, k) -> tuple[np.ndarray, np.ndarray]:
    """The plain float64 search for a few rows: every distance, sorted."""
    d2 = np.maximum(sq[rows, None] + sq[None, :] - 2 * (X[rows] @ X.T), 0.0)
    d2[np.arange(len(rows)), rows] = np.inf
    nearest = np.argsort(d2, axis=1, kind="stable")[:, :k]
    return np.sqrt(np.take_along_axis(d2, nearest, 1)), nearest


def _same_label_counts(X, sq, rows, top, values, e, labels, ks) -> np.ndarray:
    """How many of each row's ``ks`` nearest share its label, from ``top`` [b, W + 1], the W + 1
    smallest s of each row (W > ks; the last one is the (W + 1)-th smallest), their s in ``values``.

    With v_i the ks-th smallest s, points below v_i - 2 e_i are certainly among the ks nearest,
    points above v_i + 2 e_i certainly not, and those in between are settled by their float64
    distances. A row whose band reaches beyond ``top`` is counted from all its distances.
    """
    out = np.empty(len(rows), dtype=np.int64)
    for q in np.unique(ks):
        mine = np.flatnonzero(ks == q)
        vals, cols, err = values[mine].astype(np.float64), top[mine], e[mine, None]
        v = np.partition(vals[:, :-1], q - 1, axis=1)[:, q - 1 : q]
        same = labels[cols] == labels[rows[mine], None]
        sure = vals < v - 2 * err
        r, c = np.nonzero(~sure & (vals <= v + 2 * err))
        c = cols[r, c]
        d2 = sq[rows[mine][r]] + sq[c] - 2 * np.einsum("ij,ij->i", X[rows[mine][r]], X[c])
        order = np.lexsort((c, d2, r))
        r, c = r[order], c[order]
        rank = np.arange(len(r)) - np.searchsorted(r, r)
        taken = rank < (q - sure.sum(1))[r]
        agree = labels[c[taken]] == labels[rows[mine][r[taken]]]
        out[mine] = (sure & same).sum(1) + np.bincount(r[taken], weights=agree, minlength=len(mine)).astype(np.int64)
        wide = mine[vals[:, -1] <= v[:, 0] + 2 * err[:, 0]]  # the band may hold points beyond top
        if len(wide):
            _, exact = _exact_rows(X, sq, rows[wide], q)
            out[wide] = (labels[exact] == labels[rows[wide], None]).sum(1)
    return out
