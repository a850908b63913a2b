"""Counterfactual pairs for interchange interventions: each hypothesis predicts a different answer."""
from __future__ import annotations

import pytest
import torch

from lab.data.datamodule import TextDataModule
from lab.eval.base import EvalContext
from lab.models.backbone import Backbone
from tasks.protocol import TaskConfigError
from tasks.retrieval import HYPOTHESES, RetrievalTask


def _read(task, tokens):
    """(context [(colour, shape)], associations {shape: item}, query colour) parsed from the tokens."""
    words = task.vocab.decode(tokens)
    end = words.index("[CTX_END]")
    context = list(zip(words[1:end:2], words[2:end:2]))
    associations = dict(zip(words[end + 1 : -2 : 2], words[end + 2 : -2 : 2]))
    return context, associations, words[-1]


@pytest.mark.parametrize("split", ["id", "ood"])
def test_predictions_follow_from_the_prompts(split):
    task = RetrievalTask(seed=3)
    for pair in task.counterfactual_pairs(split, 40, seed=1):
        b_ctx, b_assoc, b_query = _read(task, pair.base.tokens)
        c_ctx, c_assoc, c_query = _read(task, pair.counterfactual.tokens)
        slot = [c for c, _ in c_ctx].index(c_query)            # where C's query points
        c_shape = c_ctx[slot][1]
        expected = {
            "positional": b_assoc[b_ctx[slot][1]],              # B's object at that slot
            "symbolic": b_assoc[c_shape],                       # B's item for C's queried shape
            "answer_copy": c_assoc[c_shape],                    # C's own answer
            "no_effect": b_assoc[dict(b_ctx)[b_query]],         # B's own answer
        }
        got = {h: task.vocab.decode([pair.predictions[h]])[0] for h in HYPOTHESES}
        assert got == expected and len(set(got.values())) == 4
        assert len(pair.base.tokens) == len(pair.counterfactual.tokens) and pair.base.n_objects >= 3
        assert c_assoc[c_shape] not in b_assoc.values()           # C's answer is none of B's items
        assert c_query not in [c for c, _ in b_ctx]                 # nor its query colour one of B's colours
        assert pair.counterfactual.answer == pair.predictions["answer_copy"]


def test_pairs_are_seeded_and_refuse_too_few_objects():
    task = RetrievalTask(seed=0)
    a, b = task.counterfactual_pairs("id", 5, seed=2), task.counterfactual_pairs("id", 5, seed=2)
    assert [p.base.tokens + p.counterfactual.tokens for p in a] == [p.base.tokens + p.counterfactual.tokens for p in b]
    assert a[0].base.tokens != task.counterfactual_pairs("id", 5, seed=3)[0].base.tokens
    small = RetrievalTask(n_colors=8, n_shapes=8, n_items=8, id_objects=(2, 2), ood_objects=(3, 4))
    with pytest.raises(TaskConfigError, match=">= 3 objects"):
        small.counterfactual_pairs("id", 2)
    capped = RetrievalTask(n_colors=8, n_shapes=8, n_items=5, id_objects=(2, 2), ood_objects=(3, 5))
    assert max(p.base.n_objects for p in capped.counterfactual_pairs("ood", 9)) == 4  # n_items - 1


def test_eval_context_collates_pairs_as_aligned_batches(tmp_path):
    task = RetrievalTask(seed=0)
    model = Backbone(len(task.vocab), n_layers=1, d_model=16, n_heads=2, d_ff=32)
    ctx = EvalContext(model=model, task=task, data={"text": TextDataModule(task)}, out_dir=tmp_path)
    specs, base, counter = ctx.pairs("id", 6, seed=0)
    assert len(specs) == 6 and base.tokens.shape == counter.tokens.shape
    assert torch.equal(base.answer_pos, counter.answer_pos) and torch.equal(base.targets, torch.tensor(
        [p.predictions["no_effect"] for p in specs]))
