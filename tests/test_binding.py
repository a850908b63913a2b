"""Binding evaluators on hand-built models whose mechanism is known (lab/models/binding_toy.py):
interventions must call the positional model positional and the symbolic one symbolic, knockout
must find the groups each block reads, probes must find the slot or the shape where it is held."""
from __future__ import annotations

import pytest
import torch

from lab.data.datamodule import TextDataModule
from lab.errors import LabError
from lab.eval.base import EvalContext
from lab.eval.interventions import OUTCOMES, InterventionsEvaluator, summarise
from lab.eval.knockout import AttentionKnockoutEvaluator
from lab.eval.probes import ProbesEvaluator, probe_accuracy
from lab.models.binding_toy import BindingToyModel
from tasks.retrieval import RetrievalTask


@pytest.fixture(scope="module")
def task():
    return RetrievalTask(eval_size=192, noise_tokens=(0, 2), seed=1)


def _ctx(task, mechanism, tmp_path):
    model = BindingToyModel(task, mechanism)
    return EvalContext(model=model, task=task, data={"text": TextDataModule(task, eval_batch_size=96)},
                       out_dir=tmp_path / mechanism)


@pytest.mark.parametrize("mechanism", ["positional", "symbolic"])
def test_toy_models_solve_the_task(task, mechanism):
    model = BindingToyModel(task, mechanism)
    data = TextDataModule(task, eval_batch_size=96)
    for split in task.splits:
        for batch in data.eval_batches(split):
            assert torch.equal(model.answer_logits(batch).argmax(-1), batch.targets)


def _rates(site_result, layer):
    return site_result["layers"][layer]["rates"]


def test_interventions_tell_positional_from_symbolic(task, tmp_path):
    positional = InterventionsEvaluator(n_pairs=96, plots=False)(_ctx(task, "positional", tmp_path))["results"]
    symbolic = InterventionsEvaluator(n_pairs=96, plots=False)(_ctx(task, "symbolic", tmp_path))["results"]
    for split in task.splits:
        p, s = positional[split]["sites"]["final"], symbolic[split]["sites"]["final"]
        assert positional[split]["n_used"] == 96
        # positional model: slot register after block 0, shape register after block 1, answer after block 2
        assert (p["first_causal_layer"], p["mechanism_at_first_causal"]) == (1, "positional")
        assert _rates(p, 1)["positional"] == 1.0 and _rates(p, 2)["symbolic"] == 1.0 and _rates(p, 3)["answer_copy"] == 1.0
        # symbolic model: the shape is held from block 0 on; nothing is ever positional
        assert (s["first_causal_layer"], s["mechanism_at_first_causal"]) == (1, "symbolic")
        assert _rates(s, 1)["symbolic"] == 1.0 and all(_rates(s, layer)["positional"] == 0 for layer in (1, 2, 3))
        # neither model reads the [QUE] marker
        for result in (positional, symbolic):
            assert all(_rates(result[split]["sites"]["query_marker"], layer)["no_effect"] == 1.0 for layer in range(4))


def test_interventions_writes_outputs(task, tmp_path):
    ctx = _ctx(task, "positional", tmp_path)
    InterventionsEvaluator(n_pairs=24, splits=["id"], sites=["final"])(ctx)
    for ext in ("json", "csv", "png"):
        assert (ctx.out_dir / f"interventions.{ext}").exists()
    lines = (ctx.out_dir / "interventions.csv").read_text().splitlines()
    assert len(lines) == 1 + 4 * len(OUTCOMES)  # header + (layers 0..3) x outcomes


def test_first_causal_layer_ignores_chance_guesses():
    # Layer 0: a disturbed model guessing among 3 items hits "positional" a third of the time:
    # not a mechanism. Layer 1: 90% positional is.
    n = 300
    guess = torch.tensor([0, 1, 3] * (n // 3))          # positional, symbolic, no_effect equally
    mostly_positional = torch.tensor([0] * 270 + [4] * 30)
    result = summarise(torch.stack([guess, mostly_positional]), guess_rate=1 / 3)
    assert (result["first_causal_layer"], result["mechanism_at_first_causal"]) == (1, "positional")
    assert summarise(torch.stack([guess]), guess_rate=1 / 3)["first_causal_layer"] is None
    empty = summarise(torch.zeros(2, 0, dtype=torch.long), guess_rate=float("nan"))
    assert empty["first_causal_layer"] is None and empty["layers"][0]["n"] == 0


def test_knockout_finds_the_groups_each_block_reads(task, tmp_path):
    drops = {}
    for mechanism in ("positional", "symbolic"):
        result = AttentionKnockoutEvaluator(splits=["id"], plots=False)(_ctx(task, mechanism, tmp_path))
        table = result["results"]["text"]["id"]["layers"]
        drops[mechanism] = {(layer, g): v["drop"] for layer, groups in table.items() for g, v in groups.items()}
    needed = {"positional": {("0", "context_color"), ("1", "context_shape"), ("2", "association_item")},
              "symbolic": {("0", "context_shape"), ("2", "association_item")}}
    for mechanism, table in drops.items():
        for (layer, group), drop in table.items():
            if layer == "all_layers":
                continue
            if (layer, group) in needed[mechanism]:
                assert drop > 0.5, (mechanism, layer, group, drop)
            else:
                assert drop == 0.0, (mechanism, layer, group, drop)
    # the symbolic model never looks at the context colours (the shape's preceding token carries it)
    assert drops["symbolic"][("all_layers", "context_color")] == 0.0


def test_probes_find_slot_and_shape_where_they_are_held(task, tmp_path):
    results = {m: ProbesEvaluator(splits=["id"], plots=False)(_ctx(task, m, tmp_path))["results"]["text"]["id"]
               for m in ("positional", "symbolic")}
    pos, sym = results["positional"], results["symbolic"]
    assert pos["slot"]["accuracy"][1] > 0.95 and pos["slot"]["accuracy"][0] < pos["slot"]["chance"] + 0.15
    assert pos["shape"]["accuracy"][1] < 0.2 and pos["shape"]["accuracy"][2] > 0.95
    assert sym["shape"]["accuracy"][1] > 0.95
    assert max(sym["slot"]["accuracy"]) < sym["slot"]["chance"] + 0.15
    assert pos["item"]["accuracy"][3] > 0.75 and pos["item"]["accuracy"][2] < 0.5  # 16 classes, 96 training prompts


def test_probe_accuracy_on_separable_and_random_labels():
    rng = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (400,), generator=rng).numpy()
    separable = torch.nn.functional.one_hot(torch.as_tensor(labels), 4).double().numpy()
    noise = torch.randn(400, 4, generator=rng).double().numpy()
    assert probe_accuracy(separable, labels)["accuracy"] == 1.0
    random = probe_accuracy(noise, labels)
    assert random["accuracy"] < 0.45 and 0.15 < random["chance"] < 0.4


@pytest.mark.parametrize("make", [
    lambda: InterventionsEvaluator(sites=["everywhere"]),
    lambda: InterventionsEvaluator(n_pairs=0),
    lambda: AttentionKnockoutEvaluator(groups=["colours"]),
    lambda: AttentionKnockoutEvaluator(queries="some"),
    lambda: ProbesEvaluator(targets=["colour"]),
    lambda: BindingToyModel(RetrievalTask(), "lexical"),
])
def test_bad_settings_are_refused(make):
    with pytest.raises(LabError):
        make()


def test_interventions_need_three_objects(tmp_path):
    task = RetrievalTask(id_objects=(1, 2), ood_objects=(3, 4), eval_size=16)
    ctx = _ctx(task, "positional", tmp_path)
    with pytest.raises(Exception, match=">= 3 objects"):
        InterventionsEvaluator(n_pairs=8, splits=["id"], plots=False)(ctx)
