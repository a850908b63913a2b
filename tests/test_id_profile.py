"""The id_profile evaluator end to end: settings checked first, JSON/CSV/PNG, notes for h_0."""
from __future__ import annotations

import csv
import json

import pytest
from conftest import random_eval_context, compose_cfg

from lab.errors import LabError
from lab.eval.id_profile import IdProfileEvaluator
from lab.eval.run import build_evaluators


@pytest.fixture(scope="module")
def tiny_context(tmp_path_factory):
    return random_eval_context(tmp_path_factory.mktemp("id_profile"), eval_size=96)


def test_evaluator_end_to_end(tiny_context):
    ctx = tiny_context
    payload = IdProfileEvaluator(range_max=32, probes=["shape", "item"])(ctx)
    saved = json.loads((ctx.out_dir / "id_profile.json").read_text())
    assert saved["results"].keys() == {"text"} and saved["results"]["text"].keys() == {"id", "ood"}
    for split, entry in saved["results"]["text"].items():
        assert entry["layers"] == [0, 1, 2] and entry["n_points"] == 96 and entry["gride"]["n2"] == [2, 4, 8, 16, 32]
        # h_0 at the final token: one point per query colour, too few for the scales
        assert entry["distinct_points"][0] < 33 and "distinct points" in entry["notes"][0]
        assert entry["profile"]["id"][0] is None and entry["twonn"]["id"][0] is None
        assert all(v > 0 for v in entry["profile"]["id"][1:]) and all(v > 0 for v in entry["twonn"]["id"][1:])
        assert entry["chosen_n2"] in entry["gride"]["n2"]
        decimated = entry["twonn"]["decimation"][1]
        assert decimated["n_points"][:2] == [96, 48] and decimated["repeats"][:2] == [1, 2]
        assert set(entry["label_overlap"]) >= {"answer", "query_color", "query_shape"}
        assert all(0 <= v <= 1 for v in entry["label_overlap"]["answer"][1:])
        assert set(entry["probe_accuracy"]) == {"shape", "item"} and len(entry["probe_accuracy"]["item"]) == 3
        assert entry["best_layer"]["probe_item"] in (0, 1, 2)
    assert payload["results"]["text"]["id"]["chosen_n2"] == saved["results"]["text"]["id"]["chosen_n2"]
    with (ctx.out_dir / "id_profile.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["split"], r["layer"]) for r in rows] == [(s, str(l)) for s in ("id", "ood") for l in range(3)]
    assert {"twonn_id", "gride_id", "gride_id_n2_32", "overlap_answer", "probe_item", "first_minimum"} <= set(rows[0])
    assert (ctx.out_dir / "id_profile.png").stat().st_size > 0


def test_settings_are_checked_before_the_model_runs(tiny_context, monkeypatch):
    def no_run(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(tiny_context.model, "run", no_run)
    with pytest.raises(LabError, match="has 96 prompts; its settings need at least 129"):
        IdProfileEvaluator(range_max=128)(tiny_context)
    with pytest.raises(LabError, match="not provided"):
        IdProfileEvaluator(labels=["topic"])(tiny_context)
    with pytest.raises(LabError, match="out of range"):
        IdProfileEvaluator(layers=[3])(tiny_context)


@pytest.mark.parametrize("options", [
    {"fraction": 0.0}, {"fraction": 1.5}, {"range_max": 2}, {"decimation": "yes"}, {"overlap_k": 0},
    {"probes": ["colour"]}, {"probes": "shape"}, {"layers": [-1]}, {"max_points": 1}, {"splits": "id"},
])
def test_bad_options_are_refused(options):
    with pytest.raises(LabError):
        IdProfileEvaluator(**options)


def test_the_config_builds_the_evaluator_with_its_defaults():
    [evaluator] = build_evaluators(compose_cfg("evaluate", ["evaluators=[id_profile]"]))
    assert isinstance(evaluator, IdProfileEvaluator)
    assert (evaluator.fraction, evaluator.range_max, evaluator.overlap_k, evaluator.decimation) == (0.98, 64, 30, True)
    assert evaluator.probes == ["slot", "association_slot", "shape", "item"]
