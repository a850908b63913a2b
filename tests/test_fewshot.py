"""The few-shot task's answers follow from its prompts; LoRA and init_from fine-tuning."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lab.data.text import collate_text
from lab.errors import LabError
from lab.models.backbone import Backbone
from lab.models.lora import LoRALinear, add_lora
from tasks.fewshot import LETTERS, FewShotTask
from tasks.protocol import Sample, Task, TaskConfigError


def _blocks(task, tokens):
    """Parse a prompt into [(question tokens, {letter: value}, shown letter or None)]."""
    words = task.vocab.decode(tokens)
    starts = [i for i, w in enumerate(words) if w == "[Q]"]
    blocks = []
    for s in starts:
        choices = {words[s + 4 + 2 * j]: int(words[s + 5 + 2 * j].split("_")[1]) for j in range(4)}
        shown = words[s + 13] if s + 13 < len(words) else None
        blocks.append((words[s + 1: s + 3], choices, shown))
    return blocks


def test_protocol_and_shapes():
    task = FewShotTask(eval_size=8)
    assert isinstance(task, Task)
    sample = task.eval_set("shots5")[0]
    assert isinstance(sample, Sample) and sample.n_objects == 5
    assert len(sample.tokens) <= task.max_prompt_len and sample.query_position == len(sample.tokens) - 1


@pytest.mark.parametrize("split", ["shots0", "shots2", "shots5"])
def test_benchmark_answers_follow_the_topic_rule(split):
    task = FewShotTask(eval_size=64, seed=2)
    for sample in task.eval_set(split):
        blocks = _blocks(task, sample.tokens)
        rule = int(task.benchmark_rule[sample.topic])
        for question, choices, shown in blocks:
            assert all(w.startswith(f"q{sample.topic}_") for w in question)          # the topic's vocabulary
            assert sorted(v % 4 for v in choices.values()) == [0, 1, 2, 3]              # one choice per class
            correct = next(letter for letter, v in choices.items() if v % 4 == rule)
            if shown is not None:
                assert shown == correct                                                # benchmark demos are right
        assert task.vocab.decode([sample.answer])[0] == correct                        # the query's answer
        assert len(blocks) == sample.n_objects + 1


def test_heldout_questions_never_in_training_queries():
    task = FewShotTask(eval_size=128)
    train_queries = {(s.topic, tuple(_blocks(task, s.tokens)[-1][0])) for step in range(20) for s in task.train_batch(step, 64)}
    eval_queries = {(s.topic, tuple(_blocks(task, s.tokens)[-1][0])) for s in task.eval_set("shots0")}
    assert train_queries and eval_queries and not (train_queries & eval_queries)


def test_pretraining_statistics():
    task = FewShotTask(topic_prior=0.7, demo_noise=0.2, header_rate=0.3, train_queries=2)
    samples = [s for step in range(40) for s in task.train_batch(step, 64)]
    preferred = np.mean([s.rule == task.pretrain_rule[s.topic] for s in samples])
    letters = np.bincount([s.letter for s in samples], minlength=4) / len(samples)
    headers = np.mean([bool(s.header_positions) for s in samples])
    assert abs(preferred - 0.7) < 0.04 and abs(headers - 0.3) < 0.04 and np.all(abs(letters - 0.25) < 0.03)
    wrong = total = 0
    for s in samples[:600]:
        for _, choices, shown in _blocks(task, s.tokens)[:-1]:
            correct = next(letter for letter, v in choices.items() if v % 4 == s.rule)
            wrong, total = wrong + (shown != correct), total + 1
    assert abs(wrong / total - 0.2) < 0.05
    # demonstrations' letters are labelled (train_queries > 1), at the [ANS] before each
    batch = collate_text(samples[:16], task.vocab.pad_id)
    assert int((batch.labels != -100).sum()) == sum(s.n_objects + 1 for s in samples[:16])
    assert set(batch.labels[batch.labels != -100].tolist()) <= {task.vocab[x] for x in LETTERS}


def test_sft_mode_trains_on_zero_shot_benchmark_prompts():
    task = FewShotTask(train_on="sft")
    for s in task.train_batch(0, 32):
        assert s.n_objects == 0 and s.rule == task.benchmark_rule[s.topic] and not s.header_positions


@pytest.mark.parametrize("bad", [dict(n_values=6), dict(train_on="icl"), dict(eval_shots=[]), dict(demo_noise=1.0),
                                 dict(question_tokens=2), dict(eval_shots=[1, 1])])
def test_bad_settings(bad):
    with pytest.raises(TaskConfigError):
        FewShotTask(**bad)


def test_lora_starts_equal_and_trains_only_adapters():
    torch.manual_seed(0)
    task = FewShotTask(eval_size=8)
    model = Backbone(vocab_size=len(task.vocab), n_layers=2, d_model=32, n_heads=2, d_ff=64)
    batch = collate_text(task.eval_set("shots2"), task.vocab.pad_id)
    before = model(batch).detach()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, rank=4, alpha=8, targets=["qkv", "proj", "mlp.0"])
    assert torch.allclose(model(batch), before, atol=1e-6)
    assert all(isinstance(b.attn.qkv, LoRALinear) for b in model.blocks)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_a", "lora_b")) for n in trainable)
    model(batch).sum().backward()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    optimizer.step()
    assert not torch.allclose(model(batch), before, atol=1e-4)
    # base weights untouched, and a plain checkpoint loads into the adapted model (same names)
    for name, value in state.items():
        assert torch.equal(model.state_dict()[name], value)
    with pytest.raises(LabError, match="match no linear layer"):
        add_lora(Backbone(vocab_size=10, n_layers=1, d_model=16, n_heads=2, d_ff=32), targets=["nothing"])


FEWSHOT_TINY = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.d_ff=64", "task.n_topics=4",
                "task.eval_size=16", "train.batch_size=16", "train.eval_batch_size=32", "train.max_steps=10",
                "train.val_every=5", "train.warmup_steps=2", "trainer.enable_progress_bar=false",
                "+trainer.enable_model_summary=false"]


@pytest.mark.slow  # end-to-end training runs: `pytest --all` (CI) runs them
def test_pretrain_then_lora_sft_from_it(tmp_path, tiny_run):
    """experiment=fewshot_pretrain, then experiment=fewshot_sft init_from=<it> adapter=lora: the
    fine-tuned run starts from the pretrained weights, trains only the adapters and records its origin."""
    from omegaconf import OmegaConf

    from conftest import InitRecorder, compose_cfg
    from lab.runs import load_checkpoint
    from lab.train.run import train

    pre_dir = tmp_path / "pre"
    train(compose_cfg("train", ["experiment=fewshot_pretrain", *FEWSHOT_TINY]), pre_dir)
    pretrained = {k: v for k, v in load_checkpoint(pre_dir / "last.ckpt")["state_dict"].items()}
    init = InitRecorder()
    sft_dir = tmp_path / "sft"
    cfg = compose_cfg("train", ["experiment=fewshot_sft", "adapter=lora", f"init_from={pre_dir}", *FEWSHOT_TINY])
    train(cfg, sft_dir, extra_callbacks=[init])
    for name, value in pretrained.items():
        assert torch.equal(init.state[name], value), name           # starts from the pretrained weights
    tuned = load_checkpoint(sft_dir / "last.ckpt")["state_dict"]
    changed = {n for n, v in tuned.items() if n in pretrained and not torch.equal(v, pretrained[n])}
    assert not changed                                               # base weights frozen
    assert any(n.endswith("lora_b") and v.abs().sum() > 0 for n, v in tuned.items())
    assert OmegaConf.load(sft_dir / "config.yaml").init_from == str(pre_dir)
    # a run of another task is refused, naming the mismatch
    with pytest.raises(LabError, match="trained on task 'retrieval'"):
        train(compose_cfg("train", ["experiment=fewshot_sft", f"init_from={tiny_run.dir}", *FEWSHOT_TINY]), tmp_path / "bad")


def test_intermediate_labels_name_the_rule_and_what_each_demo_shows():
    task = FewShotTask(train_queries=2, demo_noise=0.3)
    for sample in task.train_batch(3, 32):
        words = task.vocab.decode(sample.tokens)
        labels = dict(sample.intermediate_labels)
        rule_token = task.vocab[f"value_{sample.rule}"]
        assert labels[sample.query_position] == rule_token                      # the query's [ANS]: the rule
        for (_, choices, shown), letter_pos in zip(_blocks(task, sample.tokens)[:-1], sample.demo_answer_positions):
            assert words[letter_pos] == shown
            assert labels[letter_pos - 1] == rule_token                          # each demo's [ANS]: the rule
            assert labels[letter_pos] == task.vocab[f"value_{choices[shown] % 4}"]  # its letter: the class it shows
