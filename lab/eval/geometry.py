"""What the geometry evaluators (id_profile, overlap, sparsity) share: their common settings,
checked when they are built; the final-token states of every stream and split, checked against
the settings before the model runs; and a progress display."""
from __future__ import annotations

import numbers
from collections.abc import Iterable

import numpy as np

from lab.errors import LabError
from lab.eval.progress import progress  # noqa: F401 - the geometry evaluators import it from here
from lab.eval.base import EvalContext, final_token_states
from lab.eval.density_peaks import batch_labels


class Settings:
    """The options every geometry evaluator takes, checked (one-line :class:`LabError`)."""

    def __init__(self, evaluator: str, splits=None, modalities=None, layers=None, labels=None,
                 max_points: int = 10000, seed: int = 0, plots: bool = True) -> None:
        self.evaluator = evaluator
        self.splits, self.modalities, self.labels = (self.names(n, v) for n, v in
                                                     (("splits", splits), ("modalities", modalities), ("labels", labels)))
        if layers is not None and (isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable)):
            raise LabError(f"{evaluator} layers must be a list of layer indices or null, got {layers!r}")
        self.layers = None if layers is None else sorted({self.integer("layers", l, 0) for l in layers})
        self.max_points = self.integer("max_points", max_points, 2)
        self.seed = self.integer("seed", seed, 0)
        self.plots = self.flag("plots", plots)

    def integer(self, name: str, value, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            raise LabError(f"{self.evaluator} {name} must be an integer >= {minimum}, got {value!r}")
        return int(value)

    def number(self, name: str, value, low: float, high: float) -> float:
        """A real number in (low, high]."""
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low < value <= high:
            raise LabError(f"{self.evaluator} {name} must be a number in ({low}, {high}], got {value!r}")
        return float(value)

    def flag(self, name: str, value) -> bool:
        if not isinstance(value, bool):
            raise LabError(f"{self.evaluator} {name} must be true or false, got {value!r}")
        return value

    def names(self, name: str, value, allowed=None) -> list[str] | None:
        if value is None:
            return None
        if isinstance(value, str) or not isinstance(value, Iterable) or not all(isinstance(v, str) for v in value):
            raise LabError(f"{self.evaluator} {name} must be a list of names or null, got {value!r}")
        unknown = [v for v in value if allowed is not None and v not in allowed]
        if unknown:
            raise LabError(f"{self.evaluator} {name}: unknown {unknown}; choose from {list(allowed)}")
        return list(value)

    def layers_of(self, n_layers: int) -> list[int]:
        """The residual layers to read (0..L by default), checked against the model's L."""
        if self.layers is None:
            return list(range(n_layers + 1))
        bad = [l for l in self.layers if l > n_layers]
        if bad:
            raise LabError(f"{self.evaluator} layers {bad} out of range; the model has h_0..h_{n_layers}")
        return self.layers


def collect_streams(ctx: EvalContext, settings: Settings, min_points: int, labels_of=batch_labels,
                    layers=None) -> dict:
    """{(modality, split): (layers, states [one [N, D] float64 array per layer], labels)} of the
    final token, N at most ``settings.max_points`` (a seeded random subset beyond). Checked before
    the model runs: the layers, the label sets asked for, and that every split has ``min_points``
    prompts. Label sets constant over a split are left out of it."""
    ctx.model.eval()
    layers = settings.layers_of(ctx.model.n_layers) if layers is None else layers
    streams = ctx.stream_splits(settings.modalities, settings.splits)
    for modality, split in streams:
        batches = ctx.data[modality].eval_batches(split)
        count = min(sum(len(b) for b in batches), settings.max_points)
        if count < min_points:
            raise LabError(f"{settings.evaluator}: {modality}/{split} has {count} prompts; its settings need at "
                           f"least {min_points} (lower k or the scales, or evaluate more prompts)")
        if settings.labels is not None:
            known = labels_of(batches[0])
            unknown = [n for n in settings.labels if n not in known]
            if unknown:
                raise LabError(f"{settings.evaluator} labels {unknown} not provided by the task; it has {sorted(known)}")
    out = {}
    for modality, split in streams:
        states, labels = final_token_states(ctx.model, ctx.batches(split, modality), layers, labels_of)
        if len(states[0]) > settings.max_points:
            subset = np.sort(np.random.default_rng(settings.seed).choice(len(states[0]), settings.max_points,
                                                                          replace=False))
            states, labels = [s[subset] for s in states], {n: v[subset] for n, v in labels.items()}
        if settings.labels is not None:
            labels = {n: labels[n] for n in settings.labels}
        labels = {n: v for n, v in labels.items() if len(np.unique(v)) > 1}
        out[(modality, split)] = (layers, states, labels)
    return out


