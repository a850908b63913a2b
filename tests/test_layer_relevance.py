"""Layer relevance: scoring core, statistics, prefix caching, evaluators end to end."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lab.data.datamodule import TextDataModule
from lab.errors import LabError
from lab.eval.base import EvalContext
from lab.eval.layer_relevance import LayerRelevanceEvaluator
from lab.eval.pruning import PruningEvaluator
from lab.eval.relevance import Ablator, accuracy_relevance, halves, json_clean, similarity_scores
from lab.models.snowball import SnowballModel
from lab.eval.stats import bootstrap_correlations, correlations, rank_confusion, ranking_audit, ranks
from lab.models.backbone import Backbone
from tasks.retrieval import RetrievalTask


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    task = RetrievalTask(eval_size=48, id_objects=(2, 4), ood_objects=(5, 6), n_colors=8, n_shapes=8, n_items=8)
    model = Backbone(len(task.vocab), n_layers=4, d_model=32, n_heads=2, d_ff=64).eval()
    data = TextDataModule(task, eval_batch_size=16)
    return task, model, data


# ---------------------------------------------------------------------- formulas and statistics
def test_accuracy_relevance_known_values():
    rel = accuracy_relevance(np.array([1.0, 0.55, 0.1, 0.0]), 1.0, 0.1)
    np.testing.assert_allclose(rel, [0.0, 0.5, 1.0, 1.0])  # below chance clips to relevance 1
    assert np.isnan(accuracy_relevance(np.array([0.2]), 0.1, 0.1)).all()  # full model at chance


def test_correlations_known_answers():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    c = correlations(x, x**3)
    assert c["spearman"]["r"] == pytest.approx(1.0) and c["kendall"]["r"] == pytest.approx(1.0)
    assert 0.9 < c["pearson"]["r"] < 1.0 and c["spearman"]["p"] < 0.05
    c = correlations(x, -x)
    assert c["pearson"]["r"] == pytest.approx(-1.0)
    assert math.isnan(correlations(x, np.ones(5))["pearson"]["r"])  # constant input


def test_bootstrap_ci_brackets_the_estimate():
    rng = np.random.default_rng(0)
    signal = np.linspace(0, 1, 6)
    per_sample = signal + 0.05 * rng.standard_normal((200, 6))
    ci = bootstrap_correlations(lambda idx: (per_sample[idx].mean(0), signal), 200, n_boot=200)
    assert ci["pearson"]["ci_low"] > 0.95 and ci["pearson"]["ci_high"] <= 1.0
    assert ci["pearson"]["n_valid"] == 200


def test_ranking_audit_counts_misordered_pairs_and_ties():
    audit = ranking_audit(np.array([3.0, 2.0, 1.0]), np.array([1.0, 2.0, 3.0]))
    assert audit["n_misordered"] == 3 and audit["fraction_misordered"] == 1.0
    audit = ranking_audit(np.array([1.0, 2.0, 3.0, 0.5]), np.array([1.0, 2.0, 3.0, 1.0]))
    # pair (0, 3) is tied in the reference; (3, x) pairs: 3 has the lowest score, reference ties 0
    assert audit["n_reference_ties"] == 1 and audit["n_misordered"] == 0 and audit["n_ordered_pairs"] == 5
    np.testing.assert_array_equal(rank_confusion(np.array([1.0, 5.0, 3.0]), np.array([0.1, 0.9, 0.5])), np.eye(3))
    np.testing.assert_array_equal(ranks(np.array([0.2, np.nan, 0.9])), [1, 2, 0])


def test_json_clean_makes_standard_json():
    out = json_clean({"a": [1.0, float("nan")], "b": np.float32(2.0), "c": np.int64(3)})
    assert out == {"a": [1.0, None], "b": 2.0, "c": 3}
    json.dumps(out, allow_nan=False)


# ---------------------------------------------------------------------- data halves
def test_halves_are_a_deterministic_disjoint_partition(small):
    task, _, data = small
    calib, evaluation, mask = halves(data.eval_batches("id"))
    assert len(mask) == 48 and mask.sum() == 24
    n = sum(len(b["targets"]) for b in calib) + sum(len(b["targets"]) for b in evaluation)
    assert n == 48
    _, _, mask2 = halves(data.eval_batches("id"))
    np.testing.assert_array_equal(mask, mask2)
    with pytest.raises(LabError):
        halves(data.eval_batches("id"), fraction=1.0)


# ---------------------------------------------------------------------- prefix caching
@pytest.mark.parametrize("operator", ["skip", "mean"])
def test_cached_ablation_equals_naive_forward(small, operator):
    _, model, data = small
    batches = list(data.eval_batches("ood"))
    ablator = Ablator(model, operator, mean_batches=batches)
    for removed in ([], [2]):  # a single removal, and a second removal after pruning (iterative)
        means = ablator.mean_updates(frozenset(), {}) if operator == "mean" else {}
        state = ablator.prune(batches, removed, {l: means[l] for l in removed} if means else {})
        mu = ablator.mean_updates(state.removed, state.means) if operator == "mean" else {}
        for l in range(model.n_layers):
            if l in removed:
                continue
            cached = ablator.remove_one(state, batches, l, mu.get(l), cached=True)
            naive = ablator.remove_one(state, batches, l, mu.get(l), cached=False)
            np.testing.assert_array_equal(cached.correct, naive.correct)
            np.testing.assert_allclose(cached.loss, naive.loss, rtol=1e-5, atol=1e-5)


def test_skip_equals_run_with_skip(small):
    _, model, data = small
    batch = next(iter(data.eval_batches("id")))
    ablator = Ablator(model, "skip")
    state = ablator.prune([batch])
    out = ablator.remove_one(state, [batch], 1)
    logits = model.answer_logits(batch, skip=[1])
    np.testing.assert_array_equal(out.correct, (logits.argmax(-1) == batch["targets"]).numpy())


def test_mean_ablation_of_a_constant_update_changes_nothing():
    model = SnowballModel()  # block 1 writes the same vector at every token
    _, data = model.evaluation_data(64, n_samples=64)
    batches = data["text"].eval_batches("id")
    ablator = Ablator(model, "mean", mean_batches=batches)
    full = ablator.prune(batches)
    out = ablator.candidates(full, batches)[1]
    np.testing.assert_allclose(out.loss, full.outcome.loss, atol=1e-5)


def test_zeroed_block_has_zero_scores(small):
    task, _, data = small
    torch.manual_seed(1)
    model = Backbone(len(task.vocab), n_layers=3, d_model=32, n_heads=2, d_ff=64).eval()
    blk = model.blocks[1]
    for p in (blk.attn.proj.weight, blk.attn.proj.bias, blk.mlp[2].weight, blk.mlp[2].bias):
        torch.nn.init.zeros_(p)
    batches = list(data.eval_batches("id"))
    ablator = Ablator(model, "skip")
    state = ablator.prune(batches)
    sims = similarity_scores(state, batches)
    assert np.abs(sims["cosine_all"][:, 1]).max() < 1e-12 and np.abs(sims["angular"][:, 1]).max() < 1e-6
    out = ablator.candidates(state, batches)[1]
    np.testing.assert_allclose(out.loss, state.outcome.loss, atol=1e-6)


def test_similarity_scores_known_geometry():
    # h_0 = e0, block writes e1 => cos = 1/sqrt(2): 1 - cos and arccos/pi = 1/4
    from lab.eval.relevance import PrunedState, Outcome

    h0 = torch.tensor([[[1.0, 0.0]]])
    h1 = torch.tensor([[[1.0, 1.0]]])
    state = PrunedState(frozenset(), [None], [{0: h0, 1: h1}], [None], Outcome(np.ones(1, bool), np.zeros(1)))
    batch = {"attend": torch.ones(1, 1, dtype=torch.bool), "answer_pos": torch.tensor([0])}
    s = similarity_scores(state, [batch])
    assert s["cosine_all"][0, 0] == pytest.approx(1 - 2**-0.5)
    assert s["angular"][0, 0] == pytest.approx(0.25)


# ---------------------------------------------------------------------- evaluators end to end
@pytest.mark.slow  # end-to-end training runs: `pytest --all` (CI) runs them
def test_layer_relevance_and_pruning_evaluators_write_documented_outputs(small, tmp_path):
    task, model, data = small
    ctx = EvalContext(model=model, task=task, data={"text": data}, out_dir=tmp_path)
    res = LayerRelevanceEvaluator(n_boot=10, operators=["mean"], plots=True, splits=["ood"])(ctx)
    payload = json.loads((tmp_path / "layer_relevance.json").read_text())  # standard JSON (no NaN)
    assert set(payload["results"]["text"]) == {"ood"}
    entry = payload["results"]["text"]["ood"]["operators"]["mean"]
    assert len(entry["relevance"]) == 4 and "heldout" in entry
    assert set(entry["correlations"]["cosine_all"]["vs_loss_increase"]["kendall"]) >= {"r", "p", "ci_low", "ci_high"}
    header = (tmp_path / "layer_relevance.csv").read_text().splitlines()[0].split(",")
    assert {"layer", "relevance", "cosine_all", "cosine_last", "angular", "loss_increase"} <= set(header)
    assert (tmp_path / "layer_relevance_text_ood_mean.png").is_file()
    assert res["text"]["ood"]["full"]["accuracy"] >= 0

    pr = PruningEvaluator(random_repeats=2, max_removed=2)(ctx)
    curves = pr["text"]["skip"]
    assert {(c["criterion"], c["mode"]) for c in curves} == {
        ("accuracy", "iterative"), ("accuracy", "one_shot"), ("cosine", "iterative"), ("cosine", "one_shot"),
        ("angular", "iterative"), ("angular", "one_shot"), ("random", "iterative")}
    for c in curves:
        assert len(c["removed"]) == 2 and len(set(c["removed"])) == 2
        assert len(c["accuracy"]["ood"]) == 3
    first = {c["accuracy"]["id"][0] for c in curves}
    assert len(first) == 1  # every curve starts at the full model on the same evaluation half
    assert (tmp_path / "pruning.csv").is_file() and (tmp_path / "pruning_text_skip.png").is_file()


def test_bad_evaluator_options_are_lab_errors():
    with pytest.raises(LabError, match="operator"):
        LayerRelevanceEvaluator(operators=["zero"])
    with pytest.raises(LabError, match="criterion"):
        PruningEvaluator(criteria=["magic"])


@pytest.mark.parametrize("operator", ["skip", "mean"])
def test_iterative_prefix_reuse_equals_a_fresh_pruned_run(small, operator):
    _, model, data = small
    batches = list(data.eval_batches("id"))
    ablator = Ablator(model, operator, mean_batches=batches)
    means = ablator.mean_updates(frozenset(), {}) if operator == "mean" else {}
    first = ablator.prune(batches, [2], {2: means[2]} if means else {})
    kept = {l: means[l] for l in (2, 1)} if means else {}
    reused = ablator.prune(batches, [2, 1], kept, reuse=first)
    fresh = ablator.prune(batches, [2, 1], kept)
    for a, b in zip(reused.logits, fresh.logits):
        torch.testing.assert_close(a, b)
    for sa, sb in zip(reused.states, fresh.states):
        for l in sa:
            torch.testing.assert_close(sa[l], sb[l])
