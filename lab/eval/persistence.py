"""Zigzag persistence across layers (Gardinazzi et al., "Persistent Topological Features in Large
Language Models").

For every stream and split, the final token's residual h_l of the evaluation prompts (the same
prompts in every layer) gives per layer a graph: each prompt joined to its k = 5 nearest
neighbours, symmetrised. Its flag (clique) complex K_l, up to dimension ``max_dim`` = 4 (gudhi),
enters the zigzag K_0 >= K_0 & K_1 <= K_1 >= K_1 & K_2 <= ... (layer l at time 2l, the
intersection with the next at 2l + 1), whose bars (dionysus) follow each p-dimensional hole
(p < max_dim) from the layer where it appears to the one where it is gone. From the bars:

- ``betti[p][l]``: the holes alive at layer l;
- ``psim[p][i][j]`` (i <= j): the holes alive at every layer from i through j;
- ``similarity[p][i][j]`` = psim[p][i][j] / betti[p][i] (S_p), the share of layer i's holes that
  are still the same holes at layer j;
- ``average_similarity[l]``: S_p(l, l + 1) averaged over the dimensions with holes at l, the
  score by which persistence pruning removes the block l -> l + 1 that changes the topology least;
- ``ilp[p][l]`` (inter-layer persistence) = S_p(l, l + alpha): the share surviving alpha layers.

Layers where more than 1% of the prompts repeat another's state (h_0 at the final token: one point per
query token) are left out, with a note: their neighbourhoods would be decided by the ties.
Needs the optional ``geometry`` dependencies (gudhi, dionysus; see docs/geometry.md).

Outputs: ``persistence.json`` (modality -> split -> the above, and every bar),
``persistence.csv`` (one row per modality, split and layer) and ``persistence.png``.
"""
from __future__ import annotations

import math

import numpy as np

from lab.errors import LabError
from lab.eval.base import EvalContext, Evaluator
from lab.eval.geometry import Settings, collect_streams, progress
from lab.eval.neighbours import nearest_neighbours


def _libraries():
    try:
        import dionysus
        import gudhi
    except ImportError as error:
        raise LabError(f"persistence needs gudhi and dionysus ({error.name} is missing): "
                       "pip install -e '.[geometry]' (docs/geometry.md says how to build dionysus)") from None
    return gudhi, dionysus


def flag_complex(X, k: int = 5, max_dim: int = 4) -> set[tuple[int, ...]]:
    """The flag complex, up to dimension ``max_dim``, of the symmetrised k-nearest-neighbour graph
    of the rows of ``X``: every simplex as a sorted tuple of row indices."""
    gudhi, _ = _libraries()
    neighbours = nearest_neighbours(X, k)[1]
    tree = gudhi.SimplexTree()
    for i in range(len(X)):
        tree.insert([i])
    for i, row in enumerate(neighbours):
        for j in row:
            tree.insert([i, int(j)])
    tree.expansion(max_dim)
    return {tuple(simplex) for simplex, _ in tree.get_simplices()}


def zigzag_bars(complexes: list[set], max_dim: int = 4) -> list[tuple[int, float, float]]:
    """(p, birth, death) of every bar of the zigzag K_0 >= K_0 & K_1 <= K_1 >= ... in time units
    (K_l at 2l, K_l & K_l+1 at 2l + 1; a bar is alive at times birth <= t < death), p < max_dim."""
    _, dionysus = _libraries()
    present: dict[tuple, list[int]] = {}
    for layer, complex_ in enumerate(complexes):
        for simplex in complex_:
            present.setdefault(simplex, []).append(layer)
    simplices = sorted(present, key=lambda s: (len(s), s))   # faces before cofaces
    times = []
    for simplex in simplices:
        layers, events = present[simplex], []
        for i, layer in enumerate(layers):
            if i == 0 or layers[i - 1] != layer - 1:
                events.append(2 * layer)            # enters with K_layer
            if i == len(layers) - 1 or layers[i + 1] != layer + 1:
                events.append(2 * layer + 1)        # leaves at the intersection after it
        times.append(events)
    filtration = dionysus.Filtration([dionysus.Simplex(list(s)) for s in simplices])
    _, diagrams, _ = dionysus.zigzag_homology_persistence(filtration, times)
    return [(p, float(point.birth), float(point.death)) for p, diagram in enumerate(diagrams) if p < max_dim
            for point in diagram]


def persistence_summary(bars, n_layers: int, max_dim: int = 4, alpha: int = 2) -> dict:
    """Betti curves, psim, S_p, the average similarity and ILP_alpha from the bars (see the module
    docstring); NaN where a layer has no hole of that dimension."""
    dims = range(max_dim)
    betti = np.zeros((max_dim, n_layers), dtype=int)
    psim = np.zeros((max_dim, n_layers, n_layers), dtype=int)
    for p, birth, death in bars:
        alive = [l for l in range(n_layers) if birth <= 2 * l < death]
        for i in alive:
            betti[p, i] += 1
            psim[p, i, i:alive[-1] + 1] += 1  # alive ranges are contiguous
    with np.errstate(divide="ignore", invalid="ignore"):
        similarity = np.where(betti[:, :, None] > 0, psim / betti[:, :, None], np.nan)
        similarity = np.where(np.arange(n_layers)[None, :, None] <= np.arange(n_layers)[None, None, :],
                              similarity, np.nan)
    consecutive = np.array([[similarity[p, l, l + 1] for l in range(n_layers - 1)] for p in dims]).reshape(max_dim, -1)
    average = [float(np.nanmean(consecutive[:, l])) if np.isfinite(consecutive[:, l]).any() else math.nan
               for l in range(n_layers - 1)]
    ilp = [[float(similarity[p, l, l + alpha]) if l + alpha < n_layers else math.nan for l in range(n_layers)]
           for p in dims]
    return {"betti": betti.tolist(), "psim": psim.tolist(), "similarity": similarity.tolist(),
            "average_similarity": average, "ilp": ilp}


def layer_persistence(states, k: int = 5, max_dim: int = 4, alpha: int = 2) -> tuple[dict, list]:
    """:func:`persistence_summary` of a list of layers' states (the same points in each) and the bars."""
    bars = zigzag_bars([flag_complex(X, k, max_dim) for X in states], max_dim)
    return persistence_summary(bars, len(states), max_dim, alpha), bars


def block_similarity(state, batches, k: int = 5, max_dim: int = 4) -> np.ndarray:
    """The average similarity S(l, l + 1) of every block l of the (pruned) model in ``state``
    (a :class:`lab.eval.relevance.PrunedState` on ``batches``), from its final-token h_0..h_L;
    NaN for a block next to a layer with repeated states (left out of the zigzag)."""
    import torch

    layers = sorted(state.states[0])
    states = [np.concatenate([captured[l][torch.arange(len(b["answer_pos"])), b["answer_pos"].to(captured[l].device)]
                              .double().cpu().numpy() for captured, b in zip(state.states, batches)]) for l in layers]
    kept = [i for i, X in enumerate(states) if len(np.unique(X, axis=0)) >= max(k + 1, 0.99 * len(X))]
    summary, _ = layer_persistence([states[i] for i in kept], k, max_dim)
    out = np.full(len(layers) - 1, np.nan)
    for j, (a, b) in enumerate(zip(kept, kept[1:])):
        if b == a + 1:
            out[a] = summary["average_similarity"][j]
    return out


class PersistenceEvaluator(Evaluator):
    """Zigzag persistence of the final token's k-NN flag complexes across layers (see the module
    docstring)."""

    name = "persistence"

    def __init__(self, k: int = 5, max_dim: int = 4, alpha: int = 2, splits=None, modalities=None, layers=None,
                 max_points: int = 512, seed: int = 0, plots: bool = True) -> None:
        self.settings = s = Settings(self.name, splits=splits, modalities=modalities, layers=layers,
                                     max_points=max_points, seed=seed, plots=plots)
        self.k, self.max_dim, self.alpha = s.integer("k", k, 1), s.integer("max_dim", max_dim, 1), s.integer("alpha", alpha, 1)

    def __call__(self, ctx: EvalContext) -> dict:
        _libraries()
        streams = collect_streams(ctx, self.settings, min_points=self.k + 1, labels_of=lambda batch: {})
        results, rows = {}, []
        for (modality, split), (layers, states, _) in progress(streams.items(), self.name):
            distinct = [len(np.unique(X, axis=0)) for X in states]
            kept = [i for i, d in enumerate(distinct) if d >= max(self.k + 1, 0.99 * len(states[i]))]
            if not kept:
                raise LabError(f"persistence: no layer of {modality}/{split} has distinct states for its prompts")
            notes = [None if i in kept else f"h_{layers[i]}: {len(states[i]) - distinct[i]} of {len(states[i])} states "
                     "repeated; left out" for i in range(len(layers))]
            summary, bars = layer_persistence([states[i] for i in kept], self.k, self.max_dim, self.alpha)
            used = [layers[i] for i in kept]
            entry = {"layers": used, "left_out": [l for i, l in enumerate(layers) if i not in kept],
                     "notes": [n for n in notes if n], "n_points": len(states[0]),
                     **_clean(summary), "bars": [_bar(p, b, d, used) for p, b, d in bars]}
            results.setdefault(modality, {})[split] = entry
            for i, layer in enumerate(used):
                rows.append({"modality": modality, "split": split, "layer": layer,
                             **{f"betti_{p}": entry["betti"][p][i] for p in range(self.max_dim)},
                             "average_similarity_next": entry["average_similarity"][i] if i < len(used) - 1 else "",
                             **{f"ilp_{p}": entry["ilp"][p][i] for p in range(self.max_dim)}})
            ctx.log_scalars(f"{self.name}/{modality}_{split}",
                            {f"similarity_h{l}": v for l, v in zip(used, entry["average_similarity"]) if v is not None})
        payload = {"k": self.k, "max_dim": self.max_dim, "alpha": self.alpha,
                   "max_points": self.settings.max_points, "results": results}
        ctx.write_json(self.name, payload)
        ctx.write_csv(self.name, [{c: ("" if r.get(c) is None else r.get(c, "")) for c in rows[0]} for r in rows])
        if self.settings.plots:
            ctx.save_figure(self.name, persistence_figure(results))
        return payload


def _bar(p: int, birth: float, death: float, layers: list[int]) -> dict:
    """A bar with its times and the first and last layer where it is alive (None if at none)."""
    alive = [layers[i] for i in range(len(layers)) if birth <= 2 * i < death]
    return {"dim": p, "birth_time": birth, "death_time": None if math.isinf(death) else death,
            "first_layer": alive[0] if alive else None, "last_layer": alive[-1] if alive else None}


def _clean(value):
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def persistence_figure(results: dict):
    """Per stream: Betti curves, the S_1 similarity matrix, the average similarity of consecutive
    layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    entries = [(f"{m}/{s}", e) for m, splits in results.items() for s, e in splits.items()]
    fig, axes = plt.subplots(len(entries), 3, figsize=(13, 3.6 * len(entries)), squeeze=False)
    for (name, e), (a, b, c) in zip(entries, axes):
        layers = e["layers"]
        for p, curve in enumerate(e["betti"]):
            a.plot(layers, curve, "-o", ms=3, label=f"beta_{p}")
        a.set(title=f"{name}: Betti numbers", xlabel="layer l", yscale="symlog")
        a.legend(fontsize=7)
        p = 1 if len(e["similarity"]) > 1 else 0
        matrix = np.array([[np.nan if v is None else v for v in row] for row in e["similarity"][p]])
        image = b.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        b.set(title=f"{name}: S_{p}(i, j)", xlabel="layer j", ylabel="layer i", xticks=range(len(layers)),
              xticklabels=layers, yticks=range(len(layers)), yticklabels=layers)
        fig.colorbar(image, ax=b, fraction=0.046)
        c.plot(layers[:-1], [np.nan if v is None else v for v in e["average_similarity"]], "k-o", ms=3)
        c.set(title=f"{name}: average S(l, l+1)", xlabel="layer l", ylim=(-0.02, 1.02))
        for ax in (a, c):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig
