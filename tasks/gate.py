"""The gate task: a picture of ``P`` image tokens, one of which shows a value; the answer is the
value. The data of the hand-built image models of :mod:`lab.models.gate_toy` (known answers of
the narrow-gate evaluator). Pure and seeded::

    [BOS] [IMG] x P [CTX_END] [QUE]        -> answer: value_v, shown by image token ``slot``

The picture itself (``slot``, ``value``) is turned into image features by the model's data
(``GateToyModel.evaluation_data``). Roles: ``image`` (the P image tokens), ``ctx_end`` (the token
after the image) and ``query``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tasks.protocol import TaskConfigError
from tasks.vocab import BOS, CTX_END, IMG, PAD, QUE, Vocab


@dataclass
class GateSample:
    tokens: list[int]
    answer: int
    value: int          # the value the picture shows
    slot: int           # which image token shows it (0..P-1)
    n_image_tokens: int
    n_objects: int = 1

    @property
    def query_position(self) -> int:
        return len(self.tokens) - 1

    def roles(self) -> dict[str, list[int]]:
        P = self.n_image_tokens
        return {"image": list(range(1, P + 1)), "ctx_end": [P + 1], "query": [P + 2]}


class GateTask:
    """Seeded pictures of one value among ``n_image_tokens`` tokens (module docstring)."""

    name = "gate"
    splits = ("id",)
    id_objects = (1, 1)

    def __init__(self, n_values: int = 8, n_image_tokens: int = 9, eval_size: int = 256, seed: int = 0) -> None:
        if n_values < 2 or n_image_tokens < 2:
            raise TaskConfigError(f"gate task needs n_values >= 2 and n_image_tokens >= 2, got {n_values}, {n_image_tokens}")
        self.n_values, self.n_image_tokens, self.eval_size, self.seed = int(n_values), int(n_image_tokens), int(eval_size), int(seed)
        self.vocab = Vocab([PAD, BOS, IMG, CTX_END, QUE] + [f"value_{v}" for v in range(self.n_values)])

    def value_token(self, v: int) -> int:
        return self.vocab[f"value_{v}"]

    @property
    def max_objects(self) -> int:
        return 1

    @property
    def max_prompt_len(self) -> int:
        return self.n_image_tokens + 3

    def chance_accuracy(self, samples) -> float:
        return 1.0 / self.n_values

    def sample(self, rng: np.random.Generator) -> GateSample:
        v, slot = int(rng.integers(self.n_values)), int(rng.integers(self.n_image_tokens))
        tokens = [self.vocab[BOS]] + [self.vocab[IMG]] * self.n_image_tokens + [self.vocab[CTX_END], self.vocab[QUE]]
        return GateSample(tokens, self.value_token(v), v, slot, self.n_image_tokens)

    def eval_set(self, split: str, noise: bool = False) -> list[GateSample]:
        if split not in self.splits:
            raise TaskConfigError(f"unknown split {split!r}; the gate task has {list(self.splits)}")
        rng = np.random.default_rng([self.seed, 1])
        return [self.sample(rng) for _ in range(self.eval_size)]

    def train_batch(self, step: int, batch_size: int, noise: bool = False) -> list[GateSample]:
        rng = np.random.default_rng([self.seed, 2, int(step)])
        return [self.sample(rng) for _ in range(batch_size)]
