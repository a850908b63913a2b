"""The snowball construction: cosine ranks the tiny-but-crucial block below the loud-but-useless one."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lab.errors import LabError
from lab.eval.layer_relevance import score_split
from lab.eval.pruning import prune_order
from lab.eval.relevance import Ablator, halves
from lab.models.snowball import AMPLIFIER, LOUD, TINY, SnowballModel

ROOT = Path(__file__).resolve().parents[1]


def _score(model, n=128):
    task, data = model.evaluation_data(128, n_samples=n)
    calib, evaluation, mask = halves(data["text"].eval_batches("id"))
    r = task.chance_accuracy(None)
    return score_split(model, calib, evaluation, r, r, operators=["skip", "mean"], n_boot=10), calib


@pytest.mark.parametrize("epsilon", [1e-2, 1e-3, 1e-5])
def test_cosine_ranks_the_crucial_block_below_the_useless_one(epsilon):
    model = SnowballModel(epsilon=epsilon)
    res, _ = _score(model)
    assert res["full"]["accuracy"] == 1.0
    sims = res["similarity"]
    # The tiny block's cosine score is arbitrarily small (~ epsilon^2 / 2|h|^2) ...
    assert sims["cosine_all"][TINY] < epsilon**2
    assert sims["cosine_all"][LOUD] > 0.2
    for op in ("skip", "mean"):
        entry = res["operators"][op]
        # ... yet removing it drops accuracy to chance (a constant answer), while the loud block is useless.
        assert entry["accuracy_without"][TINY] <= res["chance"] + 0.05
        assert entry["accuracy_without"][LOUD] == 1.0
        assert entry["accuracy_without"][AMPLIFIER] <= res["chance"] + 0.05
        assert entry["relevance"][TINY] == 1.0 and entry["relevance"][LOUD] == 0.0
        # accuracy relevance ranks them right; every similarity score ranks them the wrong way round
        assert entry["relevance"][TINY] > entry["relevance"][LOUD]
        for score in ("cosine_all", "cosine_last", "angular"):
            assert sims[score][TINY] < sims[score][LOUD]
            assert [TINY, LOUD] in entry["ranking"][score]["vs_relevance"]["misordered_pairs"]


def test_removing_the_tiny_block_gives_a_constant_answer():
    model = SnowballModel(distractor_class=3)
    _, data = model.evaluation_data(64, n_samples=64)
    batch = data["text"].eval_batches("id")[0]
    preds = model.answer_logits(batch, skip=[TINY]).argmax(-1)
    assert set(preds.tolist()) == {3}
    assert (model.answer_logits(batch).argmax(-1) == batch["targets"]).all()


def test_pruning_by_cosine_removes_the_crucial_block_first():
    model = SnowballModel()
    calib = _score(model)[1]
    assert prune_order(model, calib, "accuracy", "iterative", "skip", 1)[0] == [LOUD]
    assert prune_order(model, calib, "cosine", "iterative", "skip", 1)[0] == [TINY]
    assert prune_order(model, calib, "cosine", "one_shot", "skip", 2)[0] == [TINY, AMPLIFIER]
    ablator = Ablator(model, "skip")
    assert ablator.prune(calib, [LOUD]).outcome.accuracy == 1.0
    assert ablator.prune(calib, [TINY]).outcome.accuracy < 0.2


def test_bad_snowball_settings_are_lab_errors():
    with pytest.raises(LabError):
        SnowballModel(amplify=0.5, distractor=1.0)
    with pytest.raises(LabError):
        SnowballModel(epsilon=0.0)


def test_evaluate_experiment_snowball(tmp_path):
    from hydra import compose, initialize_config_dir

    from lab.eval.run import evaluate_run

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[
            "experiment=snowball", f"out_dir={tmp_path}", "evaluators.layer_relevance.n_boot=10",
            "evaluators.layer_relevance.operators=[skip]", "evaluators.pruning.random_repeats=1",
        ])
    evaluate_run(cfg)
    payload = json.loads((tmp_path / "layer_relevance.json").read_text())
    entry = payload["results"]["text"]["id"]["operators"]["skip"]
    assert entry["relevance"] == [1.0, 0.0, 1.0]
    for name in ("accuracy.json", "layer_relevance.csv", "layer_relevance_text_id_skip.png", "pruning.json",
                 "pruning_text_skip.png"):
        assert (tmp_path / name).is_file(), name
