"""Hoyer sparseness: known answers, the MLP hidden read by hooks, the evaluator end to end."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from conftest import compose_cfg

from lab.data.datamodule import TextDataModule
from lab.errors import LabError
from lab.eval.base import EvalContext
from lab.eval.run import build_evaluators
from lab.eval.sparsity import SparsityEvaluator, hoyer, mlp_hidden, mlp_output_layers
from lab.models.backbone import Backbone
from tasks.retrieval import RetrievalTask


def test_hoyer_known_answers():
    one_hot, constant = np.eye(8)[3], np.full(8, -2.5)
    assert hoyer(one_hot) == pytest.approx(1.0) and hoyer(-4 * one_hot) == pytest.approx(1.0)
    assert hoyer(constant) == pytest.approx(0.0, abs=1e-12)
    assert hoyer(np.array([3.0, -4.0, 0.0, 0.0])) == pytest.approx((2 - 7 / 5) / (2 - 1))
    assert np.isnan(hoyer(np.zeros(5)))
    batch = hoyer(np.stack([one_hot, constant, np.r_[1.0, 1.0, np.zeros(6)]]))
    assert batch == pytest.approx([1.0, 0.0, (math.sqrt(8) - math.sqrt(2)) / (math.sqrt(8) - 1)])
    dense = hoyer(np.random.default_rng(0).normal(size=(2000, 512)))  # about 1 - sqrt(2/pi)
    assert abs(dense.mean() - (1 - math.sqrt(2 / math.pi))) < 0.01


def _model_and_batch():
    torch.manual_seed(0)
    task = RetrievalTask(eval_size=32)
    model = Backbone(len(task.vocab), n_layers=2, d_model=32, n_heads=2, d_ff=64).eval()
    return task, model, next(iter(TextDataModule(task, eval_batch_size=32).eval_batches("id")))


def test_the_hook_reads_each_blocks_mlp_hidden_at_the_final_token():
    _, model, batch = _model_and_batch()
    seen = []
    handles = [block.mlp[1].register_forward_hook(lambda m, i, out: seen.append(out)) for block in model.blocks]
    where = {"rows": batch.answer_pos}
    with torch.no_grad(), mlp_hidden(model, where):
        model.run(batch)
    for h in handles:
        h.remove()
    rows = torch.arange(len(batch))
    for block, gelu in enumerate(seen):  # the GELU output is the output projection's input
        np.testing.assert_allclose(where["mlp"][block][0], gelu[rows, batch.answer_pos].double().numpy())
    assert len(model.blocks[0].mlp[-1]._forward_pre_hooks) == 0  # removed on exit


def test_hugging_face_models_expose_their_mlp_outputs():
    from lab.models.hf import HFModel

    model = HFModel.from_path("tiny-gpt2")
    modules = mlp_output_layers(model)
    assert len(modules) == model.n_layers and all(m is layer.mlp.c_proj for m, layer in zip(modules, model.layers))


@pytest.fixture(scope="module")
def tiny_context(tmp_path_factory):
    torch.manual_seed(0)
    task = RetrievalTask(eval_size=64)
    model = Backbone(len(task.vocab), n_layers=2, d_model=32, n_heads=2, d_ff=64)
    return EvalContext(model=model, task=task, data={"text": TextDataModule(task, eval_batch_size=32)},
                       out_dir=tmp_path_factory.mktemp("sparsity"))


def test_evaluator_end_to_end(tiny_context):
    ctx = tiny_context
    SparsityEvaluator(classes=["answer", "query_shape"], only_correct=False)(ctx)
    saved = json.loads((ctx.out_dir / "sparsity.json").read_text())
    for split, entry in saved["results"]["text"].items():
        assert entry["n_prompts"] == 64
        residual, mlp = entry["residual"], entry["mlp"]
        assert residual["layers"] == [0, 1, 2] and mlp["layers"] == [0, 1]
        assert all(0 < v < 1 for v in residual["mean"] + mlp["mean"]) and residual["n"] == [64, 64, 64]
        per_class = residual["per_class"]["answer"]
        assert sum(c["n"] for c in per_class.values()) == 64
        weighted = sum(c["n"] * c["mean"][1] for c in per_class.values()) / 64
        assert weighted == pytest.approx(residual["mean"][1])  # classes partition the prompts
    with (ctx.out_dir / "sparsity.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["stream"] for r in rows} == {"residual", "mlp"} and {"layer", "class_set", "class", "hoyer"} <= set(rows[0])
    assert (ctx.out_dir / "sparsity.png").stat().st_size > 0


def test_only_correct_prompts_count_by_default(tiny_context):
    entry = SparsityEvaluator(streams=["residual"], plots=False)(tiny_context)["results"]["text"]["id"]
    assert entry["residual"]["n"][0] == entry["n_correct"] < entry["n_prompts"]  # an untrained model
    assert "mlp" not in entry


@pytest.mark.parametrize("options", [{"streams": ["attention"]}, {"streams": []}, {"classes": "answer"},
                                     {"only_correct": 1}, {"layers": [-2]}])
def test_bad_options_are_refused(options):
    with pytest.raises(LabError):
        SparsityEvaluator(**options)


def test_unknown_classes_are_refused_before_the_model_runs(tiny_context):
    with pytest.raises(LabError, match="not provided"):
        SparsityEvaluator(classes=["topic"])(tiny_context)


def test_the_config_builds_the_evaluator():
    [evaluator] = build_evaluators(compose_cfg("evaluate", ["evaluators=[sparsity]"]))
    assert isinstance(evaluator, SparsityEvaluator) and evaluator.streams == ["residual", "mlp"]
