"""Mechanism evaluators on hand-built models whose answers are known: the conflict toy
(lab/models/conflict_toy.py: an induction head writes the in-context answer, an MLP the memorised
one) for the logit lens, logit attribution and attention modification, and the gate toys
(lab/models/gate_toy.py: image information through [CTX_END], or read from the patches) for the
narrow gate. Plus the runs they do not fit, refused in one line."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from lab.data.datamodule import TextDataModule
from lab.errors import LabError
from lab.eval.attention_modification import AttentionModificationEvaluator, parse_heads
from lab.eval.base import EvalContext
from lab.eval.logit_attribution import LogitAttributionEvaluator
from lab.eval.logit_lens import LogitLensEvaluator
from lab.eval.narrow_gate import NarrowGateEvaluator
from lab.models.binding_toy import BindingToyModel
from lab.models.conflict_toy import ANSWER_HEAD, PREVIOUS_TOKEN_HEAD, ConflictToyModel
from lab.models.gate_toy import GateToyModel
from lab.models.hf import HFModel
from tasks.conflict import ConflictTask
from tasks.fewshot import LETTERS, FewShotTask
from tasks.retrieval import RetrievalTask


@pytest.fixture(scope="module")
def toy():
    return ConflictToyModel(ConflictTask(eval_size=96))


def _ctx(model, tmp_path, name="out"):
    task, data = model.evaluation_data(48)
    return EvalContext(model=model, task=task, data=data, out_dir=tmp_path / name)


def _written(ctx, name):
    for ext in ("json", "csv", "png"):
        assert (ctx.out_dir / f"{name}.{ext}").is_file(), ext
    with (ctx.out_dir / f"{name}.csv").open() as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------ the toy and the interface
@torch.no_grad()
def test_conflict_toy_heads_and_patterns_are_the_built_ones(toy):
    batch = next(iter(toy.evaluation_data()[1]["text"].eval_batches("conflict")))
    out = toy.run(batch, positions=batch.answer_pos, record=["patterns", "heads", "writes"], record_at=batch.answer_pos)
    assert torch.equal(out.logits.argmax(-1), batch.targets)  # the in-context answer wins
    rows = torch.arange(len(batch))
    # the answer head looks from the query topic at the answer shown with it
    pattern = out.records[ANSWER_HEAD[0]]["patterns"][:, ANSWER_HEAD[1]]  # [B, T]
    shown = batch.roles["demo_answer"][rows, (batch.tokens[:, 1::2][:, : batch.roles["demo_answer"].shape[1]]
                                              == batch.tokens[rows, batch.answer_pos][:, None]).float().argmax(1)]
    assert (pattern[rows, shown] > 0.999).all()
    # the previous-token head looks one position back
    prev = out.records[PREVIOUS_TOKEN_HEAD[0]]["patterns"][:, PREVIOUS_TOKEN_HEAD[1]]
    assert (prev[rows, batch.answer_pos - 1] > 0.999).all()
    # only the answer head writes into what the readout reads: its write alone gives the answer
    heads = out.records[1]["heads"]
    assert torch.equal(toy.readout(heads[:, 1]).argmax(-1), batch.targets)
    assert toy.readout(heads[:, 0]).abs().max() < 1e-4
    assert torch.equal(toy.readout(out.records[1]["mlp"]).argmax(-1), batch.objects["prior_answer"])


# --------------------------------------------------------------------------------------- logit lens
def test_logit_lens_finds_where_each_answer_is_written(toy, tmp_path):
    ctx = _ctx(toy, tmp_path)
    result = LogitLensEvaluator()(ctx)["results"]["text"]["conflict"]
    rows = _written(ctx, "logit_lens")
    assert {r["source"] for r in rows} == {"residual", "attn", "mlp"}
    query = {s: result[s]["query"] for s in ("residual", "attn", "mlp")}
    uniform = 1 / len(toy.task.vocab)
    for target in ("answer", "prior_answer"):
        assert query["residual"][target]["prob"][:2] == pytest.approx([uniform] * 2, abs=1e-4)
    assert query["residual"]["answer"]["prob"][2] > 0.99 and query["residual"]["prior_answer"]["prob"][2] < 0.01
    assert query["residual"]["answer"]["logit"][2] == pytest.approx(2 * query["residual"]["prior_answer"]["logit"][2], rel=0.02)
    # block 1's attention writes the in-context answer, its MLP the memorised one; block 0 nothing
    assert query["attn"]["answer"]["prob"][1] > 0.99 and query["attn"]["prior_answer"]["prob"][1] < 0.01
    assert query["mlp"]["prior_answer"]["prob"][1] > 0.99 and query["mlp"]["answer"]["prob"][1] < 0.01
    assert query["attn"]["answer"]["logit"][0] == pytest.approx(0, abs=1e-4)
    # the demonstrated answers are not read out anywhere before the last block
    assert result["residual"]["demo_answer"]["answer"]["prob"][1] == pytest.approx(uniform, abs=1e-4)


# --------------------------------------------------------------------------------- logit attribution
def test_logit_attribution_credits_the_answer_head_and_adds_up(toy, tmp_path):
    ctx = _ctx(toy, tmp_path)
    payload = LogitAttributionEvaluator()(ctx)
    assert set(payload["results"]["text"]) == {"conflict"}  # in "agree" the two targets are one token
    entry = payload["results"]["text"]["conflict"]
    _written(ctx, "logit_attribution")
    heads = torch.tensor(entry["heads"]["mean"])
    total = entry["total"]["mean"]
    assert total == pytest.approx(5.0, rel=0.01)                        # logit_scale x (2 - 1)
    assert heads[ANSWER_HEAD] == pytest.approx(10.0, rel=0.02)          # logit_scale x context_gain
    assert entry["mlp"]["mean"][1] == pytest.approx(-5.0, rel=0.02)     # -logit_scale x prior_gain
    others = heads.clone()
    others[ANSWER_HEAD] = 0
    assert others.abs().max() < 1e-4 and abs(entry["mlp"]["mean"][0]) < 1e-4 and abs(entry["embed"]["mean"]) < 1e-4
    assert entry["max_sum_error"] < 1e-4
    assert (entry["top_heads"][0]["layer"], entry["top_heads"][0]["head"]) == ANSWER_HEAD


def test_attribution_parts_add_up_on_a_random_model(tmp_path):
    """heads + attention biases + MLPs + embedding + constant == the model's logit difference,
    prompt by prompt, on a random backbone (biases and norm parameters non-zero)."""
    from test_interface import random_backbone

    from lab.eval.logit_attribution import attributions

    task = RetrievalTask(n_colors=8, n_shapes=8, n_items=8, id_objects=(2, 3), ood_objects=(4, 5), eval_size=16)
    model = random_backbone(len(task.vocab), "rope")
    batches = list(TextDataModule(task, eval_batch_size=8).eval_batches("id"))
    parts = attributions(model, [b.to("cpu") for b in batches], "answer", "top_other")
    summed = parts["heads"].sum((1, 2)) + parts["attn_bias"].sum(1) + parts["mlp"].sum(1) + parts["embed"] + parts["constant"]
    torch.testing.assert_close(summed, parts["total"], atol=1e-5, rtol=0)
    assert parts["attn_bias"].abs().max() > 0


# ----------------------------------------------------------------------------- attention modification
def test_attention_modification_flips_context_wins_into_prior_wins(toy, tmp_path):
    ctx = _ctx(toy, tmp_path)
    payload = AttentionModificationEvaluator(heads=["1.1"], alphas=[0.0, 0.25, 1.0, 4.0])(ctx)
    rows = _written(ctx, "attention_modification")
    assert len(rows) == 4
    entry = payload["results"]["text"]["conflict"]
    n = entry["n"]
    wins = {a: c["wins"] for a, c in entry["alphas"].items()}
    # post-softmax: the head writes alpha x context_gain; the prior wins below alpha = 1/2
    assert wins["0.0"] == wins["0.25"] == {"a": 0, "b": n, "other": 0}
    assert wins["1.0"] == wins["4.0"] == {"a": n, "b": 0, "other": 0}
    assert entry["alphas"]["1.0"]["accuracy"] == 1.0 and entry["alphas"]["0.25"]["accuracy"] == 0.0
    assert entry["alphas"]["4.0"]["mean_logit_diff"] > entry["alphas"]["1.0"]["mean_logit_diff"] > 0
    # the other head of block 1 never looks at the answers: scaling it changes nothing
    idle = AttentionModificationEvaluator(heads=["1.0"], alphas=[0.0], splits=["conflict"], plots=False)(ctx)
    assert idle["results"]["text"]["conflict"]["alphas"]["0.0"]["wins"]["a"] == n
    # before the softmax the head is so sharp that only alpha = 0 removes the answer
    pre = AttentionModificationEvaluator(heads=[[1, 1]], alphas=[0.0, 0.25], mode="pre", splits=["conflict"],
                                         plots=False)(ctx)["results"]["text"]["conflict"]["alphas"]
    assert pre["0.0"]["wins"]["b"] == n and pre["0.25"]["wins"]["a"] == n


def test_parse_heads():
    assert parse_heads("all", 3) is None
    assert parse_heads(["1.1", "1.0", 2, [0, 1]], 3) == {1: [1, 0], 2: None, 0: [1]}
    with pytest.raises(LabError, match="layer"):
        parse_heads(["5.0"], 3)
    with pytest.raises(LabError, match="layer"):
        parse_heads(["x"], 3)


# -------------------------------------------------------------------------------------- narrow gate
@pytest.mark.parametrize("mechanism", ["gate", "direct"])
def test_narrow_gate_is_found_only_where_it_is(mechanism, tmp_path):
    ctx = _ctx(GateToyModel(mechanism=mechanism), tmp_path, mechanism)
    entry = NarrowGateEvaluator(n_random=2)(ctx)["results"]["image"]["id"]
    rows = _written(ctx, "narrow_gate")
    assert {r["measure"] for r in rows} >= {"profile_share", "knockout_drop", "patch_flip_rate", "modality_gap_median_cos"}
    assert entry["clean_accuracy"] == 1.0
    ko, patch, share = entry["knockout"], entry["patching"], entry["profile"]["share"]
    swapped = patch["full_swap"]["flip_rate"]
    assert swapped > 0.7  # another image usually shows another value
    if mechanism == "gate":
        assert entry["gate"]["narrow"] and entry["gate"]["token"] == "ctx_end"
        assert ko["ctx_end"]["drop"][1] > 0.8 and ko["random_image"]["drop"][1] == 0 and ko["all_image"]["drop"][1] == 0
        assert patch["ctx_end"]["flip_rate"][1] == pytest.approx(swapped)         # h_1 of [CTX_END] carries the image
        assert patch["ctx_end"]["hist_intersection"][1] > 0.99
        assert patch["ctx_end"]["flip_rate"][0] == 0 and patch["ctx_end"]["flip_rate"][2] == 0
        assert share["ctx_end"][1] > 0.5   # block 1 reads [CTX_END] (its other head is uniform)
    else:
        assert not entry["gate"]["narrow"] and entry["gate"]["excess"] < 0.1
        assert ko["ctx_end"]["drop"] == [0, 0] and ko["all_image"]["drop"][1] == 1.0
        assert max(patch["ctx_end"]["flip_rate"]) == 0
        assert share["image_interior"][1] > 0.8
    for values in entry["modality_gap"]["median_cos"]:
        assert -1 <= values <= 1


def test_narrow_gate_refuses_a_text_only_run(tmp_path):
    task = RetrievalTask(eval_size=16)
    ctx = EvalContext(model=BindingToyModel(task), task=task, data={"text": TextDataModule(task, eval_batch_size=16)},
                      out_dir=tmp_path)
    with pytest.raises(LabError, match="needs a run with image streams"):
        NarrowGateEvaluator()(ctx)


# --------------------------------------------------------------------------------- fitting the run
def test_models_without_probes_and_unknown_settings_are_refused(tmp_path):
    task = RetrievalTask(eval_size=16)
    ctx = EvalContext(model=BindingToyModel(task), task=task, data={"text": TextDataModule(task, eval_batch_size=16)},
                      out_dir=tmp_path)
    for evaluator in (LogitLensEvaluator(), LogitAttributionEvaluator(), AttentionModificationEvaluator()):
        with pytest.raises(LabError, match="needs a model that records"):
            evaluator(ctx)
    model_ctx = _ctx(ConflictToyModel(ConflictTask(eval_size=8)), tmp_path)
    with pytest.raises(LabError, match="not a token role"):
        AttentionModificationEvaluator(key_group="association_item")(model_ctx)
    with pytest.raises(LabError, match="unknown target"):
        LogitAttributionEvaluator(b="colour")(model_ctx)
    with pytest.raises(LabError, match="none of the targets"):
        LogitLensEvaluator(targets=["colour"])(model_ctx)
    for make in (lambda: AttentionModificationEvaluator(mode="logits"), lambda: AttentionModificationEvaluator(alphas=[-1]),
                 lambda: NarrowGateEvaluator(tokens=["bos"]), lambda: GateToyModel(mechanism="wide")):
        with pytest.raises(LabError):
            make()


def test_fewshot_batches_carry_the_prior_answer():
    task = FewShotTask(eval_size=64)
    for sample in task.eval_set("shots0"):
        values = [int(task.vocab.tokens[t].split("_")[1]) for t in sample.tokens[-8:-1:2]]
        prior_letter = [v % 4 for v in values].index(int(task.pretrain_rule[sample.topic]))
        assert sample.prior_answer == task.vocab[LETTERS[prior_letter]]
        assert (sample.prior_answer == sample.answer) == (task.pretrain_rule[sample.topic] == task.benchmark_rule[sample.topic])


def test_evaluators_run_on_a_hugging_face_model(tmp_path):
    """The same evaluators through the HF adapter (a random tiny GPT-2 on the retrieval task)."""
    task = RetrievalTask(n_colors=16, n_shapes=16, eval_size=16, seed=0)
    ctx = EvalContext(model=HFModel.from_path("tiny-gpt2"), task=task,
                      data={"text": TextDataModule(task, eval_batch_size=16)}, out_dir=tmp_path)
    lens = LogitLensEvaluator(targets=["answer", "top_other"], splits=["id"], plots=False)(ctx)
    assert len(lens["results"]["text"]["id"]["residual"]["query"]["answer"]["prob"]) == 4
    entry = LogitAttributionEvaluator(splits=["id"])(ctx)["results"]["text"]["id"]
    assert entry["b"] == "top_other" and entry["max_sum_error"] < 1e-3
    assert torch.tensor(entry["heads"]["mean"]).shape == (3, 4)
    modified = AttentionModificationEvaluator(key_group="association_item", alphas=[1.0], splits=["id"], plots=False)(ctx)
    counts = modified["results"]["text"]["id"]["alphas"]["1.0"]
    clean = [b for b in ctx.batches("id")][0]
    hits = int((ctx.model.answer_logits(clean).argmax(-1) == clean.targets).sum())
    assert counts["wins"]["a"] == counts["a_over_b"] == hits and counts["wins"]["b"] == 16 - hits  # alpha 1: clean
    assert json.loads((tmp_path / "logit_attribution.json").read_text())["approximation"]


@pytest.mark.slow  # trains a tiny image run (4 steps, an auto-pretrained encoder): about 45 s on one core
def test_narrow_gate_and_lens_on_a_real_image_run(tmp_path):
    from conftest import compose_cfg
    from test_visual import image_cfg

    from lab.eval.run import evaluate_run
    from lab.train.run import train

    train(image_cfg(tmp_path, "train.max_steps=4", "train.val_every=2"), tmp_path / "run")
    cfg = compose_cfg("evaluate", [f"run={tmp_path / 'run'}", "evaluators=[narrow_gate,logit_lens]",
                                   "evaluators.narrow_gate.n_random=1", "batch_size=32"])
    results = evaluate_run(cfg)
    gate = results["narrow_gate"]["results"]
    assert list(gate) == ["image"] and set(gate["image"]) == {"id", "ood"}
    assert len(gate["image"]["id"]["modality_gap"]["median_cos"]) == 3  # h_0..h_2 of a 2-block model
    assert "image" in results["logit_lens"]["results"]["image"]["id"]["groups"]
