"""Linear probes per layer on the reading position's residual: what does the final token hold?

For every layer l = 0..L, a logistic regression is trained on h_l at the final token (the query
colour) of part of a split's evaluation prompts and tested on the rest, for each target:

- ``slot``: the queried object's index in the context (for drawn contexts: its placement index);
- ``association_slot``: the index of the queried object's association in the association list;
- ``shape``: the queried object's shape; ``item``: its item (the answer).

A positional mechanism holds the slot before the shape; a symbolic one holds the shape without the
slot. Chance is the held-out accuracy of always guessing the training set's most frequent class.
Features are standardised per dimension; the split into train and test prompts is seeded.

Outputs: ``probes.json``, ``probes.csv`` (one row per modality, split, target, layer) and
``probes.png`` (held-out accuracy vs layer, one line per target, chance dotted).
"""
from __future__ import annotations

import warnings

import numpy as np

from lab.errors import LabError
from lab.eval.base import EvalContext, Evaluator, final_token_states

TARGETS = ("slot", "association_slot", "shape", "item")


class ProbesEvaluator(Evaluator):
    name = "probes"
    tasks = ("retrieval",)  # reads the queried object's slot and associations

    def __init__(self, targets=TARGETS, splits=None, modalities=None, test_fraction: float = 0.5,
                 regularization: float = 1.0, max_iter: int = 1000, seed: int = 0, plots: bool = True) -> None:
        unknown = [t for t in targets if t not in TARGETS]
        if unknown:
            raise LabError(f"unknown probe target(s) {unknown}; choose from {list(TARGETS)}")
        if not 0 < test_fraction < 1:
            raise LabError(f"probes test_fraction must be in (0, 1), got {test_fraction}")
        self.targets, self.splits, self.modalities = list(targets), splits, modalities
        self.test_fraction, self.regularization, self.max_iter = float(test_fraction), float(regularization), int(max_iter)
        self.seed, self.plots = int(seed), bool(plots)

    def __call__(self, ctx: EvalContext) -> dict:
        ctx.model.eval()
        results, rows = {}, []
        for modality, split in ctx.stream_splits(self.modalities, self.splits):
            layers = list(range(ctx.model.n_layers + 1))
            states, labels = final_token_states(ctx.model, ctx.batches(split, modality), layers, probe_labels)
            per_target = {}
            for target in self.targets:
                curve = [probe_accuracy(states[layer], labels[target], self.test_fraction, self.regularization,
                                        self.max_iter, self.seed) for layer in range(len(states))]
                per_target[target] = {"accuracy": [c["accuracy"] for c in curve], "chance": curve[0]["chance"],
                                      "n_classes": curve[0]["n_classes"], "n_test": curve[0]["n_test"]}
                rows += [{"modality": modality, "split": split, "target": target, "layer": layer, **c}
                         for layer, c in enumerate(curve)]
            results.setdefault(modality, {})[split] = per_target
        payload = {"test_fraction": self.test_fraction, "regularization": self.regularization, "seed": self.seed,
                   "results": results}
        ctx.write_json(self.name, payload)
        ctx.write_csv(self.name, rows)
        if self.plots:
            ctx.save_figure(self.name, _plot(results))
        return payload


def probe_labels(batch) -> dict[str, np.ndarray]:
    """The probe targets of a batch (needs the task's per-object facts, ``batch.objects``)."""
    if "query_object" not in batch.objects:
        raise LabError("probes need the task's per-object facts (batch.objects); this task provides none")
    objects = batch.objects
    query = objects["query_object"]
    return {
        "slot": query.cpu().numpy(),
        "association_slot": (objects["association_order"] == query[:, None]).float().argmax(1).cpu().numpy(),
        "shape": objects["shapes"].gather(1, query[:, None])[:, 0].cpu().numpy(),
        "item": objects["items"].gather(1, query[:, None])[:, 0].cpu().numpy(),
    }


def probe_accuracy(features: np.ndarray, labels: np.ndarray, test_fraction: float = 0.5, regularization: float = 1.0,
                   max_iter: int = 1000, seed: int = 0) -> dict:
    """Held-out accuracy of a standardised multinomial logistic regression, with the majority-class chance."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    n_test = max(1, int(round(len(labels) * test_fraction)))
    test, train = order[:n_test], order[n_test:]
    classes, counts = np.unique(labels[train], return_counts=True)
    chance = float(np.mean(labels[test] == classes[np.argmax(counts)]))
    if len(classes) < 2:
        accuracy = chance
    else:
        scaler = StandardScaler().fit(features[train])
        probe = LogisticRegression(C=regularization, max_iter=max_iter)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            probe.fit(scaler.transform(features[train]), labels[train])
        accuracy = float(probe.score(scaler.transform(features[test]), labels[test]))
    return {"accuracy": accuracy, "chance": chance, "n_classes": int(len(np.unique(labels))), "n_test": int(n_test)}


def _plot(results: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, s) for m, splits in results.items() for s in splits]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.2), squeeze=False)
    for ax, (modality, split) in zip(axes[0], panels):
        for i, (target, entry) in enumerate(results[modality][split].items()):
            colour = f"C{i}"
            ax.plot(range(len(entry["accuracy"])), entry["accuracy"], marker="o", color=colour, label=target)
            ax.axhline(entry["chance"], color=colour, ls=":", lw=1)
        ax.set(title=f"{modality} {split}: probes on the final token", xlabel="layer l (h_l)", ylabel="held-out accuracy",
               ylim=(0, 1.02))
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
