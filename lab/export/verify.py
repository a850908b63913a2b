"""How far an exported model's logits are from the lab's, on a run's own evaluation prompts."""
from __future__ import annotations

import copy

import torch

from lab.data.text import collate_text
from lab.export.gpt_neox import hf_inputs


def evaluation_batches(task, batch_size: int = 256) -> list:
    """The task's evaluation prompts, every split, padded into batches; with noise tokens too
    when the task scatters any (``task.noise_tokens``)."""
    noisy = max(getattr(task, "noise_tokens", (0, 0))) > 0
    batches = []
    for split in task.splits:
        for noise in (False, True) if noisy else (False,):
            samples = task.eval_set(split, noise=noise)
            batches += [collate_text(samples[i:i + batch_size], task.vocab.pad_id)
                        for i in range(0, len(samples), batch_size)]
    return batches


@torch.no_grad()
def max_logit_diff(model, hf, batches) -> float:
    """Max |lab logits - HF logits| over every attendable position (real tokens) of ``batches``.
    Padding and noise rows are left out: the lab lets them attend to themselves, HF's 2D mask
    does not, and no real token reads them in either."""
    worst = 0.0
    for batch in batches:
        lab = model(batch)
        ref = hf(**hf_inputs(batch)).logits
        real = batch["attend"]
        worst = max(worst, float((lab[real] - ref[real]).abs().max()))
    return worst


@torch.no_grad()
def float32_error(model, batches) -> float:
    """Max |float32 logits - float64 logits| of the lab model itself over the same positions: the
    scale of rounding any float32 re-implementation is up against."""
    exact = copy.deepcopy(model).double()
    return max(float((model(b)[b.attend].double() - exact(b)[b.attend]).abs().max()) for b in batches)
