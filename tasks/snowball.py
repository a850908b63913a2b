"""The snowball task: prompts of random class tokens; the answer is the class of the last token.

The evaluation data of the hand-built snowball model (:mod:`lab.models.snowball`). Pure and seeded.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tasks.protocol import TaskConfigError


@dataclass
class SnowballSample:
    tokens: list[int]
    answer: int
    n_objects: int = 1

    @property
    def query_position(self) -> int:
        return len(self.tokens) - 1

    def roles(self) -> dict[str, list[int]]:
        return {"query": [self.query_position]}


class SnowballTask:
    """Prompts of random class tokens; the answer is the class of the last token."""

    name = "snowball"
    splits = ("id",)
    id_objects = (1, 1)

    def __init__(self, n_classes: int, n_samples: int, seq_len: int, seed: int) -> None:
        self.n_classes, self.n_samples, self.seq_len, self.seed = n_classes, n_samples, seq_len, seed

    def eval_set(self, split: str, noise: bool = False) -> list[SnowballSample]:
        if split not in self.splits:
            raise TaskConfigError(f"unknown split {split!r}; the snowball task has {self.splits}")
        rng = np.random.default_rng(self.seed)
        out = []
        for i in range(self.n_samples):
            tokens = rng.integers(0, self.n_classes, self.seq_len).tolist()
            tokens[-1] = i % self.n_classes  # balanced answers
            out.append(SnowballSample(tokens, tokens[-1]))
        return out

    def chance_accuracy(self, samples) -> float:
        return 1.0 / self.n_classes
