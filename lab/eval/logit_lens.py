"""Logit lens: where do the named targets gain logit mass, layer by layer and token role by role?

For every layer and position group (the batch's token roles: ``query``, ``demo_answer``,
``association_item``, ``image``...), the logit and probability of each named target
(:mod:`lab.eval.targets`: ``answer``; ``prior_answer`` for the few-shot and conflict tasks; absent
targets are skipped) are read through the model's final norm and readout from three sources:

- ``residual``: the residual stream h_l, l = 0..L (h_L gives the model's own output);
- ``attn`` and ``mlp``: the attention and MLP writes of block l (each normalised by the final
  norm on its own, as in Ortu et al., 2024), l = 0..L-1.

Values are means over every position of the group in every prompt (the target is the prompt's).

Outputs: ``logit_lens.json`` (``results[modality][split][source][group][target] = {"logit": [...],
"prob": [...]}`` per layer), ``logit_lens.csv`` (one row per modality, split, source, layer, group,
target) and ``logit_lens.png`` (per split: the targets' probability in the residual stream and
their logits in the attention and MLP writes at ``plot_group``, by layer).
"""
from __future__ import annotations

import numpy as np
import torch

from lab.errors import LabError
from lab.eval.base import EvalContext, Evaluator
from lab.eval.progress import progress
from lab.eval.targets import has_target, target_tokens
from lab.models.probe import require_probe

SOURCES = ("residual", "attn", "mlp")


class LogitLensEvaluator(Evaluator):
    name = "logit_lens"

    def __init__(self, targets=("answer", "prior_answer"), groups=None, splits=None, modalities=None,
                 plot_group: str = "query", plots: bool = True) -> None:
        if not targets:
            raise LabError("logit_lens needs at least one target (e.g. targets=[answer])")
        self.targets, self.groups, self.splits, self.modalities = list(targets), groups, splits, modalities
        self.plot_group, self.plots = plot_group, bool(plots)

    @torch.no_grad()
    def __call__(self, ctx: EvalContext) -> dict:
        model = ctx.model.eval()
        require_probe(model, self.name)
        results, rows = {}, []
        for modality, split in ctx.stream_splits(self.modalities, self.splits):
            batches = list(ctx.batches(split, modality))
            targets = [t for t in self.targets if has_target(t, batches[0])]
            if not targets:
                raise LabError(f"logit_lens: none of the targets {self.targets} exists for task {ctx.task.name!r}")
            groups = _groups(self.groups, batches[0])
            entry = lens(model, batches, targets, groups, desc=f"logit_lens {modality}/{split}")
            results.setdefault(modality, {})[split] = entry
            for source in SOURCES:
                for group in groups:
                    for target in targets:
                        values = entry[source][group][target]
                        for layer, (logit, prob) in enumerate(zip(values["logit"], values["prob"])):
                            rows.append({"modality": modality, "split": split, "source": source, "layer": layer,
                                         "group": group, "target": target, "logit": logit, "prob": prob})
            if self.plot_group in groups:
                final = {t: entry["residual"][self.plot_group][t]["prob"][-1] for t in targets}
                ctx.log_scalars(f"logit_lens/{modality}_{split}", final)
        payload = {"sources": list(SOURCES), "plot_group": self.plot_group, "results": results}
        ctx.write_json(self.name, payload)
        ctx.write_csv(self.name, rows)
        if self.plots:
            ctx.save_figure(self.name, _plot(results, self.plot_group))
        return payload


def _groups(chosen, batch) -> list[str]:
    roles = [r for r in batch.roles if r != "noise"]
    if not chosen:
        return roles
    unknown = [g for g in chosen if g not in batch.roles]
    if unknown:
        raise LabError(f"logit_lens: unknown position group(s) {unknown}; the batches have roles {roles}")
    return list(chosen)


@torch.no_grad()
def lens(model, batches, targets: list[str], groups: list[str], desc: str = "logit_lens") -> dict:
    """Mean logit/probability of each target per source, group and layer (module docstring)."""
    L = model.n_layers
    sums = {s: {g: {t: np.zeros((2, L + 1 if s == "residual" else L)) for t in targets} for g in groups}
            for s in SOURCES}
    counts = {g: 0 for g in groups}
    n = 0
    for batch in progress(batches, desc):
        out = model.run(batch, positions=batch.answer_pos, capture=range(L + 1), record=["writes"])
        tokens = {t: target_tokens(t, batch, out.logits) for t in targets}
        sources = {"residual": [out.captured[l] for l in range(L + 1)],
                   "attn": [out.records[l]["attn"] for l in range(L)],
                   "mlp": [out.records[l]["mlp"] for l in range(L)]}
        n += len(batch)
        for group in groups:
            mask = batch.role_mask(group)
            where = mask.nonzero()[:, 0]
            counts[group] += len(where)
            if not len(where):
                continue
            for source, states in sources.items():
                for layer, h in enumerate(states):
                    logits = model.readout(h[mask]).float()
                    logp = logits.log_softmax(-1)
                    for target in targets:
                        index = tokens[target][where][:, None]
                        sums[source][group][target][0, layer] += float(logits.gather(1, index).sum())
                        sums[source][group][target][1, layer] += float(logp.gather(1, index).exp().sum())
    entry = {"n": n, "targets": targets, "groups": groups, "positions": counts}
    for source in SOURCES:
        entry[source] = {
            g: {t: {"logit": (sums[source][g][t][0] / max(counts[g], 1)).tolist(),
                    "prob": (sums[source][g][t][1] / max(counts[g], 1)).tolist()} for t in targets}
            for g in groups}
    return entry


def _plot(results: dict, group: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, s) for m, splits in results.items() for s in splits]
    if not panels:
        raise LabError("logit_lens: nothing to plot")
    fig, axes = plt.subplots(len(panels), 3, figsize=(11, 2.8 * len(panels)), squeeze=False)
    for row, (modality, split) in zip(axes, panels):
        entry = results[modality][split]
        for ax, source in zip(row, SOURCES):
            if group not in entry["groups"]:
                ax.set_axis_off()
                continue
            key = "prob" if source == "residual" else "logit"
            for target in entry["targets"]:
                values = entry[source][group][target][key]
                ax.plot(range(len(values)), values, marker="o", label=target)
            label = "h_l (l = layer)" if source == "residual" else f"{source} write of block l"
            ax.set_xticks(range(len(values)))
            ax.set(title=f"{modality} {split}: {source} at {group}", xlabel=label,
                   ylabel="probability" if key == "prob" else "logit")
            if key == "prob":
                ax.set_ylim(0, 1.02)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    return fig
