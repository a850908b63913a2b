"""The representation landscape per layer: intrinsic dimension, density peaks and label overlap.

After Doimo et al., "The representation landscape of few-shot learning and fine-tuning in large
language models" (NeurIPS 2024). For every layer l = 0..L the final token's residual h_l (the input
of block l, position ``batch.answer_pos``) of a split's evaluation prompts is treated as a point
cloud (float64, exact duplicates removed), and we measure:

- ``intrinsic_dim``: the Gride estimator (Denti et al. 2022) at the 16th/32nd-neighbour scale;
- ``n_peaks`` and ``core_fraction``: the density peaks found by Advanced Density Peaks clustering
  (ADP, d'Errico et al. 2021) on a k-NN log-density (k = 16) with merging significance Z = 1.6,
  and the share of points that are not halo (halo points are those of a cluster less dense than
  its highest saddle);
- ``ari``: the adjusted Rand index between the clusters and each label set, on core points only
  when halo is on (halo points belong to no cluster, so they are left out rather than counted as
  an extra "cluster -1");
- ``overlap``: the neighbourhood overlap with each label set: the fraction of a point's k_i
  nearest neighbours that share its label, k_i = 0.3 x its class size, averaged with every class
  weighted equally (as DADApy's ``return_label_overlap``); ``overlap_chance`` is its expected
  value when the labels are independent of the geometry.

With several data streams (an image run's text and image prompts), ``pool_modalities`` adds the
entry ``pooled``: all streams' prompts as one point cloud with the extra label ``modality``.

Label sets (:func:`batch_labels`): ``answer``, ``n_objects``, every per-sample (1-D) fact of
``batch.objects`` under its own name (the few-shot task's ``topic``, ``answer_letter``...) and, for
the retrieval task, the queried object's ``query_color`` and ``query_shape``. A label set that is
constant over a split is left out of that split. Duplicate points keep their first occurrence's
labels.

The algorithms follow DADApy 0.3 (``Data.return_id_scaling_gride``, ``compute_density_kNN``,
``compute_clustering_ADP``, ``return_label_overlap``); :func:`advanced_density_peaks` documents the
few places where it differs.

Outputs: ``density_peaks.json`` (modality -> split -> per-layer lists), ``density_peaks.csv`` (one
row per modality, split, layer) and ``density_peaks.png`` (one panel per statistic vs layer, one
line per modality/split); :func:`profile_figure` draws the same panels for several runs.
"""
from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Iterable
from typing import Mapping, NamedTuple

import numpy as np
import torch
from scipy.optimize import brentq
from scipy.special import betaln, gammaln

from lab.errors import LabError
from lab.eval.base import EvalContext, Evaluator, final_token_states
from lab.eval.neighbours import knn_with_label_counts, nearest_neighbours  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

ADP_NEIGHBOURS = 100  # neighbours searched when ADP links a point to a denser one (DADApy's default maxk)
SCALAR_STATS = ("n_points", "intrinsic_dim", "intrinsic_dim_error", "n_peaks", "core_fraction", "seconds")
LABEL_STATS = ("ari", "overlap", "overlap_chance")
QUERIED_FACTS = {"colors": "query_color", "shapes": "query_shape"}  # [B, N] object fact -> label: the queried object's


# ---------------------------------------------------------------------------------------- geometry
def remove_duplicates(X) -> tuple[np.ndarray, np.ndarray]:
    """``X`` without repeated rows (the first occurrence of each is kept, in the original order),
    and the kept row indices. Duplicates have zero neighbour distances, which break the ID and the
    density estimates. Rows are compared by their bytes (-0.0 counted as 0.0), in one hash pass."""
    X = np.asarray(X)
    rows = np.ascontiguousarray(X + 0.0 if np.issubdtype(X.dtype, np.floating) else X)
    first: dict[bytes, int] = {}
    keep = np.fromiter((first.setdefault(row.tobytes(), i) == i for i, row in enumerate(rows)), bool, len(rows))
    keep = np.flatnonzero(keep)
    return X[keep], keep


def gride_id(distances, n1: int = 16, n2: int = 32) -> tuple[float, float]:
    """Gride intrinsic dimension (Denti et al. 2022) and its standard error.

    ``distances`` [N, >= n2] are each point's sorted neighbour distances excluding itself (from
    :func:`nearest_neighbours`). With mu_i = r_{i,n2} / r_{i,n1}, the likelihood of d is
    prod_i d (mu_i^d - 1)^(n2-n1-1) / (B(n2-n1, n1) mu_i^(d(n2-1)+1)); its score is strictly
    decreasing in d, so the maximum is the score's root, found by Brent's method on [1e-3, 1e3].
    As in DADApy, ratios far above the bulk (mu > q50 + 20 (q95 - q50), usually near-duplicate
    points) are dropped. The error is 1 / sqrt(Fisher information). DADApy's likelihood has N - 1
    where the product above gives N; the estimates differ by about 1/N relative.
    """
    distances = np.asarray(distances, dtype=np.float64)
    if not 1 <= n1 < n2 <= distances.shape[1]:
        raise ValueError(f"need 1 <= n1 < n2 <= {distances.shape[1]} neighbours, got n1={n1}, n2={n2}")
    with np.errstate(divide="ignore", invalid="ignore"):
        mus = distances[:, n2 - 1] / distances[:, n1 - 1]
    mus = mus[np.isfinite(mus)]
    mus = np.maximum(mus, 1.0 + 10 * np.finfo(np.float64).eps)  # r_n2 == r_n1 would give log 0
    q95, q50 = np.percentile(mus, [95, 50])
    log_mu = np.log(mus[mus < q50 + 20 * (q95 - q50) + 1e-12])
    n, extra = len(log_mu), n2 - n1 - 1

    def score(d: float) -> float:  # d/dd of the log-likelihood
        return n / d + extra * np.sum(log_mu / -np.expm1(-d * log_mu)) - (n2 - 1) * np.sum(log_mu)

    low, high = 1e-3, 1e3
    d = high if score(high) > 0 else brentq(score, low, high, xtol=1e-10, rtol=1e-12)
    fisher = n / d**2 + extra * np.sum(log_mu**2 * np.exp(-d * log_mu) / np.expm1(-d * log_mu) ** 2)
    return float(d), float(1 / math.sqrt(fisher))


def gride_log_likelihood(d: float, mus, n1: int, n2: int) -> float:
    """The Gride log-likelihood of intrinsic dimension ``d`` for ratios ``mus`` = r_n2 / r_n1."""
    log_mu = np.log(np.asarray(mus, dtype=np.float64))
    return float(len(log_mu) * (math.log(d) - betaln(n2 - n1, n1))
                 + (n2 - n1 - 1) * np.sum(d * log_mu + np.log(-np.expm1(-d * log_mu)))
                 - np.sum((d * (n2 - 1) + 1) * log_mu))


def knn_log_density(distances, k: int, intrinsic_dim: float) -> tuple[np.ndarray, np.ndarray]:
    """k-NN log-density and its error per point (DADApy's ``compute_density_kNN``).

    log rho_i = log k - log N - log V_d - d log r_{i,k}, with V_d the volume of the unit d-ball and
    r_{i,k} the distance to the k-th neighbour (``distances`` excludes the point itself); the error
    is 1 / sqrt(k) for every point.
    """
    distances = np.asarray(distances, dtype=np.float64)
    n, d = distances.shape[0], float(intrinsic_dim)
    log_unit_ball = d / 2 * math.log(math.pi) - gammaln(d / 2 + 1)
    radius = np.maximum(distances[:, k - 1], np.finfo(np.float64).tiny)
    log_density = math.log(k) - math.log(n) - log_unit_ball - d * np.log(radius)
    return log_density, np.full(n, 1 / math.sqrt(k))


# ------------------------------------------------------------------------------------- clustering
class DensityPeaks(NamedTuple):
    labels: np.ndarray      # [N] cluster of each point, 0..n_peaks-1; -1 = halo
    n_peaks: int
    core_fraction: float    # share of points that are not halo


def advanced_density_peaks(log_density, errors, neighbour_indices, k: int = 16, Z: float = 1.6,
                           halo: bool = True) -> DensityPeaks:
    """Advanced Density Peaks clustering (d'Errico et al. 2021), as DADApy's ``compute_clustering_ADP``.

    ``neighbour_indices`` [N, K >= k]: each point's neighbours by increasing distance, excluding
    itself (DADApy keeps K = 100); ``k`` is the neighbourhood of the density estimate. With
    g = log rho - error:

    1. putative centres: points whose g is not below that of any of their k neighbours, unless
       they lie in the k-neighbourhood of a point with a higher g;
    2. in decreasing g, every other point joins the cluster of its nearest neighbour that is
       already assigned (a denser point or a centre); a point with none among its K neighbours (a
       rejected centre) joins the cluster of the densest point whose k-neighbourhood holds it
       (precisely: of the densest such point over the rejected centres among it and its neighbours);
    3. a point p of cluster c is a border with cluster c' when its nearest neighbour q outside c
       (among its k) is in c' and p is the closest point of c to q; the saddle between c and c' is
       their border point of highest g, with its log rho and error;
    4. while some pair of adjacent clusters has a peak with log rho_peak - log rho_saddle <
       Z (err_peak + err_saddle), the pair with the highest saddle is merged into the peak with
       the larger margin (log rho_peak - log rho_saddle) / (err_peak + err_saddle), and the merged
       cluster's saddle with every other cluster becomes the higher of the two;
    5. halo: points of a cluster with log rho below its highest remaining saddle get label -1.

    Ties are common (two points that are each other's k-th neighbour have the same density), so
    every comparison and tie-break follows DADApy's code: strict comparisons of g, its processing
    order ``argsort(-g)``, its shift of log rho to positive values, first-found maxima. Two DADApy
    details are kept on purpose: step 3 looks for p among the first K - 1 neighbours of q, and a
    rejected centre held by another rejected centre inherits that one's holder (its pure-Python
    version; the Cython one stores that pairing one row off, which only matters in step 2's
    rare fallback). Saddles are a list of adjacent pairs (as DADApy's ``v2``), not a dense matrix:
    non-adjacent pairs can never merge in either form. Checked label-for-label against DADApy 0.3.4.
    """
    log_density = np.asarray(log_density, dtype=np.float64)
    n = len(log_density)
    errors = np.broadcast_to(np.asarray(errors, dtype=np.float64), (n,))
    neighbours = np.asarray(neighbour_indices, dtype=np.int64)
    if neighbours.ndim != 2 or neighbours.shape[0] != n or neighbours.shape[1] < k:
        raise ValueError(f"neighbour_indices must be [N={n}, K >= k={k}], got {neighbours.shape}")
    # DADApy's shift to positive log densities: it changes no difference, only the float rounding
    log_density = log_density - np.min(log_density - Z * errors) + 1
    g = log_density - errors
    order = np.argsort(-g)
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    knn = neighbours[:, :k]

    # 1. centres; a rejected one remembers the densest point holding it (first index on ties)
    local_max = ~(g[knn] > g[:, None]).any(1)
    holder, slot = np.nonzero(local_max[knn])
    held = knn[holder, slot]
    by_centre = np.lexsort((holder, -g[holder], held))
    first = np.ones(len(by_centre), dtype=bool)
    first[1:] = held[by_centre][1:] != held[by_centre][:-1]
    densest_holder = np.full(n, -1)
    densest_holder[held[by_centre][first]] = holder[by_centre][first]
    rejected = local_max & (densest_holder >= 0)
    rejected[rejected] = g[densest_holder[rejected]] > g[rejected]
    for c in np.flatnonzero(rejected):  # ascending, as DADApy: a rejected holder passes on its own
        if rejected[densest_holder[c]] and densest_holder[c] < c:
            densest_holder[c] = densest_holder[densest_holder[c]]
    centres = np.flatnonzero(local_max & ~rejected)
    is_centre = np.zeros(n, dtype=bool)
    is_centre[centres] = True

    # 2. preliminary assignment
    cluster = np.full(n, -1)
    cluster[centres] = np.arange(len(centres))
    assigned_first = (position[neighbours] < position[:, None]) | is_centre[neighbours]
    has_parent = assigned_first.any(1)
    parent = neighbours[np.arange(n), assigned_first.argmax(1)]
    for i in order:
        if cluster[i] >= 0:
            continue
        if has_parent[i]:
            cluster[i] = cluster[parent[i]]
        else:
            candidates = np.unique(np.concatenate(([i], neighbours[i])))
            holders = densest_holder[candidates[rejected[candidates]]]
            cluster[i] = cluster[holders[np.argmax(g[holders])]]
    if (cluster < 0).any():  # pragma: no cover - would be a bug in the steps above
        raise RuntimeError("ADP left points unassigned")

    # 3. saddles between adjacent clusters
    outside = cluster[knn] != cluster[:, None]
    p1 = np.flatnonzero(outside.any(1) & ~is_centre)
    q = knn[p1, outside[p1].argmax(1)]
    c1, c2 = cluster[p1], cluster[q]
    same = cluster[neighbours[q, :-1]] == c1[:, None]
    closest = ~same.any(1) | (neighbours[q, same.argmax(1)] == p1)
    p1, c1, c2 = p1[closest], c1[closest], c2[closest]
    a, b = np.minimum(c1, c2), np.maximum(c1, c2)
    by_pair = np.lexsort((p1, c1, -g[p1], b, a))    # per pair, the highest g first
    p1, a, b = p1[by_pair], a[by_pair], b[by_pair]
    first = np.ones(len(p1), dtype=bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    pair_a, pair_b, saddle = a[first], b[first], p1[first]
    saddle_density, saddle_error = log_density[saddle], errors[saddle]

    # 4. merge statistically insignificant peaks, the highest saddle first
    peak_density, peak_error = log_density[centres], errors[centres]
    alive = np.ones(len(saddle), dtype=bool)
    root = np.arange(len(centres))                  # the cluster each original cluster now belongs to
    while True:
        gap_a, gap_b = peak_density[pair_a] - saddle_density, peak_density[pair_b] - saddle_density
        err_a, err_b = peak_error[pair_a] + saddle_error, peak_error[pair_b] + saddle_error
        weak = np.flatnonzero(alive & ((gap_a < Z * err_a) | (gap_b < Z * err_b)))
        if not len(weak):
            break
        t = weak[np.lexsort((pair_b[weak], pair_a[weak], -saddle_density[weak]))[0]]
        keep, drop = pair_a[t], pair_b[t]
        if gap_a[t] / err_a[t] < gap_b[t] / err_b[t]:
            keep, drop = drop, keep
        alive[t] = False
        root[root == drop] = keep
        from_drop = alive & ((pair_a == drop) | (pair_b == drop))
        pair_a[from_drop & (pair_a == drop)] = keep
        pair_b[from_drop & (pair_b == drop)] = keep
        pair_a, pair_b = np.minimum(pair_a, pair_b), np.maximum(pair_a, pair_b)
        # keep's saddle with another cluster is the higher of its own and drop's (its own on a tie)
        touching = np.flatnonzero(alive & ((pair_a == keep) | (pair_b == keep)))
        other = np.where(pair_a[touching] == keep, pair_b[touching], pair_a[touching])
        best = np.lexsort((from_drop[touching], -saddle_density[touching], other))
        first = np.ones(len(best), dtype=bool)
        first[1:] = other[best][1:] != other[best][:-1]
        alive[touching[best[~first]]] = False

    # 5. final labels (surviving clusters numbered by their centre's index) and halo
    survivors = np.flatnonzero(root == np.arange(len(centres)))
    number = np.full(len(centres), -1)
    number[survivors] = np.arange(len(survivors))
    labels = number[root[cluster]]
    if halo:
        highest_saddle = np.full(len(survivors), -np.inf)
        for ends in (pair_a, pair_b):
            np.maximum.at(highest_saddle, number[ends[alive]], saddle_density[alive])
        labels = np.where(log_density < highest_saddle[labels], -1, labels)
    return DensityPeaks(labels, len(survivors), float(np.mean(labels >= 0)))


# ---------------------------------------------------------------------------------- label overlap
def neighbourhood_overlap(neighbour_indices, labels, fraction: float = 0.3, weighted: bool = True) -> float:
    """Mean fraction of each point's k_i nearest neighbours that share its label.

    k_i = max(1, floor(fraction x the size of i's class)); ``neighbour_indices`` [N, K] (sorted,
    excluding the point itself) must hold at least the largest k_i columns. ``weighted`` gives
    every class the same total weight (DADApy's default), otherwise every point counts equally.
    """
    labels = np.asarray(labels)
    neighbours = np.asarray(neighbour_indices)
    k_per_point = overlap_sizes(labels, fraction)
    if k_per_point.max() > neighbours.shape[1]:
        raise ValueError(f"the overlap needs {k_per_point.max()} neighbours per point, got {neighbours.shape[1]}")
    columns = k_per_point.max()
    same = labels[neighbours[:, :columns]] == labels[:, None]
    within = np.arange(columns) < k_per_point[:, None]
    return overlap_from_counts(np.count_nonzero(same & within, axis=1), labels, k_per_point, weighted)


def overlap_sizes(labels, fraction: float) -> np.ndarray:
    """k_i per point for :func:`neighbourhood_overlap`: max(1, floor(fraction x i's class size)),
    at most N - 1."""
    _, inverse, counts = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
    return np.clip(np.floor(counts * fraction).astype(np.int64), 1, max(len(inverse) - 1, 1))[inverse]


def overlap_from_counts(same_counts, labels, k_per_point, weighted: bool = True) -> float:
    """The overlap from each point's number of same-label neighbours among its k_i nearest."""
    _, inverse, counts = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
    per_point = np.asarray(same_counts) / np.asarray(k_per_point)
    return float(np.average(per_point, weights=1.0 / counts[inverse] if weighted else None))


def overlap_chance(labels, weighted: bool = True) -> float:
    """Expected :func:`neighbourhood_overlap` when neighbours are drawn at random: a neighbour of a
    point of class c shares its label with probability (n_c - 1) / (N - 1)."""
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    same = (counts - 1) / max(counts.sum() - 1, 1)
    return float(same.mean() if weighted else np.sum(counts * same) / counts.sum())


# ------------------------------------------------------------------------------------ one layer
def landscape_statistics(X, labels: Mapping[str, np.ndarray], k: int = 16, id_scale=(16, 32), Z: float = 1.6,
                         halo: bool = True, overlap_fraction: float = 0.3, search=knn_with_label_counts) -> dict:
    """All statistics of one point cloud ``X`` [N, D] (rows assumed distinct) and its label sets.

    Returns n_points, intrinsic_dim(_error), n_peaks, core_fraction, ari/overlap/overlap_chance
    per label set, and ``timings`` (seconds of each part). Too few points for the neighbour scales
    (N - 1 < max(k, n2)) gives NaN statistics. One neighbour search serves every part: a table of
    K = the most of 100 (ADP), k and n2 neighbours, and, in the same pass, each point's number of
    same-label points among its k_i nearest for the overlap (k_i up to 0.3 x a class size, no
    table that wide). ``search(X, K, same_label)`` replaces
    :func:`lab.eval.neighbours.knn_with_label_counts` (the benchmark's baseline).
    """
    from sklearn.metrics import adjusted_rand_score

    X = np.asarray(X, dtype=np.float64)
    n, (n1, n2) = len(X), id_scale
    nan = float("nan")
    out = {"n_points": n, "intrinsic_dim": nan, "intrinsic_dim_error": nan, "n_peaks": nan, "core_fraction": nan,
           "ari": {name: nan for name in labels}, "overlap": {name: nan for name in labels},
           "overlap_chance": {name: overlap_chance(v) for name, v in labels.items()}, "timings": {}, "note": None}
    if not np.isfinite(X).all():
        out["note"] = "the layer holds non-finite values (NaN or inf); no statistic computed"
        return out
    if n - 1 < max(k, n2):
        out["note"] = (f"only {n} distinct points; k={k} and the ID scale n2={n2} need at least {max(k, n2) + 1}")
        return out
    clock = time.perf_counter()
    timings = out["timings"]

    def lap(part: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[part] = now - clock
        clock = now

    K = min(n - 1, max(k, n2, ADP_NEIGHBOURS))
    sizes = {name: overlap_sizes(values, overlap_fraction) for name, values in labels.items()}
    distances, neighbours, same = search(X, K, {name: (values, sizes[name]) for name, values in labels.items()})
    lap("neighbours")
    out["intrinsic_dim"], out["intrinsic_dim_error"] = gride_id(distances, n1, n2)
    lap("intrinsic_dim")
    log_density, errors = knn_log_density(distances, k, out["intrinsic_dim"])
    lap("density")
    clusters = advanced_density_peaks(log_density, errors, neighbours, k, Z, halo)
    out["n_peaks"], out["core_fraction"] = clusters.n_peaks, clusters.core_fraction
    lap("clustering")
    core = clusters.labels >= 0
    for name, values in labels.items():
        out["ari"][name] = float(adjusted_rand_score(values[core], clusters.labels[core])) if core.any() else nan
    lap("ari")
    for name, values in labels.items():
        out["overlap"][name] = overlap_from_counts(same[name], values, sizes[name])
    lap("overlap")
    return out


# --------------------------------------------------------------------------------------- batches
def batch_labels(batch) -> dict[str, np.ndarray]:
    """The label sets of a batch: ``answer`` (the target token), ``n_objects``, every per-sample
    (1-D) entry of ``batch.objects`` under its own name, and, when the batch has ``query_object``,
    the queried object's colour and shape (``query_color``, ``query_shape``: the query and the
    intermediate variable of the retrieval task)."""
    labels = {"answer": batch.targets, "n_objects": batch.n_objects}
    objects = batch.objects
    for name, value in objects.items():
        if value.dim() == 1 and name not in labels:
            labels[name] = value
    if "query_object" in objects:
        for fact, name in QUERIED_FACTS.items():
            if fact in objects:
                labels[name] = objects[fact].gather(1, objects["query_object"][:, None])[:, 0]
    return {name: value.cpu().numpy() for name, value in labels.items()}


@torch.no_grad()
# ------------------------------------------------------------------------------------- evaluator
def _integer(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise LabError(f"density_peaks {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _names(name: str, value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Iterable) or not all(isinstance(v, str) for v in value):
        raise LabError(f"density_peaks {name} must be a list of names or null, got {value!r}")
    return list(value)


class DensityPeaksEvaluator(Evaluator):
    """Per layer, on the final token: Gride ID, ADP density peaks, core fraction, ARI and
    neighbourhood overlap with each label set (see the module docstring)."""

    name = "density_peaks"

    def __init__(self, splits=None, modalities=None, layers=None, k: int = 16, id_scale=(16, 32), Z: float = 1.6,
                 halo: bool = True, overlap_fraction: float = 0.3, max_points: int = 10000, labels=None,
                 pool_modalities: bool = True, plots: bool = True) -> None:
        self.splits, self.modalities, self.labels = _names("splits", splits), _names("modalities", modalities), \
            _names("labels", labels)
        if layers is not None and not isinstance(layers, Iterable):
            raise LabError(f"density_peaks layers must be a list of layer indices or null, got {layers!r}")
        self.layers = None if layers is None else [_integer("layers", l, 0) for l in layers]
        self.k = _integer("k", k, 1)
        if isinstance(id_scale, (str, bytes, numbers.Number)) or len(list(id_scale)) != 2:
            raise LabError(f"density_peaks id_scale must be two neighbour ranks [n1, n2], got {id_scale!r}")
        self.id_scale = [_integer("id_scale", v, 1) for v in id_scale]
        if self.id_scale[0] >= self.id_scale[1]:
            raise LabError(f"density_peaks id_scale needs n1 < n2, got {self.id_scale}")
        if isinstance(Z, bool) or not isinstance(Z, numbers.Real) or not 0 < Z < math.inf:
            raise LabError(f"density_peaks Z must be a positive number, got {Z!r}")
        if isinstance(overlap_fraction, bool) or not isinstance(overlap_fraction, numbers.Real) \
                or not 0 < overlap_fraction <= 1:
            raise LabError(f"density_peaks overlap_fraction must be in (0, 1], got {overlap_fraction!r}")
        for flag, value in (("halo", halo), ("plots", plots), ("pool_modalities", pool_modalities)):
            if not isinstance(value, bool):
                raise LabError(f"density_peaks {flag} must be true or false, got {value!r}")
        self.Z, self.overlap_fraction, self.halo, self.plots = float(Z), float(overlap_fraction), halo, plots
        self.pool_modalities = pool_modalities
        self.max_points = _integer("max_points", max_points, 2)

    def __call__(self, ctx: EvalContext) -> dict:
        ctx.model.eval()
        layers = self._layers(ctx.model.n_layers)
        modalities, splits = ctx.choose_modalities(self.modalities), ctx.choose_splits(self.splits)
        collected = {(m, s): final_token_states(ctx.model, ctx.batches(s, m), layers, batch_labels)
                     for m in modalities for s in splits}
        if self.pool_modalities and len(modalities) > 1:
            # every stream's prompts as one point cloud, labelled by the stream ("modality")
            for split in splits:
                parts = [collected[(m, split)] for m in modalities]
                common = set.intersection(*(set(labels) for _, labels in parts))
                states = [np.concatenate([p[0][i] for p in parts]) for i in range(len(layers))]
                labels = {n: np.concatenate([p[1][n] for p in parts]) for n in sorted(common)}
                labels["modality"] = np.concatenate([np.full(len(p[0][0]), i) for i, p in enumerate(parts)])
                collected[("pooled", split)] = (states, labels)
        results, rows = {}, []
        for (modality, split), (states, labels) in collected.items():
            entry, entry_rows = self._analyse(states, labels, layers, f"{modality}/{split}")
            results.setdefault(modality, {})[split] = entry
            rows += [{"modality": modality, "split": split, **row} for row in entry_rows]
        payload = {"k": self.k, "id_scale": self.id_scale, "Z": self.Z, "halo": self.halo,
                   "overlap_fraction": self.overlap_fraction, "max_points": self.max_points, "results": results}
        ctx.write_json(self.name, payload)
        ctx.write_csv(self.name, _rectangular(rows))
        if self.plots:
            ctx.save_figure(self.name, profile_figure(
                {f"{m}/{s}": entry for m, splits in results.items() for s, entry in splits.items()}))
        return payload

    def _analyse(self, states, labels, layers, where: str) -> tuple[dict, list[dict]]:
        """Per-layer statistics of one point cloud per layer: the JSON entry and the CSV rows."""
        labels, dropped = self._chosen(labels)
        n_samples = len(states[0])
        if n_samples > self.max_points:
            subset = np.sort(np.random.default_rng(0).choice(n_samples, self.max_points, replace=False))
            states, labels = [s[subset] for s in states], {n: v[subset] for n, v in labels.items()}
        entry = {"layers": layers, "n_samples": len(states[0]), "labels": list(labels), "notes": [],
                 "dropped_labels": dropped,
                 **{s: [] for s in SCALAR_STATS}, **{s: {n: [] for n in labels} for s in LABEL_STATS}}
        rows = []
        for layer, X in zip(layers, states):
            start = time.perf_counter()
            X, keep = remove_duplicates(X)
            stats = landscape_statistics(X, {n: v[keep] for n, v in labels.items()}, self.k, self.id_scale,
                                         self.Z, self.halo, self.overlap_fraction)
            stats["seconds"] = time.perf_counter() - start
            entry["notes"].append(stats["note"])
            if stats["note"]:
                log.warning("density_peaks %s layer %d: %s", where, layer, stats["note"])
            for s in SCALAR_STATS:
                entry[s].append(_finite(stats[s]))
            for s in LABEL_STATS:
                for n in labels:
                    entry[s][n].append(_finite(stats[s][n]))
            rows.append({"layer": layer, **{s: stats[s] for s in SCALAR_STATS if s != "seconds"},
                         **{f"{s}_{n}": stats[s][n] for s in LABEL_STATS for n in labels},
                         "seconds": stats["seconds"], "note": stats["note"] or ""})
        return entry, rows

    def _layers(self, n_layers: int) -> list[int]:
        if self.layers is None:
            return list(range(n_layers + 1))
        bad = [l for l in self.layers if l > n_layers]
        if bad:
            raise LabError(f"density_peaks layers {bad} out of range; the model has h_0..h_{n_layers}")
        return sorted(set(self.layers))

    def _chosen(self, labels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The requested label sets (all by default) without those constant over the split, and the
        dropped ones with the reason."""
        if self.labels is not None:
            unknown = [n for n in self.labels if n not in labels and n != "modality"]  # modality: pooled entries only
            if unknown:
                raise LabError(f"density_peaks labels {unknown} not provided by the task; it has {sorted(labels)}")
            labels = {n: labels[n] for n in self.labels if n in labels}
        dropped = {n: "one class in this split (ARI and overlap undefined)" for n, v in labels.items() if len(np.unique(v)) < 2}
        return {n: v for n, v in labels.items() if n not in dropped}, dropped


def _finite(value):
    """JSON-safe: NaN becomes None."""
    return None if isinstance(value, float) and math.isnan(value) else value


def _rectangular(rows: list[dict]) -> list[dict]:
    """Rows with the union of all columns (splits may have different label sets), blanks elsewhere."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return [{c: row.get(c, "") for c in columns} for row in rows]


# ------------------------------------------------------------------------------------------ plots
def profile_figure(results_by_condition: Mapping[str, Mapping]):
    """One panel per statistic vs layer (ID, peaks, core fraction, then ARI and overlap per label
    set), one line per condition. A condition maps to one entry of ``density_peaks.json``
    (``payload["results"][modality][split]``) or to a whole payload, whose entries all become lines
    (named ``condition modality/split`` when there is more than one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    lines = {}
    for condition, value in results_by_condition.items():
        if "results" in value:
            entries = {f"{m}/{s}": e for m, splits in value["results"].items() for s, e in splits.items()}
            lines.update({condition if len(entries) == 1 else f"{condition} {name}": e for name, e in entries.items()})
        else:
            lines[condition] = value
    label_names = list(dict.fromkeys(n for entry in lines.values() for n in entry.get("labels", entry["ari"])))
    panels = [("intrinsic_dim", None, "intrinsic dimension (Gride)"), ("n_peaks", None, "density peaks"),
              ("core_fraction", None, "core fraction")]
    panels += [("ari", n, f"ARI clusters vs {n}") for n in label_names]
    panels += [("overlap", n, f"overlap with {n}") for n in label_names]
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for ax, (stat, label, title) in zip(axes.flat, panels):
        for i, (condition, entry) in enumerate(lines.items()):
            values = entry[stat] if label is None else entry[stat].get(label)
            if values is None:
                continue
            y = np.array([np.nan if v is None else v for v in values], dtype=float)
            ax.plot(entry["layers"], y, marker="o", ms=3, color=f"C{i}", label=condition)
            if stat == "overlap":  # chance, where the overlap was measured
                chance = np.array([np.nan if v is None else v for v in entry["overlap_chance"][label]], dtype=float)
                ax.plot(entry["layers"], np.where(np.isnan(y), np.nan, chance), color=f"C{i}", ls=":", lw=1)
        ax.set(title=title, xlabel="layer l (h_l, final token)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if stat in ("ari", "overlap", "core_fraction"):
            ax.set_ylim(-0.05, 1.05)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return fig
