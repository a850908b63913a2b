"""Optional intermediate supervision (off by default: ``train.intermediate.weight=0``).

The two-hop task has an intermediate variable: the shape of the queried object (hop 1: colour ->
shape; hop 2: shape -> item). This objective trains the residual stream at layer ``layer``, at
every query position, to predict that shape token through the model's own readout (a logit lens
target). It hands the model the first hop, which is what lets it compose the two (docs/learning.md).

It is a training aid that changes the science: it tells the model *which* variable to route
(the shape identity), which favours symbolic binding. ``space=embedding`` scores h against the
input embeddings instead of the readout. ``anneal`` = [start, end] fades the weight
linearly to 0 between those global steps, so the aid can form the circuit and then leave.
Evaluation never sees it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lab.errors import LabError


class IntermediateSupervision:
    """Cross-entropy of ``readout(h_layer)`` at the query positions against the queried shape."""

    def __init__(self, layer: int, weight: float, n_layers: int, anneal=None, space: str = "readout") -> None:
        if not 0 <= layer <= n_layers:
            raise LabError(f"train.intermediate.layer={layer} must lie in 0..{n_layers} (the model's layers)")
        if weight < 0:
            raise LabError(f"train.intermediate.weight must be >= 0, got {weight}")
        if space not in ("readout", "embedding"):
            raise LabError(f"train.intermediate.space={space!r} is unknown; choose readout or embedding")
        self.layer, self.weight, self.space = int(layer), float(weight), space
        self.anneal = None
        if anneal is not None:
            try:
                start, end = (int(v) for v in anneal)
            except (TypeError, ValueError):
                raise LabError(f"train.intermediate.anneal must be null or [start, end] steps, got {anneal!r}") from None
            if not 0 <= start <= end:
                raise LabError(f"train.intermediate.anneal={[start, end]} needs 0 <= start <= end")
            self.anneal = (start, end)

    def weight_at(self, step: int) -> float:
        """The loss weight at global step ``step`` (constant, or fading linearly to 0)."""
        if self.anneal is None:
            return self.weight
        start, end = self.anneal
        if step < start:
            return self.weight
        if step >= end:
            return 0.0
        return self.weight * (end - step) / (end - start)

    def fading(self, step: int) -> bool:
        """True while an annealed aid still acts: the run is not yet solving the task on its own."""
        return self.anneal is not None and self.weight_at(step) > 0

    def loss(self, model, batch, h: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over every query (first and follow-ups) with a known shape target;
        ``h`` is the captured residual stream [B, T, D] at ``self.layer``."""
        positions, targets = batch["answer_pos"][:, None], batch["mid_targets"][:, None]
        if "extra_answer_pos" in batch:
            positions = torch.cat([positions, batch["extra_answer_pos"]], dim=1)
            targets = torch.cat([targets, batch["extra_mid_targets"]], dim=1)
        valid = targets >= 0
        if not valid.any():
            raise LabError("train.intermediate needs batches with intermediate (shape) targets; this task gives none")
        rows = torch.arange(len(h), device=h.device)[:, None].expand_as(positions)
        return F.cross_entropy(self.logits(model, h[rows[valid], positions[valid]]), targets[valid])

    def logits(self, model, h: torch.Tensor) -> torch.Tensor:
        """Scores of every token for ``h`` [N, D]: the model's readout, or (``space=embedding``)
        the normalised h against the input embeddings, which asks h to *be* the shape's input
        vector rather than merely decodable as it."""
        if self.space == "readout":
            return model.readout(h)
        embedding = getattr(getattr(model, "backbone", model), "tok_emb", None)
        if embedding is None:
            raise LabError("train.intermediate.space=embedding needs a model with input embeddings (tok_emb)")
        return F.layer_norm(h, h.shape[-1:]) @ embedding.weight.T
