"""The lab's intrinsic dimension (TwoNN, decimation, multiscale Gride) and overlaps (between layers,
with labels) agree with DADApy 0.3.4 on committed fixtures: a Gaussian mixture, a swiss roll in
128 dims, one layer of a trained model, and the four layers of a converged one (layers.npz). The
reference values were made once in DADApy's own environment by
tests/fixtures/density/make_reference.py --geometry-only (see the README there)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lab.eval.density_peaks import neighbourhood_overlap
from lab.eval.intrinsic_dim import gride_scaling, twonn_decimation, twonn_id
from lab.eval.neighbours import nearest_neighbours
from lab.eval.overlap import label_overlap, overlap_matrix

FIXTURES = Path(__file__).parent / "fixtures" / "density"
REFERENCE = json.loads((FIXTURES / "reference_geometry.json").read_text())
LAYERS = np.load(FIXTURES / "layers.npz")


def _clouds():
    """(name, points, labels or None, reference) of every fixture and every layer of layers.npz."""
    for name, ref in REFERENCE["fixtures"].items():
        labels = np.load(FIXTURES / f"{name}_labels.npy") if "label_overlap" in ref else None
        yield name, np.load(FIXTURES / f"{name}.npy").astype(np.float64), {"labels": labels} if labels is not None else {}, ref
    for name, ref in REFERENCE["layers"]["per_layer"].items():
        labels = {n: LAYERS[n] for n in ref["label_overlap"]}
        yield f"layers.{name}", LAYERS[name].astype(np.float64), labels, ref


@pytest.fixture(scope="module", params=list(_clouds()), ids=lambda c: c[0])
def cloud(request):
    name, X, labels, ref = request.param
    distances, indices = nearest_neighbours(X, 64)
    return name, X, labels, ref, distances, indices


def test_twonn_matches(cloud):
    _, _, _, ref, distances, _ = cloud
    assert twonn_id(distances) == pytest.approx(ref["twonn"]["id"], rel=1e-6)
    assert twonn_id(distances, fraction=1.0) == pytest.approx(ref["twonn_ml"]["id"], rel=1e-12)


def test_twonn_decimation_draws_the_same_subsets(cloud):
    _, X, _, ref, _, _ = cloud
    ours, theirs = twonn_decimation(X), ref["twonn_decimation"]
    assert ours["n_points"] == theirs["n_points"]
    np.testing.assert_allclose(ours["id"], theirs["id"], rtol=1e-6)
    np.testing.assert_allclose(ours["error"], theirs["error"], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(ours["scale"], theirs["scale"], rtol=1e-10)


def test_gride_scales_match(cloud):
    """Gride's likelihood in DADApy has N - 1 where the product over points gives N: the IDs
    differ by about 1/N relative, the errors (Fisher information) agree."""
    _, X, _, ref, distances, _ = cloud
    ours, theirs = gride_scaling(distances, 64), ref["gride_scaling"]
    assert ours["n2"] == theirs["n2"]
    np.testing.assert_allclose(ours["id"], theirs["id"], rtol=2.0 / len(X))
    np.testing.assert_allclose(ours["error"], theirs["error"], rtol=2.0 / len(X))
    np.testing.assert_allclose(ours["scale"], theirs["scale"], rtol=1e-10)


def test_label_overlaps_match(cloud):
    _, X, labels, ref, _, indices = cloud
    if not labels:
        pytest.skip("continuous labels")
    wide = nearest_neighbours(X, int(0.3 * max(np.bincount(v).max() for v in labels.values())))[1]
    for name, values in labels.items():
        assert label_overlap(indices, values, 30) == pytest.approx(ref["label_overlap"][name]["k30"], abs=1e-12)
        assert neighbourhood_overlap(wide, values, 0.3) == pytest.approx(ref["label_overlap"][name]["fraction_0.3"],
                                                                         abs=1e-12)


def test_data_overlap_between_layers_matches():
    ref = REFERENCE["layers"]
    tables = [nearest_neighbours(LAYERS[n].astype(np.float64), 30)[1] for n in ref["layers"]]
    np.testing.assert_allclose(overlap_matrix(tables), ref["data_overlap"]["matrix"], atol=1e-12)
