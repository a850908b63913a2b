"""What every evaluator gets (an :class:`EvalContext`) and how it writes results.

An evaluator is a class with a ``name`` and ``__call__(ctx) -> dict``; it reads the model only
through the residual-stream interface (``ctx.model``) and writes ``<out_dir>/<name>.json`` (plus
CSV/PNG) with :meth:`EvalContext.write_json` and friends. Adding one = one module in ``lab/eval``
plus one ``conf/evaluators/<name>.yaml`` whose ``_target_`` points at it.
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from lab.data.datamodule import to_device
from lab.errors import LabError
from lab.models.interface import ResidualModel

log = logging.getLogger(__name__)


@dataclass
class EvalContext:
    """Model, task, evaluation data per modality, and where to write."""

    model: ResidualModel
    task: Any
    data: Mapping[str, Any]          # modality name -> object with eval_batches(split)
    out_dir: Path
    device: torch.device = torch.device("cpu")
    writer: Any = None               # a TensorBoard SummaryWriter, or None
    step: int = 0                    # global step of the checkpoint, for TensorBoard
    info: dict = field(default_factory=dict)  # run name, checkpoint path, ...

    @property
    def modalities(self) -> list[str]:
        return list(self.data)

    def choose_splits(self, splits=None) -> list[str]:
        """``splits`` checked against the task's (all of them when empty)."""
        available = list(self.task.splits)
        chosen = list(splits) if splits else available
        unknown = [s for s in chosen if s not in available]
        if unknown:
            raise LabError(f"unknown split(s) {unknown}; the task has {available}")
        return chosen

    def choose_modalities(self, modalities=None) -> list[str]:
        """``modalities`` (data streams) checked against the context's (all of them when empty)."""
        chosen = list(modalities) if modalities else self.modalities
        unknown = [m for m in chosen if m not in self.modalities]
        if unknown:
            raise LabError(f"unknown modality(ies) {unknown}; the context has {self.modalities}")
        return chosen

    def stream_splits(self, modalities=None, splits=None) -> list[tuple[str, str]]:
        """Every (modality, split) an evaluator should cover, both checked as in the two methods above."""
        splits = self.choose_splits(splits)
        return [(modality, split) for modality in self.choose_modalities(modalities) for split in splits]

    def pairs(self, split: str, n: int, seed: int = 0, modality: str = "text", **options):
        """Paired (base, counterfactual) batches of the task (``task.counterfactual_pairs``), made by
        the modality's data stream (text prompts, or drawn contexts: ``ImageDataModule.pairs``) and
        on the context's device; with the pair specs."""
        make = getattr(self.data[modality], "pairs", None)
        if make is None or getattr(self.task, "counterfactual_pairs", None) is None:
            raise LabError(f"task {self.task.name!r} does not define counterfactual pairs")
        specs, base, counter = make(split, n, seed=seed, **options)
        return specs, to_device(base, self.device), to_device(counter, self.device)

    def batches(self, split: str, modality: str = "text") -> Iterator[dict]:
        """Fixed evaluation batches of a split, on the context's device."""
        for batch in self.data[modality].eval_batches(split):
            yield to_device(batch, self.device)

    def write_json(self, name: str, payload: dict) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{name}.json"
        path.write_text(json.dumps({"info": self.info, **payload}, indent=2, default=float))
        return path

    def write_csv(self, name: str, rows: list[dict]) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{name}.csv"
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
            writer.writeheader()
            writer.writerows(rows)
        return path

    def save_figure(self, name: str, figure) -> Path:
        """Save a matplotlib figure as PNG and log it to TensorBoard."""
        import matplotlib.pyplot as plt

        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{name}.png"
        figure.savefig(path, dpi=120, bbox_inches="tight")
        if self.writer is not None:
            self.writer.add_figure(f"eval/{name}", figure, self.step)
        plt.close(figure)
        return path

    def log_scalars(self, prefix: str, values: Mapping[str, float]) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"eval/{prefix}/{key}", value, self.step)


def check_evaluators_fit(evaluators: list, task) -> None:
    """Refuse evaluators that cannot read this task's prompts, naming the tasks they need."""
    for evaluator in evaluators:
        needs = getattr(evaluator, "tasks", None)
        if needs is not None and task.name not in needs:
            raise LabError(
                f"evaluator {evaluator.name} needs a run of task {' or '.join(needs)} (its prompts name the objects "
                f"it reads), but this run's task is {task.name!r}; evaluate a {needs[0]} run, or drop {evaluator.name} "
                f"from evaluators=[...]"
            )


def run_evaluators(ctx: EvalContext, evaluators: list) -> dict:
    results = {}
    try:
        for evaluator in evaluators:
            log.info("running evaluator %s", evaluator.name)
            results[evaluator.name] = evaluator(ctx)
            log.info("wrote %s/%s.json", ctx.out_dir, evaluator.name)
    finally:
        if ctx.writer is not None:
            ctx.writer.close()
    return results


class Evaluator:
    """Base class; subclasses set ``name`` and implement ``__call__``.

    ``tasks`` names the tasks whose prompts the evaluator can read (None: every task); a run of
    another task is refused before anything is computed or written (:func:`check_evaluators_fit`).
    """

    name = "evaluator"
    tasks: tuple[str, ...] | None = None

    def __call__(self, ctx: EvalContext) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError


@torch.no_grad()
def answer_predictions(model: ResidualModel, batches, **run_kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(predicted token, target, n_objects) over all batches, optionally with run() primitives."""
    preds, targets, counts = [], [], []
    for batch in batches:
        logits = model.answer_logits(batch, **run_kwargs)
        preds.append(logits.argmax(-1).cpu())
        targets.append(batch["targets"].cpu())
        counts.append(batch["n_objects"].cpu())
    return torch.cat(preds), torch.cat(targets), torch.cat(counts)


@torch.no_grad()
def final_token_states(model: ResidualModel, batches, layers, labels_of) -> tuple[list, dict]:
    """h_l at each prompt's answer position for ``layers`` ([N, D] float64 numpy arrays, one per
    layer) and ``labels_of(batch)`` (name -> [B] numpy array) concatenated over the batches."""
    states, labels = [[] for _ in layers], {}
    for batch in batches:
        out = model.run(batch, capture=layers)
        rows = torch.arange(len(batch), device=batch.tokens.device)
        for i, layer in enumerate(layers):
            states[i].append(out.captured[layer][rows, batch.answer_pos].double().cpu().numpy())
        for name, value in labels_of(batch).items():
            labels.setdefault(name, []).append(np.asarray(value))
    if not states[0]:
        raise LabError("no evaluation batches to read states from")
    return [np.concatenate(s) for s in states], {name: np.concatenate(v) for name, v in labels.items()}
