"""Token vocabularies shared by the synthetic tasks (pure Python, no torch)."""
from __future__ import annotations

from dataclasses import dataclass, field

PAD, BOS, CTX_END, QUE, NOISE, IMG = "[PAD]", "[BOS]", "[CTX_END]", "[QUE]", "[NOISE]", "[IMG]"
SPECIAL_TOKENS = (PAD, BOS, CTX_END, QUE, NOISE, IMG)


def object_vocab(n_colors: int, n_shapes: int, n_items: int) -> "Vocab":
    """Special tokens, then ``color_i``, ``shape_i`` and ``item_i``: the vocabulary of the
    retrieval tasks (shared token for token, so a model can move from one task to another)."""
    return Vocab(list(SPECIAL_TOKENS) + [f"color_{i}" for i in range(n_colors)]
                 + [f"shape_{i}" for i in range(n_shapes)] + [f"item_{i}" for i in range(n_items)])


@dataclass
class Vocab:
    """An ordered list of token strings with a string -> id lookup."""

    tokens: list[str]
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.index = {t: i for i, t in enumerate(self.tokens)}
        if len(self.index) != len(self.tokens):
            raise ValueError("vocabulary tokens must be unique")

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, token: str) -> int:
        return self.index[token]

    def encode(self, tokens: list[str]) -> list[int]:
        return [self.index[t] for t in tokens]

    def decode(self, ids) -> list[str]:
        return [self.tokens[int(i)] for i in ids]

    @property
    def pad_id(self) -> int:
        return self.index[PAD]
