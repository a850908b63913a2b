"""The density_peaks evaluator: Gride ID, kNN density, ADP clustering, label overlap, end to end."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import random_eval_context, compose_cfg

from lab.data.datamodule import TextDataModule
from lab.errors import LabError
from lab.eval.base import EvalContext
from lab.eval.density_peaks import (
    DensityPeaksEvaluator,
    advanced_density_peaks,
    batch_labels,
    gride_id,
    gride_log_likelihood,
    knn_log_density,
    landscape_statistics,
    nearest_neighbours,
    neighbourhood_overlap,
    overlap_chance,
    remove_duplicates,
)
from lab.eval.run import build_evaluators
from lab.models.backbone import Backbone
from tasks.retrieval import RetrievalTask


def _subspace(n: int, d: int, ambient: int = 64, seed: int = 0) -> np.ndarray:
    """n Gaussian points on a random d-dimensional linear subspace of R^ambient."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(ambient, d)))[0].T
    return rng.normal(size=(n, d)) @ basis + 5.0


def _blobs(n_blobs: int = 4, per_blob: int = 300, dim: int = 10, spread: float = 10.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_blobs, dim)) * spread
    X = np.concatenate([c + rng.normal(size=(per_blob, dim)) for c in centres])
    return X, np.repeat(np.arange(n_blobs), per_blob)


def _clusters(X, k: int = 16, Z: float = 1.6, halo: bool = True):
    distances, neighbours = nearest_neighbours(X, 100)
    log_density, errors = knn_log_density(distances, k, gride_id(distances)[0])
    return advanced_density_peaks(log_density, errors, neighbours, k, Z, halo)


# ------------------------------------------------------------------------------------ geometry
def test_nearest_neighbours_match_a_full_distance_matrix():
    X = np.random.default_rng(1).normal(size=(300, 16)) + 100.0  # far from the origin: centring matters
    distances, indices = nearest_neighbours(X, 20, chunk_size=64)
    full = np.linalg.norm(X[:, None] - X[None], axis=-1)
    np.fill_diagonal(full, np.inf)
    expected = np.argsort(full, axis=1)[:, :20]
    assert np.array_equal(indices, expected)
    assert np.allclose(distances, np.take_along_axis(full, expected, 1), rtol=1e-10, atol=0)
    with pytest.raises(ValueError):
        nearest_neighbours(X[:5], 5)


def test_remove_duplicates_keeps_first_occurrences_in_order():
    X = np.array([[1.0, 2.0], [0.0, 0.0], [1.0, 2.0], [3.0, 1.0], [0.0, 0.0]])
    unique, keep = remove_duplicates(X)
    assert keep.tolist() == [0, 1, 3]
    assert np.array_equal(unique, X[[0, 1, 3]])


@pytest.mark.parametrize("d", [2, 5])
def test_gride_finds_the_dimension_of_a_linear_subspace(d):
    distances, _ = nearest_neighbours(_subspace(2000, d), 32)
    estimate, error = gride_id(distances, 16, 32)
    assert abs(estimate - d) < 0.1 * d
    assert 0 < error < 0.05 * d
    # the estimate is the maximum of the likelihood written out from the paper
    mus = distances[:, 31] / distances[:, 15]
    grid = np.linspace(0.5 * d, 1.5 * d, 2001)
    assert abs(grid[np.argmax([gride_log_likelihood(x, mus, 16, 32) for x in grid])] - estimate) < 1e-3 * d


def test_knn_density_follows_the_true_density():
    rng = np.random.default_rng(2)
    tight, wide = rng.normal(size=(1000, 3)) * 0.5, rng.normal(size=(1000, 3)) * 2.0 + 30.0
    X = np.concatenate([tight, wide])
    distances, _ = nearest_neighbours(X, 16)
    log_density, errors = knn_log_density(distances, 16, 3.0)
    assert np.allclose(errors, 0.25)
    # each blob holds half of the mass: true log density = log(1/2) + log N(x; 0, sigma^2 I)
    sigma = np.repeat([0.5, 2.0], 1000)
    centred = X - np.repeat([[0.0] * 3, [30.0] * 3], 1000, axis=0)
    truth = np.log(0.5) - 1.5 * np.log(2 * np.pi * sigma**2) - (centred**2).sum(1) / (2 * sigma**2)
    assert log_density[:1000].mean() > log_density[1000:].mean() + 3 * np.log(2.0)  # 4^3 = 64x denser
    inner = (centred**2).sum(1) < (2 * sigma) ** 2  # away from the tails, where kNN is biased
    assert np.median(np.abs(log_density - truth)[inner]) < 0.3
    # the unit-ball volume: in 2-D, log rho = log k - log N - log(pi r^2)
    two_d = knn_log_density(np.array([[1.0, 2.0]]), 2, 2.0)[0]
    assert np.isclose(two_d[0], np.log(2) - np.log(1) - np.log(np.pi * 4.0))


# ---------------------------------------------------------------------------------- clustering
def test_adp_separates_gaussian_blobs():
    from sklearn.metrics import adjusted_rand_score

    X, labels = _blobs()
    result = _clusters(X)
    assert result.n_peaks == 4
    core = result.labels >= 0
    assert core.mean() == result.core_fraction > 0.9
    assert adjusted_rand_score(labels[core], result.labels[core]) > 0.95


def test_adp_finds_one_peak_in_one_gaussian():
    result = _clusters(np.random.default_rng(3).normal(size=(1200, 10)))
    assert result.n_peaks == 1 and result.core_fraction == 1.0  # no saddle, so no halo


def _three_bumps():
    """Points on a line with a hand-set log density: peaks A (5.0), B (3.0), C (5.0) at x = 10, 30,
    50; the A|B valley is at 2.5, the B|C valley at 2.9."""
    x = np.arange(61) + np.random.default_rng(0).uniform(-0.2, 0.2, 61)
    log_density = np.interp(x, [0, 10, 20, 30, 40, 50, 60], [3.0, 5.0, 2.5, 3.0, 2.9, 5.0, 3.0])
    return log_density, nearest_neighbours(x[:, None], 6)[1]


def test_adp_merges_the_least_significant_pair_first():
    log_density, neighbours = _three_bumps()
    # error 0.25: both of B's saddles are within Z (0.25 + 0.25) = 0.8 of it; the higher one (B|C) is
    # merged first, after which A vs B+C (saddle 2.5) is significant: two peaks, split at the A|B valley
    result = advanced_density_peaks(log_density, 0.25, neighbours, k=2, Z=1.6, halo=True)
    assert result.n_peaks == 2
    assert (result.labels[:19] == 0).all() and (result.labels[23:] == 1).all()
    halo = np.flatnonzero(result.labels == -1)
    assert set(halo) <= {19, 20, 21, 22} and len(halo) >= 1
    assert (log_density[halo] < 2.6).all()
    without_halo = advanced_density_peaks(log_density, 0.25, neighbours, k=2, Z=1.6, halo=False)
    assert without_halo.core_fraction == 1.0 and set(without_halo.labels) == {0, 1}
    # tiny errors: three significant peaks; B's points below its highest saddle (2.9) are halo
    sharp = advanced_density_peaks(log_density, 0.01, neighbours, k=2, Z=1.6, halo=True)
    assert sharp.n_peaks == 3 and sharp.labels[30] == 1 and sharp.labels[25] == -1
    # huge errors: nothing is significant
    assert advanced_density_peaks(log_density, 2.0, neighbours, k=2, Z=1.6).n_peaks == 1


# ------------------------------------------------------------------------------------- overlap
def test_neighbourhood_overlap_is_one_for_blobs_and_chance_for_random_labels():
    X, labels = _blobs(spread=10.0)
    _, neighbours = nearest_neighbours(X, 300)
    assert neighbourhood_overlap(neighbours, labels, 0.3) == pytest.approx(1.0)
    random = np.random.default_rng(4).integers(0, 3, len(labels))
    assert overlap_chance(random) == pytest.approx(np.mean([(c - 1) / 1199 for c in np.bincount(random)]))
    assert abs(neighbourhood_overlap(neighbours, random, 0.3) - overlap_chance(random)) < 0.03
    with pytest.raises(ValueError, match="neighbours"):
        neighbourhood_overlap(neighbours[:, :50], labels, 0.3)  # needs 0.3 x 300 = 90


def test_landscape_statistics_on_blobs():
    X, labels = _blobs(n_blobs=3, per_blob=100, dim=6)
    stats = landscape_statistics(X, {"blob": labels}, k=8, id_scale=(4, 8))
    assert stats["n_peaks"] == 3 and stats["ari"]["blob"] > 0.95 and stats["overlap"]["blob"] == 1.0
    assert set(stats["timings"]) == {"neighbours", "intrinsic_dim", "density", "clustering", "ari", "overlap"}
    too_few = landscape_statistics(X[:20], {"blob": labels[:20]}, k=8, id_scale=(16, 32))
    assert np.isnan(too_few["intrinsic_dim"]) and too_few["n_points"] == 20


# ----------------------------------------------------------------------------------- evaluator
@pytest.mark.parametrize("options", [
    {"k": 0}, {"k": 2.5}, {"id_scale": [32, 16]}, {"id_scale": [16]}, {"id_scale": 16}, {"Z": -1.0},
    {"Z": "big"}, {"halo": "yes"}, {"overlap_fraction": 0.0}, {"overlap_fraction": 1.5}, {"max_points": 1},
    {"labels": "answer"}, {"layers": [-1]}, {"layers": 3}, {"splits": "id"}, {"modalities": 1}, {"plots": 1},
])
def test_bad_options_are_refused(options):
    with pytest.raises(LabError):
        DensityPeaksEvaluator(**options)


def test_the_config_builds_the_evaluator_with_its_defaults():
    [evaluator] = build_evaluators(compose_cfg("evaluate", ["evaluators=[density_peaks]"]))
    assert isinstance(evaluator, DensityPeaksEvaluator)
    assert (evaluator.k, evaluator.id_scale, evaluator.Z, evaluator.halo) == (16, [16, 32], 1.6, True)
    assert (evaluator.overlap_fraction, evaluator.max_points, evaluator.layers) == (0.3, 10000, None)


@pytest.fixture(scope="module")
def tiny_context(tmp_path_factory):
    return random_eval_context(tmp_path_factory.mktemp("density_peaks"))


def test_batch_labels_of_the_retrieval_task(tiny_context):
    batch = next(tiny_context.batches("id"))
    labels = batch_labels(batch)
    assert set(labels) == {"answer", "n_objects", "query_object", "query_color", "query_shape"}
    query = batch.objects["query_object"]
    assert np.array_equal(labels["query_color"], [batch.objects["colors"][b, query[b]] for b in range(len(batch))])
    assert np.array_equal(labels["query_shape"], [batch.objects["shapes"][b, query[b]] for b in range(len(batch))])


def test_evaluator_end_to_end(tiny_context):
    ctx = tiny_context
    payload = DensityPeaksEvaluator(k=8, id_scale=[4, 8])(ctx)
    saved = json.loads((ctx.out_dir / "density_peaks.json").read_text())
    assert saved["results"].keys() == {"text"} and saved["results"]["text"].keys() == {"id", "ood"}
    query_colours = {split: set(np.concatenate([batch_labels(b)["query_color"] for b in ctx.batches(split)]))
                     for split in ("id", "ood")}
    for split, entry in saved["results"]["text"].items():
        assert entry["layers"] == [0, 1, 2] and entry["n_samples"] == 64
        assert set(entry["labels"]) == {"answer", "n_objects", "query_object", "query_color", "query_shape"}
        for stat in ("n_points", "intrinsic_dim", "n_peaks", "core_fraction", "seconds"):
            assert len(entry[stat]) == 3
        for stat in ("ari", "overlap", "overlap_chance"):
            assert entry[stat].keys() == set(entry["labels"]) and all(len(v) == 3 for v in entry[stat].values())
        # h_0 at the final token is the query colour's embedding (RoPE adds no position to h_0):
        # duplicates removed, one point per distinct colour
        assert entry["n_points"][0] == len(query_colours[split])
        assert entry["n_points"][1] == entry["n_points"][2] == 64
        assert all(v is not None and v > 0 for v in entry["intrinsic_dim"])
        assert all(1 <= p <= 64 for p in entry["n_peaks"]) and all(0 < f <= 1 for f in entry["core_fraction"])
    assert payload["results"]["text"]["id"]["n_peaks"] == saved["results"]["text"]["id"]["n_peaks"]
    with (ctx.out_dir / "density_peaks.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["split"], r["layer"]) for r in rows] == [(s, str(l)) for s in ("id", "ood") for l in range(3)]
    assert {"ari_answer", "overlap_query_color", "overlap_chance_n_objects", "intrinsic_dim"} <= set(rows[0])
    assert (ctx.out_dir / "density_peaks.png").stat().st_size > 0


def test_evaluator_reports_too_few_points_and_checks_layers_and_labels(tiny_context):
    ctx = tiny_context
    payload = DensityPeaksEvaluator(layers=[0, 2], labels=["answer"], splits=["id"], plots=False)(ctx)
    entry = payload["results"]["text"]["id"]
    assert entry["layers"] == [0, 2] and entry["labels"] == ["answer"]
    # h_0 has fewer distinct points than the 32 neighbours the default ID scale needs
    assert entry["intrinsic_dim"][0] is None and entry["ari"]["answer"][0] is None
    assert entry["intrinsic_dim"][1] is not None
    with pytest.raises(LabError, match="out of range"):
        DensityPeaksEvaluator(layers=[3])(ctx)
    with pytest.raises(LabError, match="not provided"):
        DensityPeaksEvaluator(labels=["topic"])(ctx)


def test_bad_layers_are_reported_with_the_reason():
    from lab.eval.density_peaks import landscape_statistics

    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 8))
    labels = {"a": rng.integers(0, 3, 200)}
    X[5, 2] = np.nan
    broken = landscape_statistics(X, labels)
    assert np.isnan(broken["intrinsic_dim"]) and "non-finite" in broken["note"]
    few = landscape_statistics(rng.normal(size=(20, 8)), {"a": rng.integers(0, 3, 20)})
    assert np.isnan(few["n_peaks"]) and "only 20 distinct points" in few["note"]
    assert landscape_statistics(rng.normal(size=(200, 8)), labels)["note"] is None


def test_one_class_label_sets_are_dropped_with_the_reason():
    evaluator = DensityPeaksEvaluator()
    kept, dropped = evaluator._chosen({"same": np.zeros(10), "varies": np.arange(10)})
    assert list(kept) == ["varies"] and "one class" in dropped["same"]


def test_streams_are_pooled_with_a_modality_label(tmp_path):
    """Two data streams (here the same text prompts twice) give an extra ``pooled`` entry whose
    points carry the stream as the label ``modality``."""
    from lab.models.backbone import Backbone
    from tasks.retrieval import RetrievalTask

    torch.manual_seed(0)
    task = RetrievalTask(eval_size=48)
    model = Backbone(vocab_size=len(task.vocab), n_layers=1, d_model=16, n_heads=2, d_ff=32).eval()
    data = TextDataModule(task, eval_batch_size=48)
    ctx = EvalContext(model=model, task=task, data={"text": data, "copy": data}, out_dir=tmp_path)
    results = DensityPeaksEvaluator(splits=["id"], plots=False)(ctx)["results"]
    pooled = results["pooled"]["id"]
    assert set(results) == {"text", "copy", "pooled"} and "modality" in pooled["labels"]
    assert pooled["n_samples"] == 96 and "modality" not in results["text"]["id"]["labels"]
