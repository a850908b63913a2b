"""Neighbourhood overlap between layers and with labels (Valeriani et al., NeurIPS 2023).

For every layer l = 0..L the final token's residual h_l of a split's evaluation prompts (the same
prompts in every layer) gives each prompt its k nearest neighbours (k = 30, exact, ties broken by
the lower prompt index), and we measure:

- ``matrix[l1][l2]``: the data overlap, the mean over prompts of |N_l1(i) & N_l2(i)| / k
  (DADApy's ``return_data_overlap``); ``consecutive[l]`` = ``matrix[l][l+1]``;
- ``labels[name][l]``: the label overlap, the mean fraction of a prompt's k neighbours that share
  its label, every class weighted equally (DADApy's ``return_label_overlap(k=30)``), beside its
  chance value (neighbours drawn at random).

A layer with fewer than k + 1 distinct points (h_0 at the final token is one embedding per
query token) has no overlap (null, with a note): its neighbourhoods would be set by the ties.

Outputs: ``overlap.json`` (modality -> split -> matrix, consecutive, labels, chance),
``overlap.csv`` (one row per modality, split and layer pair) and ``overlap.png`` (the matrix,
the consecutive overlap and the label overlaps per stream).
"""
from __future__ import annotations

import logging

import numpy as np

from lab.eval.base import EvalContext, Evaluator
from lab.eval.density_peaks import overlap_chance, overlap_from_counts
from lab.eval.geometry import Settings, collect_streams, progress
from lab.eval.neighbours import nearest_neighbours

log = logging.getLogger(__name__)


def data_overlap(neighbours_a, neighbours_b) -> float:
    """Mean fraction of shared neighbours between two tables [N, k] of the same points."""
    a, b = np.asarray(neighbours_a), np.asarray(neighbours_b)
    k = min(a.shape[1], b.shape[1])
    both = np.sort(np.concatenate([a[:, :k], b[:, :k]], 1), axis=1)
    return float(np.mean(np.count_nonzero(both[:, 1:] == both[:, :-1], axis=1) / k))


def overlap_matrix(tables) -> np.ndarray:
    """:func:`data_overlap` between every two of ``tables`` (None entries give NaN rows)."""
    n = len(tables)
    out = np.full((n, n), np.nan)
    for i in range(n):
        for j in range(i, n):
            if tables[i] is not None and tables[j] is not None:
                out[i, j] = out[j, i] = 1.0 if i == j else data_overlap(tables[i], tables[j])
    return out


def label_overlap(neighbours, labels, k: int | None = None, weighted: bool = True) -> float:
    """Mean fraction of each point's first k neighbours (all columns by default) sharing its label,
    classes weighted equally (``weighted``) or points equally."""
    neighbours, labels = np.asarray(neighbours), np.asarray(labels)
    k = neighbours.shape[1] if k is None else k
    same = np.count_nonzero(labels[neighbours[:, :k]] == labels[:, None], axis=1)
    return overlap_from_counts(same, labels, np.full(len(labels), k), weighted)


def neighbour_tables(states, k: int) -> tuple[list, list[str | None], list[int]]:
    """Per layer: the k-neighbour table of the points (None when fewer than k + 1 are distinct),
    a note, and the number of distinct points."""
    tables, notes, distinct = [], [], []
    for X in states:
        count = len(np.unique(X, axis=0))
        distinct.append(count)
        if not np.isfinite(X).all():
            tables.append(None)
            notes.append("the layer holds non-finite values")
        elif count < k + 1:
            tables.append(None)
            notes.append(f"only {count} distinct points; the k={k} overlap needs {k + 1}")
        else:
            tables.append(nearest_neighbours(X, k)[1])
            notes.append(None)
    return tables, notes, distinct


class OverlapEvaluator(Evaluator):
    """k-NN overlap between every two layers and with every label set, per stream and split."""

    name = "overlap"

    def __init__(self, k: int = 30, splits=None, modalities=None, layers=None, labels=None,
                 max_points: int = 10000, seed: int = 0, plots: bool = True) -> None:
        self.settings = Settings(self.name, splits=splits, modalities=modalities, layers=layers, labels=labels,
                                 max_points=max_points, seed=seed, plots=plots)
        self.k = self.settings.integer("k", k, 1)

    def __call__(self, ctx: EvalContext) -> dict:
        streams = collect_streams(ctx, self.settings, min_points=self.k + 1)
        results, rows = {}, []
        for (modality, split), (layers, states, labels) in progress(streams.items(), self.name):
            tables, notes, distinct = neighbour_tables(states, self.k)
            matrix = overlap_matrix(tables)
            entry = {"layers": layers, "n_points": len(states[0]), "distinct_points": distinct, "notes": notes,
                     "matrix": _clean(matrix), "consecutive": _clean(np.diagonal(matrix, 1)),
                     "labels": {n: [None if t is None else label_overlap(t, v) for t in tables] for n, v in labels.items()},
                     "chance": {n: overlap_chance(v) for n, v in labels.items()}}
            results.setdefault(modality, {})[split] = entry
            for i, l1 in enumerate(layers):
                for j, l2 in enumerate(layers):
                    rows.append({"modality": modality, "split": split, "layer": l1, "other_layer": l2,
                                 "overlap": _value(matrix[i, j]),
                                 **{f"label_{n}": (entry["labels"][n][i] if i == j else "") for n in labels}})
            ctx.log_scalars(f"{self.name}/{modality}_{split}",
                            {f"h{l}_h{l + 1}": v for l, v in zip(layers, entry["consecutive"]) if v is not None})
        payload = {"k": self.k, "max_points": self.settings.max_points, "results": results}
        ctx.write_json(self.name, payload)
        ctx.write_csv(self.name, _rectangular(rows))
        if self.settings.plots:
            ctx.save_figure(self.name, overlap_figure(results))
        return payload


def _clean(values) -> list:
    """JSON-safe: NaN becomes None (nested lists kept)."""
    array = np.asarray(values, dtype=np.float64)
    return [_clean(v) for v in array] if array.ndim > 1 else [_value(v) for v in array]


def _value(v):
    return None if v is None or not np.isfinite(v) else float(v)


def _rectangular(rows: list[dict]) -> list[dict]:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return [{c: row.get(c, "") for c in columns} for row in rows]


def overlap_figure(results: dict):
    """Per stream: the layer x layer overlap matrix, then the consecutive and label overlaps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    entries = [(f"{m}/{s}", e) for m, splits in results.items() for s, e in splits.items()]
    fig, axes = plt.subplots(len(entries), 2, figsize=(9.5, 3.8 * len(entries)), squeeze=False)
    for (name, entry), (left, right) in zip(entries, axes):
        matrix = np.array([[np.nan if v is None else v for v in row] for row in entry["matrix"]])
        image = left.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        left.set(title=f"{name}: k-NN overlap", xlabel="layer", ylabel="layer",
                 xticks=range(len(entry["layers"])), xticklabels=entry["layers"],
                 yticks=range(len(entry["layers"])), yticklabels=entry["layers"])
        fig.colorbar(image, ax=left, fraction=0.046)
        layers = entry["layers"]
        right.plot(layers[1:], [np.nan if v is None else v for v in entry["consecutive"]], "k-o", ms=3,
                   label="h_l vs h_(l-1)")
        for i, (label, values) in enumerate(entry["labels"].items()):
            right.plot(layers, [np.nan if v is None else v for v in values], "-o", ms=3, color=f"C{i}", label=label)
            right.axhline(entry["chance"][label], color=f"C{i}", ls=":", lw=1)
        right.set(title=f"{name}: overlap (dotted: chance)", xlabel="layer l (h_l, final token)", ylim=(-0.02, 1.02))
        right.legend(fontsize=7)
        right.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig
