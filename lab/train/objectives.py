"""Training objectives as parts: each adds ``weight_at(step) * loss`` to the training loss.

A part is an ``nn.Module`` (so its own heads, if any, are trained and checkpointed) built from
its ``conf/objective/<name>`` node with the run's ``model`` and ``task`` injected, the way
lightning-hydra-template injects ``net`` into a LightningModule. It declares

- ``layers``: residual-stream layers it reads (captured in the one forward pass all parts share);
- ``applies(batch)``: whether this batch carries what it needs (e.g. image-only losses);
- ``weight_at(step)``: its weight at a global step (constant unless it anneals);
- ``loss(model, batch, out)``: a scalar, from ``out`` (:class:`LabelledRun`).

Parts in this module: :class:`AnswerLoss`, :class:`OneHopQueries`. Others: ``lab.train.intermediate.IntermediateSupervision``
(queried shape at a middle layer) and ``lab.train.grounding.GroundingLoss`` (image tokens <->
colour/shape tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lab.data.batch import IGNORE_INDEX
from lab.errors import LabError


@dataclass
class LabelledRun:
    """The shared forward pass of a training step."""

    logits: Tensor                 # [N, V] at the labelled positions (``mask``), row-major
    labels: Tensor                 # [N] their labels
    mask: Tensor                   # [B, T] bool: positions with a label
    first: Tensor                  # [B] index into ``logits`` of each sample's evaluated query
    captured: dict[int, Tensor]    # layer -> h_l [B, T, D]

    @property
    def answer_logits(self) -> Tensor:
        """[B, V] logits of the evaluated query (what validation measures)."""
        return self.logits[self.first]


def labelled_run(model, batch, capture=()) -> LabelledRun:
    """One forward pass reading out only where ``batch.labels`` has a target."""
    mask = batch["labels"] != IGNORE_INDEX
    out = model.run(batch, positions=mask, capture=sorted(set(capture)))
    B, T = mask.shape
    index = mask.flatten().cumsum(0) - 1  # position in the row-major list of labelled positions
    first = index[torch.arange(B, device=mask.device) * T + batch["answer_pos"]]
    return LabelledRun(out.logits, batch["labels"][mask], mask, first, out.captured)


BATCH_KINDS = ("all", "text", "image")  # which training batches a part acts on


class Objective(nn.Module):
    """Base of objective parts: a weight (optionally faded out) and a loss."""

    layers: tuple[int, ...] = ()
    needs_images = False        # the builder refuses the part in runs without an image stream
    needs_intermediate = False  # the builder leaves the part out for tasks without an intermediate variable
    task_option: str | None = None  # a task setting that must be > 0 for the part to act (else it is left out)

    def __init__(self, weight: float = 1.0, anneal=None, name: str = "objective", start: int = 0,
                 batches: str = "all") -> None:
        super().__init__()
        if weight < 0:
            raise LabError(f"objective.{name}.weight must be >= 0, got {weight}")
        if batches not in BATCH_KINDS:
            raise LabError(f"objective.{name}.batches={batches!r} is unknown; choose one of {', '.join(BATCH_KINDS)}")
        self.batches = batches
        if int(start) < 0:
            raise LabError(f"objective.{name}.start must be >= 0 (the first step the part acts), got {start}")
        self.weight, self.anneal, self.start = float(weight), _anneal(anneal, name), int(start)
        if self.anneal is not None and self.anneal[0] < self.start:
            raise LabError(f"objective.{name}.anneal={list(self.anneal)} begins before objective.{name}.start={start}")

    def weight_at(self, step: int) -> float:
        """The weight at global step ``step``: 0 before ``start``, then constant, or fading
        linearly to 0 over ``anneal``."""
        if step < self.start:
            return 0.0
        return self.weight * linear_fade(self.anneal, step)

    def fading(self, step: int) -> bool:
        """True while an annealed part has yet to finish (a phase cannot count as solved then)."""
        return self.anneal is not None and step < self.anneal[1]

    def applies(self, batch) -> bool:
        return self.acts_on(batch)

    def acts_on(self, batch) -> bool:
        """Whether ``batch`` is of the kind ``batches`` names (all | text | image prompts)."""
        if self.batches == "all":
            return True
        return batch.has_image == (self.batches == "image")

    def loss(self, model, batch, out: LabelledRun) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def linear_fade(window: tuple[int, int] | None, step: int) -> float:
    """1 before ``window`` = (start, end), 0 from end on, linear in between; 1 when there is none."""
    if window is None or step < window[0]:
        return 1.0
    start, end = window
    return 0.0 if step >= end else (end - step) / (end - start)


def _anneal(anneal, name: str):
    return step_window(anneal, f"objective.{name}.anneal")


def step_window(value, key: str) -> tuple[int, int] | None:
    """``None``, or a checked ``(start, end)`` pair of global steps for the setting ``key``."""
    if value is None:
        return None
    try:
        start, end = (int(v) for v in value)
    except (TypeError, ValueError):
        raise LabError(f"{key} must be null or [start, end] steps, got {value!r}") from None
    if not 0 <= start <= end:
        raise LabError(f"{key}={[start, end]} needs 0 <= start <= end")
    return start, end


class AnswerLoss(Objective):
    """Cross-entropy of the answer, averaged over every labelled query of the batch.

    ``followups=true`` (multi-query supervision) also trains the follow-up queries that
    ``task.train_queries > 1`` appends to training prompts; ``false`` trains the evaluated query only.
    """

    def __init__(self, model=None, task=None, weight: float = 1.0, followups: bool = True, anneal=None,
                 start: int = 0, batches: str = "all") -> None:
        super().__init__(weight, anneal, "answer", start, batches)
        self.followups = bool(followups)

    def loss(self, model, batch, out: LabelledRun) -> Tensor:
        if self.followups:
            return F.cross_entropy(out.logits, out.labels)
        return F.cross_entropy(out.answer_logits, batch["targets"])


class OneHopQueries(Objective):
    """Auxiliary one-hop queries: cross-entropy of the training-only one-hop follow-ups that
    ``task.one_hop_queries = K`` appends to training prompts (K of each hop: ``[CTX_END] c -> s``
    and ``[QUE] s -> i``), read out from the final layer like any answer.

    Each hop is then supervised on its own, so the model can learn the two lookups before it
    composes them. A training aid: it adds prompts the evaluated task never shows, but no new
    tokens, and evaluation asks only the task's own first query. ``anneal`` fades it out (the
    queries stay in the prompts, untrained).
    """

    task_option = "one_hop_queries"

    def __init__(self, model=None, task=None, weight: float = 1.0, anneal=None, n_layers: int | None = None,
                 start: int = 0, batches: str = "all") -> None:
        super().__init__(weight, anneal, "one_hop", start, batches)
        self.layers = (model.n_layers if n_layers is None else int(n_layers),)

    def applies(self, batch) -> bool:
        return batch.get("one_hop_labels") is not None and self.acts_on(batch)

    def loss(self, model, batch, out: LabelledRun) -> Tensor:
        labels = batch["one_hop_labels"]
        valid = labels != IGNORE_INDEX
        return F.cross_entropy(model.readout(out.captured[self.layers[0]][valid]), labels[valid])
