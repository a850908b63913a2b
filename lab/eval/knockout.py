"""Attention knockout: which token groups must the reading position see, at which layer?

For every layer l and key group g (context colours, context shapes, association shapes,
association items, the ``[QUE]`` marker; the image patches for image prompts), attention from the
final token (the query colour, where the answer is read) to the group's positions is removed in
block l only, and the answer accuracy is measured again. The accuracy drop per (layer, group) is
the heat map; ``all_layers`` removes the group in every block at once. The final token cannot be
knocked out from itself (every position keeps attending to itself), so the query colour is not a
group: its own residual carries it.

With ``queries=all`` attention is removed from every position to the group, which tests whether
the group is needed anywhere at that layer (e.g. for binding a colour to its shape within the
context) rather than by the reading position.

Outputs: ``knockout.json``, ``knockout.csv`` (one row per modality, split, layer, group) and
``knockout.png`` (accuracy drop heat map per modality and split).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from lab.errors import LabError
from lab.eval.base import EvalContext, Evaluator
from lab.eval.stats import wilson_interval
from lab.models.interface import knockout_keys

GROUPS = ("context_color", "context_shape", "association_shape", "association_item", "query_marker", "image")
QUERIES = ("final", "all")


class AttentionKnockoutEvaluator(Evaluator):
    name = "knockout"

    def __init__(self, groups=GROUPS, splits=None, modalities=None, queries: str = "final", level: float = 0.95,
                 plots: bool = True) -> None:
        unknown = [g for g in groups if g not in GROUPS]
        if unknown:
            raise LabError(f"unknown knockout group(s) {unknown}; choose from {list(GROUPS)}")
        if queries not in QUERIES:
            raise LabError(f"knockout queries must be one of {list(QUERIES)}, got {queries!r}")
        self.groups, self.splits, self.modalities = list(groups), splits, modalities
        self.queries, self.level, self.plots = queries, float(level), bool(plots)

    @torch.no_grad()
    def __call__(self, ctx: EvalContext) -> dict:
        model = ctx.model.eval()
        results, rows = {}, []
        for modality, split in ctx.stream_splits(self.modalities, self.splits):
            batches = list(ctx.batches(split, modality))
            groups = [g for g in self.groups if g in batches[0].roles]
            clean_runs = [model.run(b, positions=b.answer_pos, capture=range(model.n_layers)) for b in batches]
            settings = [(layer, layer) for layer in range(model.n_layers)] + [("all_layers", None)]
            hits = {None: torch.cat([(r.logits.argmax(-1) == b.targets).cpu() for b, r in zip(batches, clean_runs)])}
            for name, layer in settings:
                for group in groups:
                    hits[(name, group)] = _hits(model, batches, clean_runs, group, layer, self.queries)
            clean = float(hits[None].float().mean())
            n = len(hits[None])
            table = {}
            for layer, _ in settings:
                table[str(layer)] = {}
                for group in groups:
                    k = int(hits[(layer, group)].sum())
                    entry = {"accuracy": k / n, "drop": clean - k / n, "ci": list(wilson_interval(k, n, self.level))}
                    table[str(layer)][group] = entry
                    rows.append({"modality": modality, "split": split, "layer": layer, "group": group,
                                 "accuracy": entry["accuracy"], "drop": entry["drop"],
                                 "ci_low": entry["ci"][0], "ci_high": entry["ci"][1]})
            results.setdefault(modality, {})[split] = {"accuracy": clean, "n": n, "groups": groups, "layers": table}
        payload = {"queries": self.queries, "level": self.level, "results": results}
        ctx.write_json(self.name, payload)
        ctx.write_csv(self.name, rows)
        if self.plots:
            ctx.save_figure(self.name, _plot(results, ctx.model.n_layers))
        return payload


@torch.no_grad()
def _hits(model, batches, clean_runs, group: str, layer: int | None, queries: str = "final") -> torch.Tensor:
    """[N] bool: answer correct with attention to ``group`` removed in block ``layer`` (None: in
    every block). A single-block knockout leaves h_0..h_layer as in the clean run, so the run
    resumes from the clean h_layer."""
    out = []
    for batch, clean in zip(batches, clean_runs):
        readers = None
        if queries == "final":
            readers = torch.arange(batch.tokens.shape[1], device=batch.tokens.device)[None] == batch.answer_pos[:, None]
        knockout = knockout_keys(batch.attend, batch.role_mask(group), readers)
        if layer is None:
            logits = model.run(batch, positions=batch.answer_pos, knockout=knockout).logits
        else:
            logits = model.run(stream=clean.stream.with_h(clean.captured[layer]), start=layer, positions=batch.answer_pos,
                               knockout=knockout, knockout_layers=[layer]).logits
        out.append((logits.argmax(-1) == batch.targets).cpu())
    return torch.cat(out)


def _plot(results: dict, n_layers: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, s) for m, splits in results.items() for s in splits]
    if not panels:
        raise LabError("knockout: nothing to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 0.45 * n_layers + 2.2), squeeze=False)
    for ax, (modality, split) in zip(axes[0], panels):
        entry = results[modality][split]
        labels = [str(layer) for layer in range(n_layers)] + ["all_layers"]
        drops = np.array([[entry["layers"][layer][g]["drop"] for g in entry["groups"]] for layer in labels])
        image = ax.imshow(drops, cmap="Reds", vmin=0, vmax=max(entry["accuracy"], 1e-6), aspect="auto")
        ax.set(xticks=range(len(entry["groups"])), yticks=range(len(labels)), yticklabels=["block " + x for x in labels[:-1]] + ["all"],
               title=f"{modality} {split}: accuracy drop (clean {entry['accuracy']:.2f})")
        ax.set_xticklabels(entry["groups"], rotation=40, ha="right", fontsize=8)
        for (r, c), value in np.ndenumerate(drops):
            if not math.isnan(value):
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig
