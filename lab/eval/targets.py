"""Named answer tokens an evaluator can compare (logit lens, logit attribution, attention
modification), one token id per prompt:

- ``answer``: the prompt's answer (``batch.targets``);
- ``top_other``: the token the clean model scores highest apart from the answer;
- any per-prompt object of the batch holding token ids, e.g. ``prior_answer`` (the few-shot task's
  answer under the topic's pretraining rule, the conflict task's memorised answer).
"""
from __future__ import annotations

import torch
from torch import Tensor

from lab.errors import LabError

COMPUTED = ("answer", "top_other")


def has_target(name: str, batch) -> bool:
    return name in COMPUTED or (name in batch.objects and batch.objects[name].dim() == 1)


def target_tokens(name: str, batch, clean_logits: Tensor | None = None) -> Tensor:
    """[B] token ids of target ``name``; ``clean_logits`` [B, V] (at the answer position) are
    needed for ``top_other``."""
    if name == "answer":
        return batch.targets
    if name == "top_other":
        if clean_logits is None:
            raise LabError("target top_other needs the clean logits")
        others = clean_logits.clone()
        others[torch.arange(len(others), device=others.device), batch.targets.to(others.device)] = float("-inf")
        return others.argmax(-1).to(batch.targets.device)
    if not has_target(name, batch):
        names = list(COMPUTED) + sorted(k for k, v in batch.objects.items() if v.dim() == 1)
        raise LabError(f"unknown target {name!r}; this task's batches offer {names}")
    return batch.objects[name].to(batch.targets.device)


def default_contrast(batch) -> str:
    """The second target of a contrast when none is named: the prior's answer where the task has
    one, else the clean model's best other token."""
    return "prior_answer" if has_target("prior_answer", batch) else "top_other"
