"""Statistics comparing layer scores: correlations with p-values and bootstrap confidence
intervals over samples, and the ranking audit (pairwise misordering, rank confusion matrix)."""
from __future__ import annotations

import itertools
import math
from typing import Callable

import numpy as np
from scipy import stats as sps

CORRELATIONS = ("pearson", "spearman", "kendall")


def _finite(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def correlation(x: np.ndarray, y: np.ndarray, kind: str) -> tuple[float, float]:
    """(coefficient, two-sided p-value); NaN when fewer than 3 points or a constant input."""
    x, y = _finite(np.asarray(x, float), np.asarray(y, float))
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    fn = {"pearson": sps.pearsonr, "spearman": sps.spearmanr, "kendall": sps.kendalltau}[kind]
    result = fn(x, y)
    return float(result[0]), float(result[1])


def correlations(x: np.ndarray, y: np.ndarray) -> dict[str, dict[str, float]]:
    return {kind: dict(zip(("r", "p"), correlation(x, y, kind))) for kind in CORRELATIONS}


def bootstrap_correlations(
    per_layer: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    n_samples: int,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, float]]:
    """Percentile bootstrap CIs of the correlations, resampling samples with replacement.

    ``per_layer(index)`` recomputes the two per-layer score vectors from the samples ``index``.
    """
    rng = np.random.default_rng(seed)
    draws = {kind: [] for kind in CORRELATIONS}
    for _ in range(n_boot):
        idx = rng.integers(0, n_samples, n_samples)
        x, y = per_layer(idx)
        for kind in CORRELATIONS:
            draws[kind].append(correlation(x, y, kind)[0])
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out = {}
    for kind, values in draws.items():
        v = np.asarray(values, float)
        v = v[np.isfinite(v)]
        out[kind] = {
            "ci_low": float(np.percentile(v, lo)) if len(v) else math.nan,
            "ci_high": float(np.percentile(v, hi)) if len(v) else math.nan,
            "n_valid": int(len(v)),
        }
    return out


def ranking_audit(score: np.ndarray, reference: np.ndarray, tol: float = 1e-9) -> dict:
    """How often ``score`` orders layer pairs differently from ``reference`` (e.g. cosine vs
    accuracy relevance; higher = more relevant for both).

    A pair is *misordered* when both scores are untied and their orders disagree. Pairs tied in
    the reference (e.g. two blocks whose removal costs nothing) are counted separately, as are
    pairs tied only in ``score``.
    """
    score, reference = np.asarray(score, float), np.asarray(reference, float)
    layers = [i for i in range(len(score)) if np.isfinite(score[i]) and np.isfinite(reference[i])]
    misordered, concordant, ref_ties, score_ties, pairs = 0, 0, 0, 0, []
    for i, j in itertools.combinations(layers, 2):
        dr, ds = reference[i] - reference[j], score[i] - score[j]
        if abs(dr) <= tol:
            ref_ties += 1
            continue
        if abs(ds) <= tol:
            score_ties += 1
            continue
        if np.sign(dr) != np.sign(ds):
            misordered += 1
            pairs.append([i, j])
        else:
            concordant += 1
    ordered = misordered + concordant
    return {
        "n_layers": len(layers),
        "n_pairs": len(layers) * (len(layers) - 1) // 2,
        "n_ordered_pairs": ordered,
        "n_misordered": misordered,
        "fraction_misordered": misordered / ordered if ordered else math.nan,
        "n_reference_ties": ref_ties,
        "n_score_ties": score_ties,
        "misordered_pairs": pairs,
    }


def ranks(values: np.ndarray) -> np.ndarray:
    """Rank 0 = most relevant (largest value); ties broken by layer index; NaN layers last."""
    v = np.asarray(values, float)
    key = np.where(np.isfinite(v), -v, np.inf)
    order = np.lexsort((np.arange(len(v)), key))
    r = np.empty(len(v), int)
    r[order] = np.arange(len(v))
    return r


def rank_confusion(score: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """M[a, b] = 1 when some layer has rank a by ``reference`` and rank b by ``score``
    (a permutation matrix; the identity when the rankings agree)."""
    ra, rb = ranks(reference), ranks(score)
    m = np.zeros((len(ra), len(ra)), int)
    m[ra, rb] = 1
    return m


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial rate (well behaved at rates of 0 and 1); NaN when n = 0."""
    if n == 0:
        return math.nan, math.nan
    z = float(sps.norm.ppf(0.5 + level / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
