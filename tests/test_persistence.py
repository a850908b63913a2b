"""Zigzag persistence across layers: synthetic clouds whose cycle persists through known layers and
breaks (or is replaced) at a known one, and the evaluator end to end. Needs the optional
geometry dependencies (gudhi, dionysus)."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conftest import random_eval_context

pytest.importorskip("gudhi")
pytest.importorskip("dionysus")

from lab.data.datamodule import TextDataModule  # noqa: E402
from lab.errors import LabError  # noqa: E402
from lab.eval.persistence import PersistenceEvaluator, flag_complex, layer_persistence, persistence_summary  # noqa: E402
from lab.models.backbone import Backbone  # noqa: E402
from tasks.retrieval import RetrievalTask  # noqa: E402

N = 60
ANGLES = np.linspace(0, 2 * np.pi, N, endpoint=False) + np.random.default_rng(0).uniform(0, 0.02, N)


def _ring(order=None, scale=1.0, turn=0.0):
    """Points on a circle in 8 dims; a rotated and scaled copy keeps every neighbourhood."""
    t = (ANGLES if order is None else ANGLES[order]) + turn
    return np.concatenate([scale * np.stack([np.cos(t), np.sin(t)], 1), np.zeros((N, 6))], 1)


def _line():
    return np.concatenate([ANGLES[:, None], np.zeros((N, 7))], 1)


def test_a_ring_gives_one_cycle():
    simplices = flag_complex(_ring(), k=5, max_dim=4)
    assert {(i,) for i in range(N)} <= simplices and max(len(s) for s in simplices) <= 5
    summary, _ = layer_persistence([_ring()], k=5)
    assert [b[0] for b in summary["betti"]] == [1, 1, 0, 0]


def test_a_cycle_persists_through_layers_0_to_2_and_breaks_at_3():
    states = [_ring(), _ring(scale=2.0, turn=0.3), _ring(scale=0.5), _line(), _line()]
    summary, bars = layer_persistence(states, k=5)
    assert summary["betti"][1] == [1, 1, 1, 0, 0] and summary["betti"][0] == [1] * 5
    assert summary["psim"][1][0] == [1, 1, 1, 0, 0]
    assert summary["similarity"][1][0][2] == 1.0 and summary["similarity"][1][0][3] == 0.0
    assert summary["ilp"][1][:3] == [1.0, 0.0, 0.0] and np.isnan(summary["ilp"][1][3])  # alpha = 2
    assert summary["average_similarity"] == [1.0, 1.0, 0.5, 1.0]  # S_0 = 1; S_1 = 1, 1, 0 (none at 3)
    assert [(p, b) for p, b, d in bars if p == 1] == [(1, 0.0)]


def test_a_cycle_replaced_by_another_is_two_bars():
    """Layer 3 is again a ring, but of the points in another order: the same Betti numbers, yet the
    old cycle dies and a new one is born, which only the zigzag sees."""
    order = np.random.default_rng(1).permutation(N)
    states = [_ring(), _ring(), _ring(), _ring(order), _ring(order, scale=3.0)]
    summary, bars = layer_persistence(states, k=5)
    assert summary["betti"][1] == [1, 1, 1, 1, 1]
    assert summary["psim"][1][0] == [1, 1, 1, 0, 0] and summary["psim"][1][3] == [0, 0, 0, 1, 1]
    assert summary["similarity"][1][2][3] == 0.0 and summary["similarity"][1][3][4] == 1.0
    assert sorted(b for p, b, d in bars if p == 1) == [0.0, 6.0]


def test_a_cycle_born_late():
    summary, _ = layer_persistence([_line(), _line(), _ring(), _ring()], k=5)
    assert summary["betti"][1] == [0, 0, 1, 1] and np.isnan(summary["similarity"][1][0][1])


def test_summary_of_hand_made_bars():
    bars = [(0, 0.0, float("inf")), (1, 0.0, 5.0), (1, 2.0, 3.0), (1, 3.0, 7.0)]  # alive at 0-2, 1, 2-3
    summary = persistence_summary(bars, 4, max_dim=2, alpha=1)
    assert summary["betti"][1] == [1, 2, 2, 1]
    assert summary["psim"][1][1] == [0, 2, 1, 0] and summary["psim"][1][2] == [0, 0, 2, 1]
    assert summary["similarity"][1][1][2] == 0.5 and np.isnan(summary["similarity"][1][2][1])
    assert summary["ilp"][1][:3] == [1.0, 0.5, 0.5] and np.isnan(summary["ilp"][1][3])


@pytest.fixture(scope="module")
def tiny_context(tmp_path_factory):
    return random_eval_context(tmp_path_factory.mktemp("persistence"))


def test_evaluator_end_to_end(tiny_context):
    ctx = tiny_context
    PersistenceEvaluator(max_dim=3)(ctx)
    saved = json.loads((ctx.out_dir / "persistence.json").read_text())
    for split, entry in saved["results"]["text"].items():
        assert entry["layers"] == [1, 2] and entry["left_out"] == [0] and "repeated" in entry["notes"][0]
        assert len(entry["betti"]) == 3 and entry["betti"][0][0] >= 1 and len(entry["average_similarity"]) == 1
        assert all(b["dim"] < 3 for b in entry["bars"])
    with (ctx.out_dir / "persistence.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {"betti_0", "betti_2", "average_similarity_next", "ilp_1"} <= set(rows[0])
    assert (ctx.out_dir / "persistence.png").stat().st_size > 0


@pytest.mark.parametrize("options", [{"k": 0}, {"max_dim": 0}, {"alpha": 0}, {"max_points": 1}])
def test_bad_options_are_refused(options):
    with pytest.raises(LabError):
        PersistenceEvaluator(**options)


def test_pruning_by_persistence(tiny_context, tmp_path):
    from dataclasses import replace

    from lab.eval.pruning import PruningEvaluator

    ctx = replace(tiny_context, out_dir=tmp_path)
    results = PruningEvaluator(criteria=["persistence", "cosine"], random_repeats=1)(ctx)
    curves = {(c["criterion"], c["mode"]): c for c in results["text"]["skip"]}
    assert set(curves) == {("persistence", "iterative"), ("persistence", "one_shot"), ("cosine", "iterative"),
                           ("cosine", "one_shot")}
    for mode in ("iterative", "one_shot"):
        removed = curves["persistence", mode]["removed"]
        assert len(removed) == 1 and removed[0] in (0, 1)
        assert len(curves["persistence", mode]["accuracy"]["id"]) == 2
    # block 0 reads h_0, whose repeated states have no complex: it is pruned last
    assert curves["persistence", "one_shot"]["trace"][0]["order"] == [1, 0]
    assert (tmp_path / "pruning.json").exists()
