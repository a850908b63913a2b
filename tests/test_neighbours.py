"""The shared neighbour search: float32 screening, float64 decisions, equal to the plain search."""
from __future__ import annotations

import numpy as np
import pytest

from lab.eval import neighbours as nb
from lab.eval.neighbours import knn_with_label_counts, nearest_neighbours


def _plain(X, k):
    """Every distance in float64 (centred, as the search), a stable sort, the first k."""
    X = np.asarray(X, dtype=np.float64)
    X = X - X.mean(0)
    full = np.sqrt(((X[:, None] - X[None]) ** 2).sum(-1))
    np.fill_diagonal(full, np.inf)
    order = np.argsort(full, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(full, order, 1), order


@pytest.mark.parametrize("n, dim, k", [(300, 16, 20), (500, 128, 60), (40, 3, 39)])
def test_equals_the_plain_search(n, dim, k):
    X = np.random.default_rng(n).normal(size=(n, dim)) * np.random.default_rng(1).uniform(0.1, 3, dim) + 50.0
    distances, indices = nearest_neighbours(X, k, chunk_size=64)
    expected_d, expected_i = _plain(X, k)
    assert np.array_equal(indices, expected_i)
    np.testing.assert_allclose(distances, expected_d, rtol=1e-10)


def test_exact_ties_go_to_the_lower_index():
    """Integer grid points: many equal distances, ordered by index as a stable sort orders them."""
    X = np.stack(np.meshgrid(np.arange(6), np.arange(6), np.arange(4)), -1).reshape(-1, 3).astype(float)
    X = X[np.random.default_rng(0).permutation(len(X))]
    for k in (6, 26):
        assert np.array_equal(nearest_neighbours(X, k)[1], _plain(X, k)[1])


def test_near_ties_beyond_the_spare_candidates_are_settled_in_float64(monkeypatch):
    """A point at the centre of 300 points on a sphere sees them all at (nearly) the same distance,
    closer than float32 can tell apart: its row is searched again in float64."""
    rng = np.random.default_rng(2)
    sphere = rng.normal(size=(300, 64))
    sphere /= np.linalg.norm(sphere, axis=1, keepdims=True)
    X = np.concatenate([np.zeros((1, 64)), sphere * (1 + 1e-9 * rng.normal(size=(300, 1)))])
    calls = []
    exact_rows = nb._exact_rows
    monkeypatch.setattr(nb, "_exact_rows", lambda *a: calls.append(a[2]) or exact_rows(*a))
    distances, indices = nearest_neighbours(X, 10)
    assert calls and 0 in np.concatenate(calls)
    assert np.array_equal(indices[0], _plain(X, 10)[1][0])


def test_without_sampled_products_the_pairs_are_gathered(monkeypatch):
    import torch

    def missing(*args, **kwargs):
        raise RuntimeError("not in this build")

    X = np.random.default_rng(6).normal(size=(300, 12))
    expected = nearest_neighbours(X, 9)
    monkeypatch.setattr(torch.sparse, "sampled_addmm", missing)
    found = nearest_neighbours(X, 9)
    assert np.array_equal(found[1], expected[1]) and np.allclose(found[0], expected[0], rtol=1e-12)


def test_huge_values_are_screened_in_float64():
    X = np.random.default_rng(3).normal(size=(200, 8)) * 1e20
    assert np.array_equal(nearest_neighbours(X, 15)[1], _plain(X, 15)[1])


def test_same_label_counts_equal_the_plain_count():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(600, 24)) + np.repeat(rng.normal(size=(3, 24)) * 2, 200, axis=0)
    labels = {"blob": np.repeat(np.arange(3), 200), "random": rng.integers(0, 4, 600)}
    ks = {"blob": np.full(600, 60), "random": rng.integers(1, 300, 600)}
    _, _, counts = knn_with_label_counts(X, 10, {n: (labels[n], ks[n]) for n in labels}, chunk_size=100)
    _, order = _plain(X, 599)
    for name, values in labels.items():
        within = np.arange(599) < ks[name][:, None]
        assert np.array_equal(counts[name], ((values[order] == values[:, None]) & within).sum(1)), name


def test_bad_requests_are_refused():
    X = np.random.default_rng(5).normal(size=(5, 2))
    with pytest.raises(ValueError, match="k <= N - 1"):
        nearest_neighbours(X, 5)
    with pytest.raises(ValueError, match="label set"):
        knn_with_label_counts(X, 2, {"a": (np.zeros(5), np.full(5, 5))})
