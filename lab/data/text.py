"""Turn task samples into padded text-token batches."""
from __future__ import annotations

from typing import Sequence

import torch

from tasks.retrieval import RetrievalSample


def collate_text(samples: Sequence[RetrievalSample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch.

    Keys: ``tokens`` [B, T], ``attend`` [B, T] (False on padding and noise tokens),
    ``answer_pos`` [B] (the last prompt token, where the answer is read), ``targets`` [B],
    ``n_objects`` [B], ``mid_targets`` [B] (the queried object's shape token, the intermediate
    variable; -1 when unknown). Training samples with follow-up queries also give
    ``extra_answer_pos``, ``extra_targets`` and ``extra_mid_targets`` [B, K] (-1 where a sample has
    fewer), read only by the training loss.
    """
    sequences = [s.tokens + s.followup_tokens for s in samples]
    B, T = len(samples), max(len(seq) for seq in sequences)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    attend = torch.zeros(B, T, dtype=torch.bool)
    for i, (s, seq) in enumerate(zip(samples, sequences)):
        tokens[i, : len(seq)] = torch.tensor(seq)
        attend[i, : len(seq)] = True
        if s.noise_positions:
            attend[i, s.noise_positions] = False
    batch = {
        "tokens": tokens,
        "attend": attend,
        "answer_pos": torch.tensor([s.query_position for s in samples]),
        "targets": torch.tensor([s.answer for s in samples]),
        "n_objects": torch.tensor([s.n_objects for s in samples]),
        "mid_targets": torch.tensor([s.query_shape for s in samples]),
    }
    K = max(len(s.followup_answers) for s in samples)
    if K:
        extra = torch.full((3, B, K), -1, dtype=torch.long)
        for i, s in enumerate(samples):
            if s.followup_answers:
                extra[:2, i, : len(s.followup_answers)] = torch.tensor(s.followup_answers).T
                extra[2, i, : len(s.followup_shapes)] = torch.tensor(s.followup_shapes)
        batch["extra_answer_pos"], batch["extra_targets"], batch["extra_mid_targets"] = extra
    return batch


class FixedLengthData:
    """Evaluation batches for tasks whose samples are equal-length ``tokens`` with the ``answer``
    read at the last position (the text-file task, the snowball task)."""

    modality = "text"

    def __init__(self, task, batch_size: int, n_objects: int = 0) -> None:
        self.task, self.batch_size, self.n_objects = task, batch_size, n_objects

    def eval_batches(self, split: str) -> list[dict]:
        samples = self.task.eval_set(split)
        out = []
        for i in range(0, len(samples), self.batch_size):
            chunk = samples[i : i + self.batch_size]
            tokens = torch.tensor([s.tokens for s in chunk])
            out.append({
                "tokens": tokens,
                "attend": torch.ones_like(tokens, dtype=torch.bool),
                "answer_pos": torch.full((len(chunk),), tokens.shape[1] - 1),
                "targets": torch.tensor([s.answer for s in chunk]),
                "n_objects": torch.full((len(chunk),), self.n_objects, dtype=torch.long),
            })
        return out
