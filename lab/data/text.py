"""Turn task samples into padded text-token batches."""
from __future__ import annotations

from typing import Sequence

import torch

from tasks.retrieval import RetrievalSample


def collate_text(samples: Sequence[RetrievalSample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch.

    Keys: ``tokens`` [B, T], ``attend`` [B, T] (False on padding and noise tokens),
    ``answer_pos`` [B] (the last prompt token, where the answer is read), ``targets`` [B],
    ``n_objects`` [B].
    """
    B, T = len(samples), max(len(s.tokens) for s in samples)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    attend = torch.zeros(B, T, dtype=torch.bool)
    for i, s in enumerate(samples):
        tokens[i, : len(s.tokens)] = torch.tensor(s.tokens)
        attend[i, : len(s.tokens)] = True
        if s.noise_positions:
            attend[i, s.noise_positions] = False
    return {
        "tokens": tokens,
        "attend": attend,
        "answer_pos": torch.tensor([s.query_position for s in samples]),
        "targets": torch.tensor([s.answer for s in samples]),
        "n_objects": torch.tensor([s.n_objects for s in samples]),
    }
