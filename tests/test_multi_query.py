"""Follow-up queries (task.train_queries > 1): denser training supervision that leaves the
evaluated first query untouched."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lab.data.text import collate_text
from lab.models.backbone import Backbone
from lab.data.batch import IGNORE_INDEX
from lab.train.objectives import AnswerLoss, labelled_run
from tasks.retrieval import RetrievalTask


def brute_force_answer(tokens: list[str], position: int) -> str:
    """Item bound to the colour at ``position``: colour -> next token (shape) -> item after that shape."""
    colour = tokens[position]
    ctx_end = tokens.index("[CTX_END]")
    shape = tokens[tokens.index(colour, 1, ctx_end) + 1]
    after = tokens.index(shape, ctx_end)
    return tokens[after + 1]


def test_followups_are_correct_and_leave_the_first_query_alone():
    multi = RetrievalTask(train_queries=4, seed=3)
    plain = RetrievalTask(train_queries=1, seed=3)
    for sample in multi.train_batch(0, 64):
        seq = multi.vocab.decode(sample.tokens + sample.followup_tokens)
        assert len(sample.followup_answers) == min(3, sample.n_objects - 1)
        assert brute_force_answer(seq, sample.query_position) == multi.vocab.decode([sample.answer])[0]
        queried = [seq[sample.query_position]]
        for position, answer in sample.followup_answers:
            assert seq[position - 1] == "[QUE]"
            assert brute_force_answer(seq, position) == multi.vocab.decode([answer])[0]
            queried.append(seq[position])
        assert len(set(queried)) == len(queried)  # each query asks a different object
    assert all(not s.followup_tokens for s in plain.train_batch(0, 8))
    assert all(not s.followup_tokens for s in multi.eval_set("id"))
    assert multi.max_prompt_len == plain.max_prompt_len + 9


def test_first_query_logits_do_not_see_the_followups():
    task = RetrievalTask(train_queries=4, seed=0)
    samples = task.train_batch(5, 8)
    model = Backbone(len(task.vocab), n_layers=2, d_model=32, n_heads=2, d_ff=64).eval()
    extended = collate_text(samples, task.vocab.pad_id)
    for s in samples:
        s.followup_tokens, s.followup_answers = [], []
    prompt_only = collate_text(samples, task.vocab.pad_id)
    assert int((extended.labels != IGNORE_INDEX).sum()) == 4 * len(samples)
    assert int((prompt_only.labels != IGNORE_INDEX).sum()) == len(samples)
    with torch.no_grad():
        torch.testing.assert_close(model.answer_logits(extended), model.answer_logits(prompt_only))


def test_multi_query_loss_averages_every_answer():
    task = RetrievalTask(train_queries=3, seed=0)
    batch = collate_text(task.train_batch(0, 8), task.vocab.pad_id)
    model = Backbone(len(task.vocab), n_layers=2, d_model=32, n_heads=2, d_ff=64)
    out = labelled_run(model, batch)
    loss = AnswerLoss().loss(model, batch, out)
    logits = model(batch)
    terms = [F.cross_entropy(logits[i, p], torch.tensor(t), reduction="sum")  # by hand from the samples
             for i, s in enumerate(task.train_batch(0, 8))
             for p, t in [(s.query_position, s.answer)] + s.followup_answers]
    assert len(terms) == sum(1 + min(s.n_objects - 1, 2) for s in task.train_batch(0, 8))
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    torch.testing.assert_close(out.answer_logits, model.answer_logits(batch))
    first_only = AnswerLoss(followups=False).loss(model, batch, out)
    torch.testing.assert_close(first_only, F.cross_entropy(model.answer_logits(batch), batch.targets))
