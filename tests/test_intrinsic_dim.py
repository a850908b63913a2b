"""TwoNN, its decimation, multiscale Gride and reading an ID profile, on known answers."""
from __future__ import annotations

import numpy as np
import pytest

from lab.eval.intrinsic_dim import gride_scaling, peak_then_minimum, stable_scale, twonn_decimation, twonn_id
from lab.eval.neighbours import nearest_neighbours


def _subspace(n: int, d: int, ambient: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(ambient, d)))[0].T
    return rng.uniform(size=(n, d)) @ basis


@pytest.mark.parametrize("d", [2, 6])
def test_twonn_and_gride_find_the_dimension_of_a_flat_cloud(d):
    X = _subspace(3000, d)
    distances, _ = nearest_neighbours(X, 16)
    assert abs(twonn_id(distances) - d) < 0.1 * d
    assert abs(twonn_id(distances, fraction=1.0) - d) < 0.1 * d
    scales = gride_scaling(distances, 16)
    assert scales["n2"] == [2, 4, 8, 16] and len(scales["id"]) == len(scales["error"]) == 4
    assert all(abs(v - d) < 0.15 * d for v in scales["id"])
    assert all(0 < e < 0.1 * d for e in scales["error"])
    assert scales["scale"] == sorted(scales["scale"])  # farther neighbours, larger scale


def test_twonn_is_the_slope_of_the_paper_fit():
    """log mu against -log(1 - F(mu)) through the origin, on the 98% smallest ratios."""
    distances = np.array([[1.0, r] for r in np.linspace(1.01, 3.0, 200)])
    log_mu = np.sort(np.log(distances[:, 1]))[:196]
    y = -np.log(1 - np.arange(1, 197) / 200)
    slope = np.linalg.lstsq(log_mu[:, None], y, rcond=None)[0][0]
    assert twonn_id(distances) == pytest.approx(slope, rel=1e-12)


def test_decimation_halves_the_points_and_repeats_to_cover_them():
    X = _subspace(1000, 3)
    out = twonn_decimation(X, min_points=50)
    assert out["n_points"] == [1000, 500, 250, 125, 62]
    assert out["repeats"] == [1, 2, 4, 8, 16]
    assert out["error"][0] == 0.0 and all(e > 0 for e in out["error"][1:])
    assert all(abs(v - 3) < 0.6 for v in out["id"])
    assert out["scale"] == sorted(out["scale"])  # sparser subsets, farther neighbours
    assert twonn_decimation(X, min_points=50) == out  # seeded


def test_the_stable_scale_is_where_the_id_changes_least():
    ids = np.array([[9.0, 6.0, 4.0, 4.1, 4.0, 1.0],
                    [8.0, 5.0, 3.0, 3.0, 3.1, 0.5],
                    [np.nan] * 6])
    assert stable_scale(ids) == 3
    assert stable_scale(ids[:, :2]) == 1 and stable_scale(np.full((2, 4), np.nan)) == 3


@pytest.mark.parametrize("profile, expected", [
    ([np.nan, 5.0, 9.0, 6.0, 7.0, 4.0], (2, 3)),       # rise, peak, first minimum, then more
    ([np.nan, 5.0, 9.0, 8.0, 6.0], (2, 4)),            # falls to the end: the last layer
    ([3.0, 2.0, 1.0], (0, 2)),                         # starts at its peak
    ([1.0, 2.0, 3.0], (None, None)),                   # rises throughout: no peak
    ([np.nan, np.nan], (None, None)),
])
def test_peak_then_minimum(profile, expected):
    assert peak_then_minimum(profile) == expected
