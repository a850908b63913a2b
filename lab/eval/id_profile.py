"""Intrinsic-dimension profile across layers (Valeriani et al., NeurIPS 2023), with what the
layers hold beside it.

For every stream, split and layer l = 0..L, the final token's residual h_l of the evaluation
prompts (float64, exact duplicates removed) gives:

- ``twonn``: TwoNN on 98% of the ratios r2 / r1, on all points and on nested decimations
  (N, N/2, N/4 ... points, round(N / n) random subsets each: the mean and its standard error);
- ``gride``: Gride at the neighbour ranks (n1, n2) = (1, 2), (2, 4) ... (32, 64), with errors;
- the chosen scale: the n2 where the Gride ID changes least between the scales either side
  (averaged over layers), and the ``profile`` of the ID at that scale;
- ``early_peak_layer`` and ``first_minimum_layer``: the first local maximum of the profile and the
  first minimum after it, which Valeriani et al. propose marks the most semantic layer;
- beside them, per layer: the label overlap (k = 30, every class weighted equally) with each label
  set and the held-out accuracy of a linear probe for each probe target (as the probes evaluator:
  slot, association_slot, shape, item; retrieval only), and the layer where each peaks.

Outputs: ``id_profile.json`` (modality -> split -> the above), ``id_profile.csv`` (one row per
modality, split and layer) and ``id_profile.png`` (per stream: the profile with its peak and
minimum, the ID against the scale per layer, the overlaps and probe accuracies).
"""
from __future__ import annotations

import logging
import math

import numpy as np

from lab.errors import LabError
from lab.eval.base import EvalContext, Evaluator
from lab.eval.density_peaks import batch_labels, overlap_chance, remove_duplicates
from lab.eval.geometry import Settings, collect_streams, progress
from lab.eval.intrinsic_dim import TWONN_FRACTION, gride_scaling, peak_then_minimum, stable_scale, twonn_decimation, twonn_id
from lab.eval.neighbours import nearest_neighbours
from lab.eval.overlap import label_overlap
from lab.eval.probes import TARGETS, probe_accuracy, probe_labels

log = logging.getLogger(__name__)
PROBE = "probe:"  # prefix of probe targets among the collected labels


class IdProfileEvaluator(Evaluator):
    """TwoNN and multiscale Gride per layer, the chosen scale, the first minimum after the early
    peak, label overlaps and probe accuracies (see the module docstring)."""

    name = "id_profile"

    def __init__(self, fraction: float = TWONN_FRACTION, range_max: int = 64, decimation: bool = True,
                 decimation_min_points: int = 10, decimation_seed: int = 42, overlap_k: int = 30,
                 probes=TARGETS, splits=None, modalities=None, layers=None, labels=None, max_points: int = 10000,
                 seed: int = 0, plots: bool = True) -> None:
        self.settings = s = Settings(self.name, splits=splits, modalities=modalities, layers=layers, labels=labels,
                                     max_points=max_points, seed=seed, plots=plots)
        self.fraction = s.number("fraction", fraction, 0.0, 1.0)
        self.range_max = s.integer("range_max", range_max, 4)
        self.decimation = s.flag("decimation", decimation)
        self.decimation_min_points = s.integer("decimation_min_points", decimation_min_points, 3)
        self.decimation_seed = s.integer("decimation_seed", decimation_seed, 0)
        self.overlap_k = s.integer("overlap_k", overlap_k, 1)
        self.probes = s.names("probes", [] if probes is None else probes, allowed=TARGETS)

    def __call__(self, ctx: EvalContext) -> dict:
        if self.probes:
            first = next(iter(ctx.data[ctx.choose_modalities(self.settings.modalities)[0]].eval_batches(
                ctx.choose_splits(self.settings.splits)[0])))
            if "query_object" not in first.objects:
                raise LabError(f"id_profile probes {self.probes} need the retrieval task's objects; this task has "
                               "none: set evaluators.id_profile.probes=null")
        streams = collect_streams(ctx, self.settings, min_points=max(self.overlap_k, self.range_max) + 1,
                                  labels_of=self._labels)
        results, rows = {}, []
        work = [(stream, i) for stream, (layers, _, _) in streams.items() for i in range(len(layers))]
        per_layer = {}
        for (stream, i) in progress(work, self.name, lambda w: f"{'/'.join(w[0])} h_{streams[w[0]][0][w[1]]}"):
            per_layer[stream, i] = self._layer(streams[stream][1][i], streams[stream][2])
        for stream, (layers, states, labels) in streams.items():
            modality, split = stream
            entry = self._entry(layers, states, labels, [per_layer[stream, i] for i in range(len(layers))])
            results.setdefault(modality, {})[split] = entry
            rows += _rows(modality, split, entry)
            ctx.log_scalars(f"{self.name}/{modality}_{split}",
                            {f"gride_h{l}": v for l, v in zip(layers, entry["profile"]["id"]) if v is not None})
        payload = {"fraction": self.fraction, "range_max": self.range_max, "overlap_k": self.overlap_k,
                   "max_points": self.settings.max_points, "results": results}
        ctx.write_json(self.name, payload)
        ctx.write_csv(self.name, _rectangular(rows))
        if self.settings.plots:
            ctx.save_figure(self.name, profile_figure(results))
        return payload

    def _labels(self, batch) -> dict:
        labels = batch_labels(batch)
        if self.probes:
            labels.update({PROBE + n: v for n, v in probe_labels(batch).items() if n in self.probes})
        return labels

    def _layer(self, states, labels: dict) -> dict:
        """Probe accuracies of one layer's states, then the TwoNN, Gride scales and label overlaps
        of its distinct points."""
        probes = {n[len(PROBE):]: probe_accuracy(states, v, seed=self.settings.seed)
                  for n, v in labels.items() if n.startswith(PROBE)}
        labels = {n: v for n, v in labels.items() if not n.startswith(PROBE)}
        X, keep = remove_duplicates(states)
        n = len(X)
        out = {"distinct": n, "note": None, "twonn": math.nan, "decimation": None, "probes": probes,
               "gride": None, "overlap": {name: math.nan for name in labels}}
        if not np.isfinite(X).all():
            out["note"] = "the layer holds non-finite values"
            return out
        if n < self.range_max + 1:  # h_0 at the final token: one point per query token
            out["note"] = f"only {n} distinct points; the scales up to n2={self.range_max} need {self.range_max + 1}"
            return out
        distances, neighbours = nearest_neighbours(X, min(n - 1, max(self.range_max, self.overlap_k)))
        out["twonn"] = twonn_id(distances, self.fraction)
        if self.decimation:
            out["decimation"] = twonn_decimation(X, self.fraction, self.decimation_min_points, self.decimation_seed)
        out["gride"] = gride_scaling(distances, self.range_max)
        if n - 1 < self.overlap_k:
            out["note"] = f"only {n} distinct points; no label overlap at k={self.overlap_k}"
        else:
            out["overlap"] = {name: label_overlap(neighbours, v[keep], self.overlap_k) for name, v in labels.items()}
        return out

    def _entry(self, layers, states, labels, per_layer) -> dict:
        ranks = [2**i for i in range(1, int(math.log(self.range_max, 2)) + 1)]
        ids = np.full((len(layers), len(ranks)), np.nan)
        errors = np.full_like(ids, np.nan)
        for i, layer in enumerate(per_layer):
            if layer["gride"] is not None:
                found = len(layer["gride"]["id"])
                ids[i, :found], errors[i, :found] = layer["gride"]["id"], layer["gride"]["error"]
        chosen = stable_scale(ids)
        profile, profile_error = ids[:, chosen], errors[:, chosen]
        peak, minimum = peak_then_minimum(profile)
        overlap_sets = [n for n in labels if not n.startswith(PROBE)]
        probes = {t: [layer["probes"][t] for layer in per_layer] for t in per_layer[0]["probes"]}
        entry = {
            "layers": layers, "n_points": len(states[0]), "distinct_points": [l["distinct"] for l in per_layer],
            "notes": [l["note"] for l in per_layer],
            "twonn": {"id": [_value(l["twonn"]) for l in per_layer], "decimation": [l["decimation"] for l in per_layer]},
            "gride": {"n2": ranks, "id": _grid(ids), "error": _grid(errors),
                      "scale": [None if l["gride"] is None else l["gride"]["scale"] for l in per_layer]},
            "chosen_n2": ranks[chosen],
            "profile": {"id": [_value(v) for v in profile], "error": [_value(v) for v in profile_error]},
            "early_peak_layer": None if peak is None else layers[peak],
            "first_minimum_layer": None if minimum is None else layers[minimum],
            "label_overlap": {n: [_value(l["overlap"][n]) for l in per_layer] for n in overlap_sets},
            "overlap_chance": {n: overlap_chance(labels[n]) for n in overlap_sets},
            "probe_accuracy": {t: [c["accuracy"] for c in curve] for t, curve in probes.items()},
            "probe_chance": {t: curve[0]["chance"] for t, curve in probes.items()},
        }
        entry["best_layer"] = {
            **{f"overlap_{n}": _argmax(layers, v) for n, v in entry["label_overlap"].items()},
            **{f"probe_{t}": _argmax(layers, v) for t, v in entry["probe_accuracy"].items()}}
        return entry


def _value(v):
    return None if v is None or not np.isfinite(v) else float(v)


def _grid(array) -> list:
    return [[_value(v) for v in row] for row in array]


def _argmax(layers, values):
    finite = [(v, -i) for i, v in enumerate(values) if v is not None]
    return None if not finite else layers[-max(finite)[1]]


def _rows(modality: str, split: str, entry: dict) -> list[dict]:
    rows = []
    for i, layer in enumerate(entry["layers"]):
        decimated = entry["twonn"]["decimation"][i]
        rows.append({
            "modality": modality, "split": split, "layer": layer, "distinct_points": entry["distinct_points"][i],
            "twonn_id": entry["twonn"]["id"][i],
            "twonn_id_half": decimated["id"][1] if decimated and len(decimated["id"]) > 1 else "",
            "twonn_id_half_error": decimated["error"][1] if decimated and len(decimated["id"]) > 1 else "",
            "gride_id": entry["profile"]["id"][i], "gride_error": entry["profile"]["error"][i],
            "chosen_n2": entry["chosen_n2"],
            **{f"gride_id_n2_{r}": entry["gride"]["id"][i][j] for j, r in enumerate(entry["gride"]["n2"])},
            **{f"overlap_{n}": v[i] for n, v in entry["label_overlap"].items()},
            **{f"probe_{t}": v[i] for t, v in entry["probe_accuracy"].items()},
            "early_peak": layer == entry["early_peak_layer"], "first_minimum": layer == entry["first_minimum_layer"],
            "note": entry["notes"][i] or ""})
    return rows


def _rectangular(rows: list[dict]) -> list[dict]:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return [{c: "" if row.get(c) is None else row.get(c, "") for c in columns} for row in rows]


def profile_figure(results: dict):
    """Per stream: (a) TwoNN and Gride (chosen scale) against the layer, the early peak and the
    first minimum marked; (b) Gride against the scale n2, one line per layer; (c) label overlaps
    and probe accuracies against the layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, NullLocator

    entries = [(f"{m}/{s}", e) for m, splits in results.items() for s, e in splits.items()]
    fig, axes = plt.subplots(len(entries), 3, figsize=(14, 3.6 * len(entries)), squeeze=False)
    for (name, e), (a, b, c) in zip(entries, axes):
        layers = np.array(e["layers"])
        y = np.array([np.nan if v is None else v for v in e["profile"]["id"]])
        err = np.array([np.nan if v is None else v for v in e["profile"]["error"]])
        a.errorbar(layers, y, yerr=err, marker="o", ms=3, capsize=2, label=f"Gride n2={e['chosen_n2']}")
        a.plot(layers, [np.nan if v is None else v for v in e["twonn"]["id"]], "s--", ms=3, label="TwoNN")
        for key, marker in (("early_peak_layer", "^"), ("first_minimum_layer", "v")):
            if e[key] is not None:
                a.plot([e[key]], [y[list(layers).index(e[key])]], marker, color="k", ms=9, mfc="none",
                       label=key.replace("_layer", "").replace("_", " "))
        a.set(title=f"{name}: ID profile", xlabel="layer l (h_l, final token)", ylabel="intrinsic dimension")
        a.legend(fontsize=7)
        for i, layer in enumerate(layers):
            b.plot(e["gride"]["n2"], [np.nan if v is None else v for v in e["gride"]["id"][i]], "-o", ms=2,
                   color=plt.cm.viridis(i / max(len(layers) - 1, 1)), label=f"h_{layer}")
        b.axvline(e["chosen_n2"], color="k", ls=":", lw=1)
        b.set_xscale("log", base=2)
        b.set_xticks(e["gride"]["n2"], [str(r) for r in e["gride"]["n2"]])
        b.xaxis.set_minor_locator(NullLocator())
        b.set(title=f"{name}: Gride ID vs scale", xlabel="neighbour rank n2", ylabel="ID")
        b.legend(fontsize=6, ncol=2)
        for i, (label, values) in enumerate(e["label_overlap"].items()):
            c.plot(layers, [np.nan if v is None else v for v in values], "-o", ms=3, color=f"C{i}",
                   label=f"overlap {label}")
        for j, (target, values) in enumerate(e["probe_accuracy"].items()):
            c.plot(layers, values, "--s", ms=3, color=f"C{len(e['label_overlap']) + j}", label=f"probe {target}")
        if e["first_minimum_layer"] is not None:
            c.axvline(e["first_minimum_layer"], color="k", ls=":", lw=1)
        c.set(title=f"{name}: label overlap (k) and probes", xlabel="layer l", ylim=(-0.02, 1.02))
        c.legend(fontsize=6)
        for ax in (a, c):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig
