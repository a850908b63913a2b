"""Auxiliary one-hop queries (task.one_hop_queries + objective.one_hop): training-only follow-ups
that ask each hop on its own, with their own labels and loss, and leave the evaluated query alone."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_cfg
from lab.build import build_objectives, load_trained
from lab.data.batch import IGNORE_INDEX
from lab.data.text import collate_text
from lab.models.backbone import Backbone
from lab.train.objectives import OneHopQueries, labelled_run
from lab.train.run import train
from tasks.protocol import TaskConfigError
from tasks.retrieval import RetrievalTask


def one_hop_answer(tokens: list[str], position: int) -> str:
    """What ``tokens[position]`` asks, worked out from the tokens: after ``[CTX_END]`` a colour asks
    for the shape next to it in the context; after ``[QUE]`` a shape asks for the item next to it
    in the associations."""
    cue, ctx_end = tokens[position], tokens.index("[CTX_END]")
    if tokens[position - 1] == "[CTX_END]":
        assert cue.startswith("color_")
        return tokens[tokens.index(cue, 1, ctx_end) + 1]
    assert tokens[position - 1] == "[QUE]" and cue.startswith("shape_")
    return tokens[tokens.index(cue, ctx_end + 1) + 1]


def test_one_hop_queries_are_correct_and_leave_the_prompt_alone():
    task = RetrievalTask(one_hop_queries=3, train_queries=2, seed=4)
    plain = RetrievalTask(train_queries=2, seed=4)
    for sample, base in zip(task.train_batch(7, 64), plain.train_batch(7, 64)):
        assert sample.tokens == base.tokens and sample.answer == base.answer  # the evaluated prompt
        seq = task.vocab.decode(sample.tokens + sample.followup_tokens)
        kinds = {"[CTX_END]": 0, "[QUE]": 0}
        for position, answer in sample.one_hop_answers:
            assert one_hop_answer(seq, position) == task.vocab.decode([answer])[0]
            kinds[seq[position - 1]] += 1
        assert kinds == {"[CTX_END]": min(3, sample.n_objects), "[QUE]": min(3, sample.n_objects)}
        assert len(sample.followup_answers) == 1  # the two-hop follow-up is still there, still two-hop
        (position, answer), = sample.followup_answers
        assert seq[position].startswith("color_") and seq[position - 1] == "[QUE]"
        assert len(sample.tokens) + len(sample.followup_tokens) <= task.max_prompt_len
    assert task.max_prompt_len == plain.max_prompt_len + 3 * 2 * 3
    assert all(not s.one_hop_answers and not s.followup_tokens for s in task.eval_set("id"))


def test_one_hop_labels_are_kept_apart_from_the_answer_labels():
    task = RetrievalTask(one_hop_queries=2, seed=0)
    samples = task.train_batch(3, 8)
    batch = collate_text(samples, task.vocab.pad_id)
    assert int((batch.labels != IGNORE_INDEX).sum()) == len(samples)  # only the evaluated query
    assert int((batch.one_hop_labels != IGNORE_INDEX).sum()) == sum(len(s.one_hop_answers) for s in samples)
    assert collate_text(RetrievalTask(seed=0).train_batch(3, 8), task.vocab.pad_id).one_hop_labels is None
    model = Backbone(len(task.vocab), n_layers=2, d_model=32, n_heads=2, d_ff=64).eval()
    for s in samples:
        s.followup_tokens, s.one_hop_answers = [], []
    with torch.no_grad():  # causal: the evaluated answer cannot see the queries that follow it
        torch.testing.assert_close(model.answer_logits(batch), model.answer_logits(collate_text(samples, task.vocab.pad_id)))


def test_one_hop_loss_is_cross_entropy_at_the_one_hop_positions():
    task = RetrievalTask(one_hop_queries=2, seed=1)
    samples = task.train_batch(0, 8)
    batch = collate_text(samples, task.vocab.pad_id)
    model = Backbone(len(task.vocab), n_layers=2, d_model=32, n_heads=2, d_ff=64)
    part = OneHopQueries(model=model, task=task)
    out = labelled_run(model, batch, capture=part.layers)
    logits = model(batch)
    by_hand = torch.stack([F.cross_entropy(logits[i, p], torch.tensor(t))
                           for i, s in enumerate(samples) for p, t in s.one_hop_answers])
    torch.testing.assert_close(part.loss(model, batch, out), by_hand.mean())
    assert part.applies(batch) and not part.applies(collate_text(task.eval_set("id")[:4], task.vocab.pad_id))


def test_the_builder_includes_the_part_only_when_the_task_asks_one_hop_queries(caplog):
    task = RetrievalTask(seed=0)
    model = Backbone(len(task.vocab), n_layers=2, d_model=32, n_heads=2, d_ff=64)
    assert "one_hop" not in build_objectives(tiny_cfg(), model, task)
    with_queries = RetrievalTask(one_hop_queries=2, seed=0)
    assert isinstance(build_objectives(tiny_cfg(), model, with_queries)["one_hop"], OneHopQueries)
    with caplog.at_level(logging.WARNING):
        parts = build_objectives(tiny_cfg("objective.one_hop.weight=0"), model, with_queries)
    assert "one_hop" not in parts and "train nothing" in caplog.text
    with pytest.raises(TaskConfigError, match="one_hop_queries"):
        RetrievalTask(one_hop_queries=-1)


@pytest.mark.slow  # the fast suite stays short; `pytest --all` (CI) runs it
def test_one_hop_queries_teach_the_first_hop(tmp_path):
    """A short run with the queries on answers held-out ``[CTX_END] c`` queries (colour -> shape)
    far above chance; without them the same run does not."""
    accuracy = {}
    for name, overrides in {"on": ["task.one_hop_queries=3"], "off": []}.items():
        run_dir = tmp_path / name
        train(tiny_cfg(*overrides, "model.token_shift=true", "train.max_steps=400", "train.lr=5e-3",
                       "train.val_every=100"), run_dir)
        _, task, model, _ = load_trained(run_dir, "last")
        probe = RetrievalTask(n_colors=8, n_shapes=8, n_items=8, id_objects=[2, 3], ood_objects=[4, 5],
                              one_hop_queries=3, seed=99)
        samples = probe.train_batch(0, 128)
        batch = collate_text(samples, probe.vocab.pad_id)
        first_hop = torch.tensor([(s.tokens + s.followup_tokens)[p - 1] == probe.vocab["[CTX_END]"]
                                  for s in samples for p, _ in s.one_hop_answers])
        with torch.no_grad():
            logits = model(batch)[batch.one_hop_labels != IGNORE_INDEX]
        hits = logits.argmax(-1) == batch.one_hop_labels[batch.one_hop_labels != IGNORE_INDEX]
        accuracy[name] = hits[first_hop].float().mean().item()
    assert accuracy["on"] > 0.7 and accuracy["off"] < 0.4, accuracy  # chance: 1/(2..3) among the prompt's shapes
