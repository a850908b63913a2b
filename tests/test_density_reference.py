"""The lab's density-peak statistics agree with DADApy 0.3.4 (the authors' library) on committed
fixtures: a Gaussian mixture, a swiss roll in 128 dims and one layer of a trained lab model.
DADApy cannot enter the lab's environment (numpy < 2, jax); the reference values were produced
in a separate one by tests/fixtures/density/make_reference.py (see the README there)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from lab.eval.density_peaks import ADP_NEIGHBOURS, advanced_density_peaks, gride_id, knn_log_density, nearest_neighbours

FIXTURES = Path(__file__).parent / "fixtures" / "density"
REFERENCE = json.loads((FIXTURES / "reference.json").read_text())


@pytest.fixture(scope="module", params=sorted(REFERENCE["fixtures"]))
def case(request):
    reference = REFERENCE["fixtures"][request.param]
    X = np.load(FIXTURES / f"{request.param}.npy").astype(np.float64)
    distances, indices = nearest_neighbours(X, ADP_NEIGHBOURS)
    return request.param, reference, distances, indices


def test_gride_id_within_two_percent(case):
    _, reference, distances, _ = case
    d, _ = gride_id(distances, 16, 32)
    assert abs(d - reference["gride"]["id"]) <= 0.02 * reference["gride"]["id"]


def test_knn_density_matches(case):
    _, reference, distances, _ = case
    density = reference["density_knn"]
    log_density, errors = knn_log_density(distances, 16, density["intrinsic_dim_used"])
    np.testing.assert_allclose(log_density, density["log_den"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(errors, density["log_den_err"])


@pytest.mark.parametrize("halo", [False, True])
def test_adp_clusters_match(case, halo):
    name, reference, distances, indices = case
    log_density, errors = knn_log_density(distances, 16, reference["density_knn"]["intrinsic_dim_used"])
    ours = advanced_density_peaks(log_density, errors, indices, k=16, Z=1.6, halo=halo)
    theirs = reference["adp"]["halo_on" if halo else "halo_off"]
    assert ours.n_peaks == theirs["n_clusters"], name
    assert adjusted_rand_score(theirs["labels"], ours.labels) >= 0.99, name
    assert abs(ours.core_fraction - theirs["core_fraction"]) < 0.01, name
