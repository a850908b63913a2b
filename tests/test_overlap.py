"""Neighbourhood overlap between layers and with labels: known answers and the evaluator."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import random_eval_context, compose_cfg

from lab.errors import LabError
from lab.eval.neighbours import nearest_neighbours
from lab.eval.overlap import OverlapEvaluator, data_overlap, label_overlap, overlap_matrix
from lab.eval.run import build_evaluators


def test_data_overlap_counts_shared_neighbours():
    a = np.array([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])
    assert data_overlap(a, a) == 1.0
    b = np.array([[1, 2, 0], [2, 3, 1], [3, 0, 2], [0, 1, 2]])  # rows share 2, 2, 2, 3 of 3 (order ignored)
    assert data_overlap(a, b) == pytest.approx((2 + 2 + 2 + 3) / 12)
    assert data_overlap(np.array([[1, 2]]), np.array([[3, 4]])) == 0.0


def test_overlap_is_one_under_rotation_and_scaling_and_low_for_a_shuffle():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 10))
    rotated = 3.0 * X @ np.linalg.qr(rng.normal(size=(10, 10)))[0]
    tables = [nearest_neighbours(Y, 30)[1] for Y in (X, rotated, X[rng.permutation(400)])]
    matrix = overlap_matrix(tables + [None])
    assert matrix[0, 1] == pytest.approx(1.0) and matrix[0, 2] < 0.2 and np.isnan(matrix[3]).all()
    assert np.allclose(matrix, matrix.T, equal_nan=True)


def test_label_overlap_weights_classes_equally():
    labels = np.array([0, 0, 0, 1])
    neighbours = np.array([[1], [2], [3], [0]])  # class 0: 2 of 3 points agree; class 1: none
    assert label_overlap(neighbours, labels) == pytest.approx((2 / 3 + 0) / 2)
    assert label_overlap(neighbours, labels, weighted=False) == pytest.approx(2 / 4)


@pytest.fixture(scope="module")
def tiny_context(tmp_path_factory):
    return random_eval_context(tmp_path_factory.mktemp("overlap"))


def test_evaluator_end_to_end(tiny_context):
    ctx = tiny_context
    OverlapEvaluator(k=10)(ctx)
    saved = json.loads((ctx.out_dir / "overlap.json").read_text())
    for split, entry in saved["results"]["text"].items():
        assert entry["layers"] == [0, 1, 2] and entry["n_points"] == 64
        matrix = entry["matrix"]
        assert len(matrix) == 3 and matrix[1][1] == 1.0 and 0 < matrix[1][2] <= 1
        assert entry["consecutive"] == [matrix[0][1], matrix[1][2]]
        if entry["distinct_points"][0] < 11:  # h_0: one point per query colour
            assert matrix[0][1] is None and "distinct points" in entry["notes"][0]
        assert set(entry["labels"]) >= {"answer", "query_color"} and entry["chance"]["answer"] > 0
    with (ctx.out_dir / "overlap.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 9 and {"layer", "other_layer", "overlap", "label_answer"} <= set(rows[0])
    assert (ctx.out_dir / "overlap.png").stat().st_size > 0
    with pytest.raises(LabError, match="has 64 prompts"):
        OverlapEvaluator(k=64)(ctx)


@pytest.mark.parametrize("options", [{"k": 0}, {"k": 2.0}, {"labels": "answer"}, {"plots": "no"}, {"seed": -1}])
def test_bad_options_are_refused(options):
    with pytest.raises(LabError):
        OverlapEvaluator(**options)


def test_the_config_builds_the_evaluator():
    [evaluator] = build_evaluators(compose_cfg("evaluate", ["evaluators=[overlap]"]))
    assert isinstance(evaluator, OverlapEvaluator) and evaluator.k == 30
