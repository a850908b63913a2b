"""The task protocol, the typed batch and its token roles, and the second task (one-hop)."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_cfg

from lab.build import build_training, load_trained
from lab.data.batch import IGNORE_INDEX, Batch
from lab.data.text import collate_text
from lab.errors import LabError
from lab.eval.base import EvalContext
from lab.train.run import train
from tasks.one_hop import OneHopTask
from tasks.protocol import Sample, Task
from tasks.retrieval import RetrievalTask

ONE_HOP = ["task=one_hop", "task.n_colors=8", "task.n_shapes=8", "task.n_items=8"]


def test_both_tasks_follow_the_protocol():
    for task in (RetrievalTask(seed=0), OneHopTask(seed=0)):
        assert isinstance(task, Task)
        assert all(isinstance(s, Sample) for s in task.eval_set("id")[:4] + task.train_batch(0, 4))
        assert max(len(s.tokens) for s in task.eval_set("ood")) <= task.max_prompt_len


def test_retrieval_roles_name_the_right_tokens():
    task = RetrievalTask(noise_tokens=(1, 3), seed=1)
    samples = task.train_batch(0, 6)
    batch = collate_text(samples, task.vocab.pad_id)
    decode = task.vocab.decode
    for i, s in enumerate(samples):
        tokens = batch.tokens[i]
        roles = {name: [p for p in pos[i].tolist() if p >= 0] for name, pos in batch.roles.items()}
        assert [decode([tokens[p]])[0] for p in roles["context_color"]] == [f"color_{c}" for c in s.colors]
        assert [decode([tokens[p]])[0] for p in roles["context_shape"]] == [f"shape_{x}" for x in s.shapes]
        order = s.association_order
        assert [decode([tokens[p]])[0] for p in roles["association_item"]] == [f"item_{s.items[o]}" for o in order]
        assert decode([tokens[roles["query_marker"][0]]]) == ["[QUE]"] and roles["query"] == [s.query_position]
        assert all(decode([tokens[p]])[0] == "[NOISE]" for p in roles["noise"]) and len(roles["noise"]) >= 1
        assert batch.labels[i, s.query_position] == s.answer and int((batch.labels[i] != IGNORE_INDEX).sum()) == 1
        assert batch.mid_labels[i, s.query_position] == task.shape_token(s.shapes[s.query_object])
    mask = batch.role_mask("context_color", "query")
    assert int(mask.sum()) == sum(s.n_objects + 1 for s in samples)
    with pytest.raises(KeyError, match="no token role 'image'"):
        batch.role_mask("image")


def test_batch_reads_like_a_mapping_and_selects_rows():
    task = RetrievalTask(seed=0)
    batch = collate_text(task.train_batch(0, 5), task.vocab.pad_id)
    assert isinstance(batch, Batch) and batch["tokens"] is batch.tokens and len(batch) == 5
    assert "images" not in batch and batch.get("images") is None and not batch.has_image
    keep = torch.tensor([True, False, True, False, True])
    part = batch.rows(keep)
    assert len(part) == 3 and torch.equal(part.roles["query"], batch.roles["query"][keep])
    assert torch.equal(part.objects["colors"], batch.objects["colors"][keep])


def test_one_hop_answers_the_queried_shape():
    task = OneHopTask(train_queries=3, seed=0)
    for s in task.train_batch(0, 8):
        sequence = s.tokens + s.followup_tokens
        assert task.vocab.decode([s.answer]) == [f"shape_{s.shapes[s.query_object]}"]
        for position, answer in s.followup_answers:  # each follow-up colour is answered by its own shape
            color = int(task.vocab.decode([sequence[position]])[0].split("_")[1])
            assert task.vocab.decode([answer]) == [f"shape_{s.shapes[s.colors.index(color)]}"]
    assert task.vocab.tokens == RetrievalTask().vocab.tokens  # a one-hop model can start a two-hop run


def test_one_hop_trains_and_reloads_through_the_lab(tmp_path):
    """A new task needs only tasks/<name>.py + conf/task/<name>.yaml: train, checkpoint, reload."""
    run_dir = tmp_path / "one_hop"
    metrics = train(tiny_cfg(*ONE_HOP, "train.max_steps=20"), run_dir)
    assert metrics["step"] == 20 and "val/text_ood_acc" in metrics
    cfg, task, model, step = load_trained(run_dir, "last")
    assert task.name == "one_hop" and step == 20
    ctx = EvalContext(model=model, task=task, data={}, out_dir=tmp_path)
    assert ctx.choose_splits() == ["id", "ood"]
    with pytest.raises(LabError, match="unknown split"):
        ctx.choose_splits(["test"])


def test_intermediate_aid_is_left_out_for_a_task_without_an_intermediate_variable():
    _, _, module, _ = build_training(tiny_cfg(*ONE_HOP, "objective.intermediate.weight=1"))
    assert list(module.objectives) == ["answer"]
    _, _, module, _ = build_training(tiny_cfg("objective.intermediate.weight=1"))
    assert list(module.objectives) == ["answer", "intermediate"]
    with pytest.raises(LabError, match="every objective has weight 0"):
        build_training(tiny_cfg("objective.answer.weight=0"))


def test_objectives_that_all_fade_out_are_refused():
    with pytest.raises(LabError, match="every objective fades out"):
        build_training(tiny_cfg("objective.answer.weight=0", "objective.intermediate.weight=1",
                                "objective.intermediate.anneal=[10,20]"))
