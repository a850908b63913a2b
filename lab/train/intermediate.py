"""Intermediate supervision, an objective part (off by default: ``objective.intermediate.weight=0``).

The two-hop task has an intermediate variable: the shape of the queried object (hop 1: colour ->
shape; hop 2: shape -> item). This part trains the residual stream at layer ``layer``, at
every query position, to predict that shape token through the model's own readout (a logit lens
target). It hands the model the first hop, which is what lets it compose the two (docs/learning.md).

It is a training aid that changes the science: it tells the model *which* variable to route
(the shape identity), which favours symbolic binding. ``space=embedding`` scores h against the
input embeddings instead of the readout; ``space=probe`` reads it with the part's own linear
head (trained with the model, never used at evaluation), so the model's readout is not asked to
name shapes at a middle layer. ``anneal`` = [start, end] fades the weight linearly to 0 between
those global steps, so the aid can form the circuit and then leave; ``start`` delays it (weight 0
before that step). Evaluation never sees it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lab.data.batch import IGNORE_INDEX
from lab.errors import LabError
from lab.train.objectives import LabelledRun, Objective

SPACES = ("readout", "embedding", "probe")


def middle_layer(model, layer: int | None, n_layers: int | None, name: str) -> int:
    """The residual-stream layer a part reads: ``layer``, or the middle one (``n_layers // 2``)."""
    n_layers = model.n_layers if n_layers is None else n_layers
    layer = n_layers // 2 if layer is None else layer
    if not 0 <= layer <= n_layers:
        raise LabError(f"objective.{name}.layer={layer} must lie in 0..{n_layers} (the model's layers)")
    return int(layer)


class IntermediateSupervision(Objective):
    """Cross-entropy of ``readout(h_layer)`` at the query positions against the queried shape."""

    needs_intermediate = True  # left out (with a warning) for tasks whose samples have no intermediate variable

    def __init__(self, model=None, task=None, weight: float = 1.0, layer: int | None = None, anneal=None,
                 space: str = "readout", n_layers: int | None = None, start: int = 0,
                 batches: str = "all") -> None:
        super().__init__(weight, anneal, "intermediate", start, batches)
        layer = middle_layer(model, layer, n_layers, "intermediate")
        if space not in SPACES:
            raise LabError(f"objective.intermediate.space={space!r} is unknown; choose one of {', '.join(SPACES)}")
        self.layer, self.space = layer, space
        self.layers = (self.layer,)
        if space == "probe":
            embedding = model.token_embedding()
            if embedding is None:
                raise LabError("objective.intermediate.space=probe needs a model with token embeddings (to size its head)")
            vocab_size, d_model = embedding.shape
            self.probe = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, vocab_size))

    def loss(self, model, batch, out: LabelledRun) -> torch.Tensor:
        return self.loss_at(model, batch, out.captured[self.layer])

    def loss_at(self, model, batch, h: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over every query (first and follow-ups) with a known shape target;
        ``h`` is the residual stream [B, T, D] at ``self.layer``."""
        mid = batch.get("mid_labels")
        if mid is None or not bool((mid != IGNORE_INDEX).any()):
            raise LabError("objective.intermediate needs batches with intermediate (shape) targets; this task gives none")
        valid = mid != IGNORE_INDEX
        return F.cross_entropy(self.logits(model, h[valid]), mid[valid])

    def logits(self, model, h: torch.Tensor) -> torch.Tensor:
        """Scores of every token for ``h`` [N, D]: the model's readout, or (``space=embedding``)
        the normalised h against the input embeddings, which asks h to *be* the shape's input
        vector rather than merely decodable as it."""
        if self.space == "readout":
            return model.readout(h)
        if self.space == "probe":
            return self.probe(h)
        embedding = model.token_embedding()
        if embedding is None:
            raise LabError("objective.intermediate.space=embedding needs a model with input token embeddings")
        return F.layer_norm(h, h.shape[-1:]) @ embedding.T


class SlotSupervision(Objective):
    """Positional-control aid: at every query position, the residual stream at ``layer`` is
    trained to name the queried object's *context slot* (its index in the context, 0..N-1)
    through the part's own head (LayerNorm + linear, never used at evaluation).

    Where :class:`IntermediateSupervision` hands the model the queried shape (the symbolic
    route), this hands it the queried object's place, so binding by position is the easy route.
    Slots are read from the batch: the slot whose shape is the query's intermediate target.
    """

    needs_intermediate = True

    def __init__(self, model=None, task=None, weight: float = 1.0, layer: int | None = None, anneal=None,
                 n_layers: int | None = None, start: int = 0, batches: str = "all") -> None:
        super().__init__(weight, anneal, "slot", start, batches)
        self.layer = middle_layer(model, layer, n_layers, "slot")
        self.layers = (self.layer,)
        self.shape0 = int(task.vocab["shape_0"])
        d_model = int(model.token_embedding().shape[1])
        self.head = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, int(task.max_objects)))

    def applies(self, batch) -> bool:
        return batch.get("mid_labels") is not None and "shapes" in batch.objects and self.acts_on(batch)

    def slot_labels(self, batch) -> torch.Tensor:
        """[B, T] context slot of the queried object at every query position (IGNORE_INDEX elsewhere)."""
        mid = batch["mid_labels"]
        shapes = batch.objects["shapes"]                      # [B, N] shape index per slot (-1 = none)
        match = (mid[..., None] - self.shape0) == shapes[:, None, :]  # [B, T, N]
        valid = (mid != IGNORE_INDEX) & match.any(-1)
        return torch.where(valid, match.float().argmax(-1), torch.full_like(mid, IGNORE_INDEX))

    def loss(self, model, batch, out: LabelledRun) -> torch.Tensor:
        labels = self.slot_labels(batch)
        valid = labels != IGNORE_INDEX
        return F.cross_entropy(self.head(out.captured[self.layer][valid]), labels[valid])
