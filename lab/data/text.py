"""Turn task samples into padded token batches (:class:`lab.data.batch.Batch`)."""
from __future__ import annotations

from typing import Sequence

import torch

from lab.data.batch import IGNORE_INDEX, Batch, padded


def collate_text(samples: Sequence, pad_id: int) -> Batch:
    """Right-padded batch of task samples (anything with the :class:`tasks.protocol.Sample` members).

    Training samples with follow-up queries (``followup_tokens``/``followup_answers``) are
    continued by them, and their answers are labelled too; evaluation reads only ``answer_pos``.
    ``roles`` come from ``sample.roles()``, ``objects`` from ``sample.objects()`` when defined,
    ``one_hop_labels`` from ``one_hop_answers``, ``mid_labels`` from ``query_shape``/``followup_shapes`` (or ``intermediate_labels``, (position, token)
    pairs) when the task has an intermediate variable.
    """
    sequences = [list(s.tokens) + list(getattr(s, "followup_tokens", [])) for s in samples]
    B, T = len(samples), max(len(seq) for seq in sequences)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    attend = torch.zeros(B, T, dtype=torch.bool)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mid = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    one_hop = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for i, (s, seq) in enumerate(zip(samples, sequences)):
        tokens[i, : len(seq)] = torch.tensor(seq)
        attend[i, : len(seq)] = True
        noise = getattr(s, "noise_positions", None)
        if noise:
            attend[i, noise] = False
        labels[i, s.query_position] = s.answer
        followups = getattr(s, "followup_answers", [])
        for position, answer in followups:
            labels[i, position] = answer
        for position, token in getattr(s, "one_hop_answers", []):
            one_hop[i, position] = token
        for position, token in getattr(s, "intermediate_labels", []):
            mid[i, position] = token
        if getattr(s, "query_shape", -1) >= 0:
            mid[i, s.query_position] = s.query_shape
            for (position, _), shape in zip(followups, getattr(s, "followup_shapes", [])):
                mid[i, position] = shape
    roles = {}
    if hasattr(samples[0], "roles"):
        per_sample = [s.roles() for s in samples]
        roles = {name: padded([r.get(name, []) for r in per_sample]) for name in per_sample[0]}
    objects = {}
    if hasattr(samples[0], "objects"):
        per_sample = [s.objects() for s in samples]
        for name, value in per_sample[0].items():
            rows = [o[name] for o in per_sample]
            objects[name] = torch.tensor(rows) if isinstance(value, int) else padded(rows)
    return Batch(
        tokens=tokens,
        attend=attend,
        labels=labels,
        answer_pos=torch.tensor([s.query_position for s in samples]),
        targets=torch.tensor([s.answer for s in samples]),
        n_objects=torch.tensor([getattr(s, "n_objects", 0) for s in samples]),
        roles=roles,
        objects=objects,
        mid_labels=mid if bool((mid != IGNORE_INDEX).any()) else None,
        one_hop_labels=one_hop if bool((one_hop != IGNORE_INDEX).any()) else None,
    )


class FixedLengthData:
    """Evaluation batches for tasks whose samples are equal-length ``tokens`` with the ``answer``
    read at the last position (the text-file task, the snowball task)."""

    modality = "text"

    def __init__(self, task, batch_size: int, n_objects: int = 0) -> None:
        self.task, self.batch_size, self.n_objects = task, batch_size, n_objects

    def eval_batches(self, split: str) -> list[Batch]:
        samples = self.task.eval_set(split)
        out = []
        for i in range(0, len(samples), self.batch_size):
            chunk = samples[i : i + self.batch_size]
            tokens = torch.tensor([s.tokens for s in chunk])
            B, T = tokens.shape
            labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
            labels[:, -1] = torch.tensor([s.answer for s in chunk])
            out.append(Batch(
                tokens=tokens,
                attend=torch.ones_like(tokens, dtype=torch.bool),
                labels=labels,
                answer_pos=torch.full((B,), T - 1),
                targets=labels[:, -1].clone(),
                n_objects=torch.full((B,), self.n_objects, dtype=torch.long),
            ))
        return out
