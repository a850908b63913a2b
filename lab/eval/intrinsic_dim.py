"""Intrinsic dimension across scales: TwoNN with decimation, multiscale Gride, and reading a profile.

As DADApy 0.3 (``Data.compute_id_2NN``, ``return_id_scaling_2NN``, ``return_id_scaling_gride``),
after Facco et al. 2017 (TwoNN) and Denti et al. 2022 (Gride); checked against DADApy on the
fixtures in tests/fixtures/density. ``distances`` are each point's sorted neighbour distances
excluding itself (column j is the (j+1)-th neighbour), from :mod:`lab.eval.neighbours`.
"""
from __future__ import annotations

import math

import numpy as np

from lab.eval.density_peaks import gride_id
from lab.eval.neighbours import nearest_neighbours

TWONN_FRACTION = 0.98  # share of the ratios r2 / r1 kept (the largest are dropped), as Valeriani et al.


def twonn_id(distances, fraction: float = TWONN_FRACTION) -> float:
    """TwoNN: with mu_i = r_i2 / r_i1 sorted, the least-squares slope through the origin of
    -log(1 - i / N) against log mu_i over the first floor(fraction x N) of them (DADApy's
    ``algorithm="base"``); fraction 1 gives the maximum-likelihood (N - 1) / sum log mu."""
    distances = np.asarray(distances, dtype=np.float64)
    log_mu = np.log(distances[:, 1] / distances[:, 0])
    n = len(log_mu)
    if fraction >= 1:
        return float((n - 1) / log_mu.sum())
    kept = np.sort(log_mu)[: int(n * fraction)]
    y = -np.log(1 - np.arange(1, len(kept) + 1) / n)
    return float(kept @ y / (kept @ kept))


def twonn_decimation(X, fraction: float = TWONN_FRACTION, min_points: int = 10, seed: int = 42) -> dict:
    """TwoNN on nested decimations (DADApy's ``return_id_scaling_2NN``): for each subset size
    n_i = round(N / 2^i) > ``min_points`` (i < log2 N - 1), round(N / n_i) random subsets of
    n_i points (drawn in DADApy's order from ``default_rng(seed)``), the mean ID, its standard
    error (std / sqrt(repeats); 0 for the full set) and the scale (mean r1, r2 distance).
    """
    X = np.asarray(X, dtype=np.float64)
    n = len(X)
    rng = np.random.default_rng(seed)
    sizes = np.round(n / 2.0 ** np.arange(max(int(math.log(n, 2)) - 1, 1))).astype(int)
    out = {"n_points": [], "repeats": [], "id": [], "error": [], "scale": []}
    for size in sizes[sizes > min_points]:
        repeats = 1 if size == n else int(np.rint(n / size))
        ids, scales = [], []
        for _ in range(repeats):
            subset = X if size == n else X[rng.choice(n, size=size, replace=False)]
            distances, _ = nearest_neighbours(subset, 2)
            ids.append(twonn_id(distances, fraction))
            scales.append(float(distances.mean()))
        out["n_points"].append(int(size))
        out["repeats"].append(repeats)
        out["id"].append(float(np.mean(ids)))
        out["error"].append(float(np.std(ids) / math.sqrt(repeats)) if repeats > 1 else 0.0)
        out["scale"].append(float(np.mean(scales)))
    return out


def gride_scaling(distances, range_max: int = 64) -> dict:
    """Gride at the neighbour ranks (n1, n2) = (1, 2), (2, 4), ... up to n2 <= ``range_max``
    (DADApy's ``return_id_scaling_gride``): the ID, its error and the scale (mean distance of
    the n1-th and n2-th neighbours) of each; ``distances`` must hold ``range_max`` columns."""
    distances = np.asarray(distances, dtype=np.float64)
    top = min(range_max, distances.shape[1])
    ranks = [2**i for i in range(1, int(math.log(top, 2)) + 1)]
    out = {"n2": ranks, "id": [], "error": [], "scale": []}
    for n2 in ranks:
        d, e = gride_id(distances, n2 // 2, n2)
        out["id"].append(d)
        out["error"].append(e)
        out["scale"].append(float(distances[:, [n2 // 2 - 1, n2 - 1]].mean()))
    return out


def stable_scale(ids_by_layer) -> int:
    """Index of the scale where the ID changes least with the scale: ``ids_by_layer`` [L, S] (NaN
    where undefined); for each interior scale s, |log ID[s+1] - log ID[s-1]| averaged over the
    layers; the smallest wins (the first on ties). With fewer than 3 scales, the last."""
    ids = np.asarray(ids_by_layer, dtype=np.float64)
    if ids.shape[1] < 3:
        return ids.shape[1] - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        change = np.abs(np.log(ids[:, 2:]) - np.log(ids[:, :-2]))
    change = np.where(np.isfinite(change), change, np.nan)
    if np.isnan(change).all():
        return ids.shape[1] - 1
    return int(np.nanargmin(np.nanmean(change, 0))) + 1


def peak_then_minimum(profile) -> tuple[int | None, int | None]:
    """(early peak, first minimum after it) of an ID profile over layers, as positions into
    ``profile`` (NaN entries are skipped): the peak is the first local maximum (the last layer does
    not count), the minimum the first point after it lower than its neighbours (or the last one if
    the profile falls to the end). None where there is no such point."""
    values = np.asarray(profile, dtype=np.float64)
    index = np.flatnonzero(np.isfinite(values))
    v = values[index]
    peak = next((i for i in range(len(v) - 1) if (i == 0 or v[i] >= v[i - 1]) and v[i] > v[i + 1]), None)
    if peak is None:
        return None, None
    minimum = next((i for i in range(peak + 1, len(v)) if v[i] < v[i - 1] and (i == len(v) - 1 or v[i] <= v[i + 1])),
                   None)
    return int(index[peak]), None if minimum is None else int(index[minimum])
