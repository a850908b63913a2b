"""The retrieval task generator: determinism, splits, answers checked by brute force, metadata, errors."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from tasks.protocol import TaskConfigError
from tasks.retrieval import RetrievalTask
from tasks.vocab import BOS, CTX_END, NOISE, QUE, SPECIAL_TOKENS

SMALL = dict(n_colors=10, n_shapes=10, n_items=10, id_objects=(2, 4), ood_objects=(5, 7), eval_size=30)


def as_tuple(sample):
    return (tuple(sample.tokens), sample.answer, tuple(sample.noise_positions))


def solve_from_strings(strings: list[str]) -> str:
    """Answer a prompt from its token strings alone: the query colour's shape in the context,
    then that shape's item in the associations."""
    assert strings[0] == BOS and strings[-2] == QUE
    ctx_end, query = strings.index(CTX_END), strings[-1]
    context = [s for s in strings[1:ctx_end] if s != NOISE]
    assert len(context) % 2 == 0
    pairs = list(zip(context[0::2], context[1::2]))
    assert all(c.startswith("color_") and s.startswith("shape_") for c, s in pairs)
    shape = [s for c, s in pairs if c == query]
    assert len(shape) == 1, f"query colour {query} appears {len(shape)} times in the context"
    assoc = strings[ctx_end + 1 : -2]
    links = dict(zip(assoc[0::2], assoc[1::2]))
    assert len(links) == len(assoc) // 2, "a shape has two associations"
    return links[shape[0]]


# ---------------------------------------------------------------------------------- determinism
def test_same_seed_gives_same_samples():
    a, b = RetrievalTask(**SMALL, seed=3), RetrievalTask(**SMALL, seed=3)
    for step in (0, 1, 17):
        assert [as_tuple(s) for s in a.train_batch(step, 16)] == [as_tuple(s) for s in b.train_batch(step, 16)]
    for split in ("id", "ood"):
        assert [as_tuple(s) for s in a.eval_set(split)] == [as_tuple(s) for s in b.eval_set(split)]
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    assert as_tuple(a.sample(rng_a, 4)) == as_tuple(b.sample(rng_b, 4))


def test_train_batch_is_a_pure_function_of_step():
    task = RetrievalTask(**SMALL, seed=0)
    later = [as_tuple(s) for s in task.train_batch(5, 8)]
    task.train_batch(0, 8), task.eval_set("id")  # other draws in between change nothing
    assert [as_tuple(s) for s in task.train_batch(5, 8)] == later
    assert [as_tuple(s) for s in task.train_batch(6, 8)] != later


def test_different_seed_gives_different_samples():
    a, b = RetrievalTask(**SMALL, seed=0), RetrievalTask(**SMALL, seed=1)
    assert [as_tuple(s) for s in a.train_batch(0, 16)] != [as_tuple(s) for s in b.train_batch(0, 16)]
    for split in ("id", "ood"):
        assert [as_tuple(s) for s in a.eval_set(split)] != [as_tuple(s) for s in b.eval_set(split)]


def test_eval_sets_differ_from_training_and_between_splits():
    task = RetrievalTask(**SMALL, seed=0)
    train = {as_tuple(s)[0] for step in range(5) for s in task.train_batch(step, 32)}
    id_set = [as_tuple(s)[0] for s in task.eval_set("id")]
    assert len(set(id_set) - train) > len(id_set) // 2  # drawn from its own stream, not the training batches
    assert id_set != [as_tuple(s)[0] for s in task.eval_set("ood")]


# --------------------------------------------------------------------------------------- splits
def test_object_counts_per_split():
    task = RetrievalTask(**SMALL, seed=0)
    counts = [s.n_objects for step in range(20) for s in task.train_batch(step, 16)]
    assert min(counts) == 2 and max(counts) == 4  # the whole ID range is drawn, nothing else
    for split, (lo, hi) in (("id", (2, 4)), ("ood", (5, 7))):
        assert task.object_range(split) == (lo, hi)
        assert {s.n_objects for s in task.eval_set(split)} == set(range(lo, hi + 1))


@pytest.mark.parametrize("eval_size", [30, 31])
def test_eval_sets_are_fixed_and_balanced(eval_size):
    task = RetrievalTask(**{**SMALL, "eval_size": eval_size}, seed=0)
    for split in ("id", "ood"):
        samples = task.eval_set(split)
        assert len(samples) == eval_size
        per_count = Counter(s.n_objects for s in samples)
        assert max(per_count.values()) - min(per_count.values()) <= 1
        assert task.eval_set(split) is samples  # cached: the same fixed set every time
        fresh = RetrievalTask(**{**SMALL, "eval_size": eval_size}, seed=0)
        assert [as_tuple(s) for s in fresh.eval_set(split)] == [as_tuple(s) for s in samples]


def test_chance_accuracy():
    task = RetrievalTask(**SMALL, seed=0)
    samples = task.eval_set("id")
    assert task.chance_accuracy(samples) == pytest.approx(np.mean([1 / 2, 1 / 3, 1 / 4]))


def test_unknown_split_is_refused():
    with pytest.raises(TaskConfigError, match="unknown split"):
        RetrievalTask(**SMALL).eval_set("test")


# ------------------------------------------------------------------------ answers and metadata
def all_samples(task):
    yield from (s for step in range(10) for s in task.train_batch(step, 16))
    yield from task.eval_set("id")
    yield from task.eval_set("ood")
    yield from task.eval_set("ood", noise=False)


@pytest.mark.parametrize("noise", [(0, 0), (1, 5)])
def test_answers_by_brute_force(noise):
    task = RetrievalTask(**SMALL, noise_tokens=noise, seed=0)
    n = 0
    for s in all_samples(task):
        strings = task.vocab.decode(s.tokens)
        assert task.vocab.decode([s.answer]) == [solve_from_strings(strings)]
        assert s.answer in task.answer_token_ids
        assert s.answer == task.vocab[f"item_{s.answer_item}"]
        n += 1
    assert n > 200


@pytest.mark.parametrize("noise", [(0, 0), (2, 6)])
def test_metadata_matches_tokens(noise):
    task = RetrievalTask(**SMALL, noise_tokens=noise, seed=1)
    V = task.vocab
    for s in all_samples(task):
        tok = V.decode(s.tokens)
        N = s.n_objects
        assert len(s.colors) == len(s.shapes) == len(s.items) == len(s.object_positions) == N
        assert len(set(s.colors)) == len(set(s.shapes)) == len(set(s.items)) == N
        for i, (cp, sp) in enumerate(s.object_positions):
            assert tok[cp] == f"color_{s.colors[i]}" and tok[sp] == f"shape_{s.shapes[i]}"
            assert cp < sp < s.ctx_end_position
        assert sorted(s.association_order) == list(range(N))
        for obj, (sp, ip) in zip(s.association_order, s.association_positions):
            assert tok[sp] == f"shape_{s.shapes[obj]}" and tok[ip] == f"item_{s.items[obj]}"
            assert s.ctx_end_position < sp and ip == sp + 1
        assert tok[s.ctx_end_position] == CTX_END and tok.count(CTX_END) == 1
        assert s.query_position == len(s.tokens) - 1 and tok[-2] == QUE
        assert tok[s.query_position] == f"color_{s.colors[s.query_object]}"
        assert [i for i, t in enumerate(tok) if t == NOISE] == s.noise_positions
        assert all(0 < p < s.ctx_end_position for p in s.noise_positions)
        assert len(s.tokens) == 4 * N + 4 + len(s.noise_positions)
        assert len(s.tokens) <= task.max_prompt_len
        assert not any(t in SPECIAL_TOKENS for t in tok[1 : s.ctx_end_position] if t != NOISE)


def test_noise_tokens_present_when_configured():
    task = RetrievalTask(**SMALL, noise_tokens=(1, 3), seed=0)
    batch = [s for step in range(10) for s in task.train_batch(step, 16)]
    counts = Counter(len(s.noise_positions) for s in batch)
    assert set(counts) == {1, 2, 3}
    assert all(not s.noise_positions for s in task.train_batch(0, 16, noise=False))
    assert all(not s.noise_positions for s in task.eval_set("id", noise=False))
    assert any(s.noise_positions for s in task.eval_set("id", noise=True))
    # Noise goes into random gaps, not always the same place.
    assert len({tuple(s.noise_positions) for s in batch if len(s.noise_positions) == 1}) > 3
    clean = RetrievalTask(**SMALL, seed=0)
    assert all(not s.noise_positions for step in range(5) for s in clean.train_batch(step, 16))


def test_max_prompt_len_is_reached():
    task = RetrievalTask(**{**SMALL, "eval_size": 60}, noise_tokens=(0, 3), seed=0)
    longest = max(len(s.tokens) for s in task.eval_set("ood"))
    assert longest == task.max_prompt_len == 4 * 7 + 4 + 3


def test_vocabulary_layout():
    task = RetrievalTask(**SMALL)
    assert len(task.vocab) == len(SPECIAL_TOKENS) + 10 + 10 + 10
    assert task.vocab.decode(task.answer_token_ids) == [f"item_{i}" for i in range(10)]
    assert task.vocab.decode([task.vocab.pad_id]) == ["[PAD]"]


# ------------------------------------------------------------------------------ invalid settings
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(id_objects=(2, 8), ood_objects=(8, 12)), "overlap"),
        (dict(id_objects=(5, 9), ood_objects=(2, 6)), "overlap"),
        (dict(id_objects=(2, 8), ood_objects=(3, 4)), "overlap"),
        (dict(n_colors=6, id_objects=(2, 4), ood_objects=(5, 7)), r"up to 7 objects .*task\.n_colors=6"),
        (dict(n_shapes=3, id_objects=(2, 4), ood_objects=(5, 7)), r"task\.n_shapes=3"),
        (dict(n_items=5, id_objects=(2, 4), ood_objects=(5, 7)), r"task\.n_items=5"),
        (dict(id_objects=(4, 2)), r"task\.id_objects=\[4, 2\]: min is larger than max"),
        (dict(ood_objects=(12, 9)), r"task\.ood_objects.*min is larger than max"),
        (dict(noise_tokens=(3, 1)), r"task\.noise_tokens.*min is larger than max"),
        (dict(noise_tokens=(-1, 2)), r"task\.noise_tokens must be >= 0"),
        (dict(id_objects=(0, 4)), r"task\.id_objects must start at >= 1"),
        (dict(id_objects=5), r"task\.id_objects must be a pair"),
        (dict(id_objects=("a", "b")), r"task\.id_objects must be a pair"),
        (dict(ood_objects=(1, 2, 3)), r"task\.ood_objects must be a pair"),
        (dict(n_colors=0), r"task\.n_colors must be >= 1"),
        (dict(eval_size=0), r"task\.eval_size must be >= 1"),
    ],
)
def test_invalid_settings_raise_clear_errors(kwargs, message):
    base = dict(n_colors=24, n_shapes=24, n_items=16, id_objects=(2, 8), ood_objects=(9, 16))
    with pytest.raises(TaskConfigError, match=message):
        RetrievalTask(**{**base, **kwargs})


def test_boundary_settings_are_accepted():
    # Exactly as many colours/shapes/items as the largest object count is enough.
    task = RetrievalTask(n_colors=7, n_shapes=7, n_items=7, id_objects=(2, 4), ood_objects=(5, 7), eval_size=9)
    assert {s.n_objects for s in task.eval_set("ood")} == {5, 6, 7}
    # OOD may lie below ID, and a range may be a single count.
    task = RetrievalTask(n_colors=8, n_shapes=8, n_items=8, id_objects=(5, 8), ood_objects=(2, 2), eval_size=4)
    assert {s.n_objects for s in task.eval_set("ood")} == {2}
