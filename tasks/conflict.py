"""The conflict task: an in-context answer against a memorised one, the data of the hand-built
model :mod:`lab.models.conflict_toy` (known answers of the competition-of-mechanisms evaluators).

A prompt lists ``n`` (topic, answer) pairs and ends with one of their topics::

    [BOS] t_1 a_1 t_2 a_2 ... t_n a_n t_q        -> answer: the a_i shown with t_q (in context)

Every topic also has a memorised answer ``prior[t]`` (a fixed table drawn from the seed). In
split ``conflict`` the in-context answer of the queried topic differs from its prior; in split
``agree`` they are equal. Batches carry the prior's answer as ``objects["prior_answer"]``.
Pure and seeded.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tasks.protocol import TaskConfigError
from tasks.vocab import BOS, PAD, Vocab

SPLITS = ("conflict", "agree")


@dataclass
class ConflictSample:
    tokens: list[int]
    answer: int                 # token id of the in-context answer
    prior_answer: int           # token id of the memorised answer of the queried topic
    n_objects: int              # number of pairs

    @property
    def query_position(self) -> int:
        return len(self.tokens) - 1

    def roles(self) -> dict[str, list[int]]:
        n = self.n_objects
        return {"demo_topic": [1 + 2 * i for i in range(n)], "demo_answer": [2 + 2 * i for i in range(n)],
                "query": [self.query_position]}

    def objects(self) -> dict:
        return {"prior_answer": self.prior_answer}


class ConflictTask:
    """Seeded (topic, answer) prompts with a memorised prior per topic (module docstring)."""

    name = "conflict"
    splits = SPLITS
    size_label = "pairs in context"

    def __init__(self, n_topics: int = 8, n_answers: int = 8, pairs=(2, 4), eval_size: int = 256, seed: int = 0) -> None:
        self.n_topics, self.n_answers, self.eval_size, self.seed = int(n_topics), int(n_answers), int(eval_size), int(seed)
        self.pairs = (int(pairs[0]), int(pairs[1]))
        if not 1 <= self.pairs[0] <= self.pairs[1] <= self.n_topics:
            raise TaskConfigError(f"conflict task pairs must satisfy 1 <= min <= max <= n_topics, got {list(self.pairs)}")
        if self.n_answers < 2:
            raise TaskConfigError(f"conflict task needs n_answers >= 2, got {self.n_answers}")
        self.vocab = Vocab([PAD, BOS] + [f"topic_{t}" for t in range(self.n_topics)]
                           + [f"answer_{a}" for a in range(self.n_answers)])
        self.prior = np.random.default_rng([self.seed, 0]).integers(0, self.n_answers, self.n_topics)
        self.id_objects = self.pairs

    def topic_token(self, t: int) -> int:
        return self.vocab[f"topic_{t}"]

    def answer_token(self, a: int) -> int:
        return self.vocab[f"answer_{a}"]

    @property
    def max_objects(self) -> int:
        return self.pairs[1]

    @property
    def max_prompt_len(self) -> int:
        return 2 + 2 * self.pairs[1]

    def chance_accuracy(self, samples) -> float:
        return 1.0 / self.n_answers

    def sample(self, rng: np.random.Generator, agree: bool) -> ConflictSample:
        n = int(rng.integers(self.pairs[0], self.pairs[1] + 1))
        topics = rng.choice(self.n_topics, n, replace=False)
        answers = rng.integers(0, self.n_answers, n)
        q = int(rng.integers(n))
        prior = int(self.prior[topics[q]])
        if agree:
            answers[q] = prior
        else:
            answers[q] = int(rng.choice([a for a in range(self.n_answers) if a != prior]))
        tokens = [self.vocab[BOS]]
        for t, a in zip(topics, answers):
            tokens += [self.topic_token(int(t)), self.answer_token(int(a))]
        tokens.append(self.topic_token(int(topics[q])))
        return ConflictSample(tokens, self.answer_token(int(answers[q])), self.answer_token(prior), n)

    def eval_set(self, split: str, noise: bool = False) -> list[ConflictSample]:
        if split not in self.splits:
            raise TaskConfigError(f"unknown split {split!r}; the conflict task has {list(self.splits)}")
        rng = np.random.default_rng([self.seed, 1, self.splits.index(split)])
        return [self.sample(rng, agree=split == "agree") for _ in range(self.eval_size)]

    def train_batch(self, step: int, batch_size: int, noise: bool = False) -> list[ConflictSample]:
        rng = np.random.default_rng([self.seed, 2, int(step)])
        return [self.sample(rng, agree=bool(rng.random() < 0.5)) for _ in range(batch_size)]
