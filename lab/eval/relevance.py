"""Shared scoring code for layer relevance (docs/layer_relevance.md).

Everything is written against the residual-stream interface, so it works on the lab's backbone,
a Hugging Face model (``lab.models.hf``) and the hand-built snowball model alike.

- :func:`halves`: the calibration / evaluation partition of a split's fixed evaluation set.
- :class:`Ablator`: runs a model with a set of blocks removed (``skip``: the residual passes
  through unchanged; ``mean``: the block's update is replaced by its mean update on the
  calibration data) and scores candidate removals **from cached prefixes**: the pruned model is
  run once capturing every h_l, and removing candidate block l then starts from that cached h_l
  instead of recomputing blocks 0..l-1. Iterative pruning reuses the same cache at each step.
- :func:`similarity_scores`: per-sample cosine scores ``1 - cos(h_l, h_{l+1})`` (all tokens and
  last token) and angular distance ``arccos(cos(h_l, h_{l+n}))/pi`` (last token, Gromov et al.).
- :func:`accuracy_relevance`: ``1 - max(Acc(without l) - r, 0) / max(Acc(full) - r, 0)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lab.errors import LabError
from lab.models.interface import ResidualModel

OPERATORS = ("skip", "mean")


# ---------------------------------------------------------------------- data
def _is_calibration(n: int, fraction: float, seed: int = 0) -> np.ndarray:
    """Seeded random partition of sample indices 0..n-1: True = calibration.

    Random rather than interleaved: evaluation sets cycle through their strata (number of
    objects, answer class), and an every-other-sample split would put whole strata on one side.
    """
    mask = np.zeros(n, dtype=bool)
    k = min(max(int(round(n * fraction)), 1), n - 1) if n > 1 else 0
    mask[np.random.default_rng([seed, n]).permutation(n)[:k]] = True
    return mask


def take_rows(batch, keep: Tensor):
    """Rows ``keep`` ([B] bool) of every per-sample tensor in a batch (a Batch or a plain dict)."""
    if hasattr(batch, "rows"):
        return batch.rows(keep)
    B = keep.shape[0]
    out = {}
    for key, value in batch.items():
        if isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == B:
            out[key] = value[keep.to(value.device)]
        else:
            out[key] = value
    return out


def halves(batches: Iterable[dict], fraction: float = 0.5) -> tuple[list[dict], list[dict], np.ndarray]:
    """Split fixed evaluation batches into (calibration, evaluation) batches.

    Returns the two batch lists and the boolean calibration mask over the split's samples
    (in order), so that sample-level metadata (e.g. chance accuracy) can be split the same way.
    """
    if not 0.0 < fraction < 1.0:
        raise LabError(f"calibration_fraction must be in (0, 1), got {fraction}")
    batches = list(batches)
    n = sum(int(b["targets"].shape[0]) for b in batches)
    mask = _is_calibration(n, fraction)
    calib, evaluation, start = [], [], 0
    for batch in batches:
        B = int(batch["targets"].shape[0])
        keep = torch.from_numpy(mask[start : start + B])
        start += B
        if keep.any():
            calib.append(take_rows(batch, keep))
        if (~keep).any():
            evaluation.append(take_rows(batch, ~keep))
    if not calib or not evaluation:
        raise LabError(f"the split has only {n} samples; it cannot be divided into calibration and evaluation halves")
    return calib, evaluation, mask


def chance_accuracy(task, split: str, mask: np.ndarray | None, part: bool = True) -> float:
    """Chance accuracy r of the samples of ``split`` selected by ``mask == part``.

    Uses ``task.chance_accuracy(samples)`` on the task's evaluation set (the batches are built
    from it in order); when the sample counts disagree, the whole set's chance accuracy is used.
    """
    if not hasattr(task, "chance_accuracy"):
        return 0.0
    samples = task.eval_set(split, noise=False)
    if mask is not None and len(samples) == len(mask):
        samples = [s for s, m in zip(samples, mask) if bool(m) == part]
    return float(task.chance_accuracy(samples))


# ---------------------------------------------------------------------- metrics
@dataclass
class Outcome:
    """Per-sample results of one (possibly ablated) model on a batch list."""

    correct: np.ndarray   # [N] bool
    loss: np.ndarray      # [N] cross-entropy of the target at the answer position

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    @property
    def mean_loss(self) -> float:
        return float(self.loss.mean())


def _outcome(logits: Sequence[Tensor], batches: Sequence[dict]) -> Outcome:
    correct, loss = [], []
    for lg, batch in zip(logits, batches):
        lg = lg.float()
        correct.append((lg.argmax(-1) == batch["targets"]).cpu().numpy())
        loss.append(F.cross_entropy(lg, batch["targets"], reduction="none").cpu().numpy())
    return Outcome(np.concatenate(correct), np.concatenate(loss))


def accuracy_relevance(acc_without: np.ndarray | float, acc_full: float, chance: float):
    """``1 - max(Acc(without l) - r, 0) / max(Acc(full) - r, 0)``; NaN when the full model is at chance."""
    denom = max(acc_full - chance, 0.0)
    if denom <= 0:
        return np.full_like(np.asarray(acc_without, dtype=float), np.nan)
    return 1.0 - np.maximum(np.asarray(acc_without, dtype=float) - chance, 0.0) / denom


# ---------------------------------------------------------------------- ablation with prefix caching
@dataclass
class PrunedState:
    """A pruned model run on every batch, with every h_l captured (the prefix cache)."""

    removed: frozenset
    streams: list            # per batch: the embedded Stream
    states: list             # per batch: {l: h_l} for l in 0..L
    logits: list             # per batch: answer logits [B, V]
    outcome: Outcome
    means: dict = field(default_factory=dict)   # block -> mean update [D] (mean operator)


class Ablator:
    """Remove blocks from a model and score candidate removals, reusing cached prefixes.

    ``operator='skip'`` removes block l outright (h_{l+1} = h_l, no healing); ``'mean'``
    replaces its update by the mean update over the attended tokens of ``mean_batches``
    (the calibration data), measured in the model as pruned at the time the block is removed.
    """

    def __init__(self, model: ResidualModel, operator: str = "skip", mean_batches: Sequence[dict] | None = None) -> None:
        if operator not in OPERATORS:
            raise LabError(f"unknown ablation operator {operator!r}; choose one of {OPERATORS}")
        self.model, self.operator = model, operator
        self.mean_batches = mean_batches
        self.L = model.n_layers
        self._means: dict[frozenset, dict[int, Tensor]] = {}

    # -- mean updates -------------------------------------------------------------
    def mean_updates(self, removed: frozenset, base: dict[int, Tensor]) -> dict[int, Tensor]:
        """Mean update of every kept block in the model with ``removed`` pruned (on ``mean_batches``)."""
        key = frozenset(removed)
        if key not in self._means:
            if self.mean_batches is None:
                raise LabError("mean ablation needs calibration batches to measure the mean update")
            total, count = {}, 0
            for batch in self.mean_batches:
                stream = self.model.embed(batch)
                out = self.model.run(stream=stream, skip=removed, edits=self._edits(removed, base, 0),
                                     capture=range(self.L + 1))
                attend = batch["attend"].to(stream.h.device)
                count += int(attend.sum())
                for l in range(self.L):
                    if l in removed:
                        continue
                    delta = (out.captured[l + 1] - out.captured[l])[attend].float().sum(0)
                    total[l] = total.get(l, 0) + delta
            self._means[key] = {l: (v / max(count, 1)) for l, v in total.items()}
        return self._means[key]

    def _edits(self, removed: Iterable[int], means: dict[int, Tensor], start: int) -> dict:
        """Edits adding the mean update of each removed block (key l+1), for layers > start."""
        if self.operator != "mean":
            return {}
        edits = {}
        for l in removed:
            if l + 1 > start:
                mu = means[l]
                edits[l + 1] = (lambda mu: (lambda h: h + mu.to(h.dtype)))(mu)
        return edits

    # -- runs ------------------------------------------------------------------------
    @torch.no_grad()
    def prune(self, batches: Sequence[dict], removed: Iterable[int] = (), means: dict[int, Tensor] | None = None,
              reuse: PrunedState | None = None) -> PrunedState:
        """Run the model with ``removed`` blocks ablated, capturing every h_l (the prefix cache).

        ``reuse``: the state of a model pruned by a subset of ``removed`` on the same batches
        (the previous step of iterative pruning): h_0..h_b are shared up to the first newly
        removed block b, so only blocks b.. are recomputed.
        """
        removed = frozenset(removed)
        means = dict(means or {})
        start = 0
        if reuse is not None and reuse.removed <= removed and len(reuse.states) == len(batches):
            new = removed - reuse.removed
            start = min(new) if new else self.L
        streams, states, logits = [], [], []
        for i, batch in enumerate(batches):
            if start > 0:
                stream = reuse.streams[i]
                out = self.model.run(stream=stream.with_h(reuse.states[i][start]), start=start, skip=removed,
                                     edits=self._edits(removed, means, start), capture=range(start, self.L + 1),
                                     positions=batch["answer_pos"])
                captured = {l: reuse.states[i][l] for l in range(start)}
                captured.update(out.captured)
            else:
                stream = self.model.embed(batch)
                out = self.model.run(stream=stream, skip=removed, edits=self._edits(removed, means, -1),
                                     capture=range(self.L + 1), positions=batch["answer_pos"])
                captured = out.captured
            streams.append(stream)
            states.append(captured)
            logits.append(out.logits)
        return PrunedState(removed, streams, states, logits, _outcome(logits, batches), means)

    @torch.no_grad()
    def remove_one(self, state: PrunedState, batches: Sequence[dict], layer: int,
                   mean_update: Tensor | None = None, cached: bool = True) -> Outcome:
        """Outcome of additionally removing ``layer`` from the pruned model of ``state``.

        ``cached=True`` starts from the cached h_layer (blocks before ``layer`` are not
        recomputed); ``cached=False`` is the naive full forward, for benchmarks and checks.
        """
        removed = state.removed | {layer}
        means = dict(state.means)
        if self.operator == "mean":
            if mean_update is None:
                raise LabError("mean ablation of a block needs its mean update")
            means[layer] = mean_update
        logits = []
        for i, batch in enumerate(batches):
            if cached:
                stream = state.streams[i].with_h(state.states[i][layer])
                out = self.model.run(stream=stream, start=layer, skip=removed,
                                     edits=self._edits(removed, means, layer), positions=batch["answer_pos"])
            else:
                out = self.model.run(stream=state.streams[i], skip=removed,
                                     edits=self._edits(removed, means, -1), positions=batch["answer_pos"])
            logits.append(out.logits)
        return _outcome(logits, batches)

    def candidates(self, state: PrunedState, batches: Sequence[dict], cached: bool = True,
                   layers: Iterable[int] | None = None) -> dict[int, Outcome]:
        """Outcome of removing each remaining block (one at a time) from ``state``'s model."""
        layers = [l for l in (range(self.L) if layers is None else layers) if l not in state.removed]
        means = self.mean_updates(state.removed, state.means) if self.operator == "mean" else {}
        return {l: self.remove_one(state, batches, l, means.get(l), cached=cached) for l in layers}


# ---------------------------------------------------------------------- similarity scores
def _cos(a: Tensor, b: Tensor) -> Tensor:
    # float64: 1 - cos of a tiny write is far below float32 resolution (the snowball case).
    return F.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-30).clamp(-1.0, 1.0)


@torch.no_grad()
def similarity_scores(state: PrunedState, batches: Sequence[dict], n: int = 1) -> dict[str, np.ndarray]:
    """Per-sample similarity scores of every block of the (pruned) model in ``state``.

    Returns arrays [N, L]:

    - ``cosine_all``: ``1 - cos(h_l, h_{l+1})`` averaged over the sample's attended tokens
      (ShortGPT's block influence);
    - ``cosine_last``: the same at the answer (last prompt) token only;
    - ``angular``: ``arccos(cos(h_l, h_{min(l+n, L)}))/pi`` at the answer token (Gromov et al.).

    For a block that ``state`` has removed the scores are NaN.
    """
    L = len(state.states[0]) - 1
    out = {"cosine_all": [], "cosine_last": [], "angular": []}
    for captured, batch in zip(state.states, batches):
        attend = batch["attend"].to(captured[0].device).float()
        rows = torch.arange(attend.shape[0], device=attend.device)
        pos = batch["answer_pos"].to(attend.device)
        c_all, c_last, ang = [], [], []
        for l in range(L):
            if l in state.removed:
                nan = torch.full((attend.shape[0],), math.nan)
                c_all.append(nan), c_last.append(nan), ang.append(nan)
                continue
            cos = _cos(captured[l], captured[l + 1])  # [B, T]
            c_all.append(((1 - cos) * attend).sum(1).cpu() / attend.sum(1).clamp(min=1).cpu())
            c_last.append((1 - cos[rows, pos]).cpu())
            far = _cos(captured[l][rows, pos], captured[min(l + n, L)][rows, pos])
            ang.append((torch.arccos(far) / math.pi).cpu())
        out["cosine_all"].append(torch.stack(c_all, 1))
        out["cosine_last"].append(torch.stack(c_last, 1))
        out["angular"].append(torch.stack(ang, 1))
    return {k: torch.cat(v).numpy().astype(float) for k, v in out.items()}


SIMILARITY_SCORES = ("cosine_all", "cosine_last", "angular")


def json_clean(value):
    """NaN/inf -> None (JSON null) recursively, so the JSON files are standard JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_clean(v) for v in value]
    if isinstance(value, (np.floating,)):
        return json_clean(float(value))
    if isinstance(value, (np.integer,)):
        return int(value)
    return value
