"""One-hop retrieval (colour -> shape): the first hop of the two-hop task, on its own.

A prompt is ``[BOS] c1 s1 ... cN sN [QUE] c_q`` and the answer is ``s_q``, the shape paired with
the queried colour. It is associative recall: solvable by one induction head, so it is the
natural first stage of a curriculum towards the two-hop task, whose vocabulary it shares
token for token (a model trained here can start a two-hop run).

This module is also the smallest example of the task protocol (:mod:`tasks.protocol`): one file
here plus ``conf/task/one_hop.yaml`` is all a new task needs. Pure and seeded.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tasks.protocol import TaskConfigError
from tasks.vocab import BOS, QUE, object_vocab

SPLITS = ("id", "ood")


@dataclass
class OneHopSample:
    tokens: list[int]
    answer: int                              # token id of the queried shape
    n_objects: int
    colors: list[int]
    shapes: list[int]
    query_object: int
    query_position: int
    object_positions: list[tuple[int, int]] = field(default_factory=list)
    # training-only follow-up queries (task.train_queries > 1), as in tasks.retrieval
    followup_tokens: list[int] = field(default_factory=list)
    followup_answers: list[tuple[int, int]] = field(default_factory=list)

    def roles(self) -> dict[str, list[int]]:
        return {
            "context_color": [c for c, _ in self.object_positions],
            "context_shape": [s for _, s in self.object_positions],
            "query_marker": [self.query_position - 1],
            "query": [self.query_position],
        }

    def objects(self) -> dict:
        return {"colors": self.colors, "shapes": self.shapes, "query_object": self.query_object}


class OneHopTask:
    """Seeded generator of one-hop samples; the vocabulary is the two-hop task's."""

    name = "one_hop"
    splits = SPLITS
    has_intermediate = False  # no intermediate variable: objective.intermediate does not apply

    def __init__(self, n_colors: int = 24, n_shapes: int = 24, n_items: int = 16, id_objects=(2, 8),
                 ood_objects=(9, 16), eval_size: int = 512, train_queries: int = 1, seed: int = 0) -> None:
        self.n_colors, self.n_shapes, self.n_items = int(n_colors), int(n_shapes), int(n_items)
        self.id_objects, self.ood_objects = tuple(id_objects), tuple(ood_objects)
        self.eval_size, self.seed, self.train_queries = int(eval_size), int(seed), int(train_queries)
        if self.train_queries < 1:
            raise TaskConfigError(f"task.train_queries must be >= 1, got {self.train_queries}")
        if not 1 <= self.id_objects[0] <= self.id_objects[1] or self.ood_objects[0] > self.ood_objects[1]:
            raise TaskConfigError(f"task.id_objects={list(id_objects)} / task.ood_objects={list(ood_objects)} "
                                  "must be [min, max] with 1 <= min <= max")
        if self.max_objects > min(self.n_colors, self.n_shapes):
            raise TaskConfigError(f"up to {self.max_objects} objects need as many distinct colours and shapes; "
                                  f"raise task.n_colors/task.n_shapes (now {self.n_colors}/{self.n_shapes})")
        if self.eval_size < 1:
            raise TaskConfigError(f"task.eval_size must be >= 1, got {self.eval_size}")
        self.vocab = object_vocab(self.n_colors, self.n_shapes, self.n_items)
        self._color0, self._shape0 = self.vocab["color_0"], self.vocab["shape_0"]

    @property
    def max_objects(self) -> int:
        return max(self.id_objects[1], self.ood_objects[1])

    @property
    def max_prompt_len(self) -> int:
        return 2 * self.max_objects + 3 + 3 * (self.train_queries - 1)

    def sample(self, rng: np.random.Generator, n_objects: int) -> OneHopSample:
        colors = rng.choice(self.n_colors, n_objects, replace=False).tolist()
        shapes = rng.choice(self.n_shapes, n_objects, replace=False).tolist()
        query = int(rng.integers(n_objects))
        tokens, positions = [self.vocab[BOS]], []
        for c, s in zip(colors, shapes):
            positions.append((len(tokens), len(tokens) + 1))
            tokens += [self._color0 + c, self._shape0 + s]
        tokens += [self.vocab[QUE], self._color0 + colors[query]]
        return OneHopSample(tokens, self._shape0 + shapes[query], n_objects, colors, shapes, query,
                            len(tokens) - 1, positions)

    def train_batch(self, step: int, batch_size: int, noise: bool = True) -> list[OneHopSample]:
        rng = np.random.default_rng([self.seed, 0, int(step)])
        lo, hi = self.id_objects
        batch = [self.sample(rng, int(rng.integers(lo, hi + 1))) for _ in range(batch_size)]
        for s in batch if self.train_queries > 1 else ():
            others = [i for i in rng.permutation(s.n_objects).tolist() if i != s.query_object][: self.train_queries - 1]
            tokens, position = [s.answer], len(s.tokens) + 1
            for obj in others:
                tokens += [self.vocab[QUE], self._color0 + s.colors[obj], self._shape0 + s.shapes[obj]]
                s.followup_answers.append((position + 1, self._shape0 + s.shapes[obj]))
                position += 3
            s.followup_tokens = tokens[:-1]
        return batch

    def eval_set(self, split: str, noise: bool = True) -> list[OneHopSample]:
        if split not in SPLITS:
            raise TaskConfigError(f"unknown split {split!r}; expected one of {SPLITS}")
        lo, hi = self.id_objects if split == "id" else self.ood_objects
        rng = np.random.default_rng([self.seed, 1, SPLITS.index(split)])
        return [self.sample(rng, lo + i % (hi - lo + 1)) for i in range(self.eval_size)]

    def chance_accuracy(self, samples: list[OneHopSample]) -> float:
        """Guessing uniformly among the shapes present in each prompt."""
        return float(np.mean([1.0 / s.n_objects for s in samples]))
