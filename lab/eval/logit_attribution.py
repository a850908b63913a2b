"""Direct logit attribution: which blocks and heads write logit(a) - logit(b) at the last position?

At each prompt's answer position, the final stream is h_L = h_0 + sum over blocks of (the heads'
writes + the attention bias + the MLP write). Through the final norm **with its scale frozen at
h_L's** (the standard approximation, :mod:`lab.models.linear_readout`) the readout is linear, so
logit(a) - logit(b) splits exactly into one contribution per head, attention bias, MLP and the
embedding, plus a constant (the norm's and readout's biases): the parts add up to the model's own
logit difference (``max_sum_error`` reports how closely). A component's attribution is its
effect at the final stream's scale, not what it would do alone.

Targets (:mod:`lab.eval.targets`): ``a`` (default ``answer``) against ``b`` (default: the prior's
answer where the task has one, else the clean model's best other token); with ``only_differing``
prompts whose two targets are the same token are left out.

Outputs: ``logit_attribution.json`` (per modality and split: mean and std over prompts of every
head [layer][head], of each block's attention total and MLP, of the embedding and the constant,
the mean total logit difference and the heads ranked by |mean|), ``logit_attribution.csv`` (one
row per component) and ``logit_attribution.png`` (layer x head heat map of the mean, with the
MLPs as a last column).
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from lab.errors import LabError
from lab.eval.base import EvalContext, Evaluator
from lab.eval.progress import progress
from lab.eval.targets import default_contrast, has_target, target_tokens
from lab.models.linear_readout import frozen_readout
from lab.models.probe import require_probe

log = logging.getLogger(__name__)


class LogitAttributionEvaluator(Evaluator):
    name = "logit_attribution"

    def __init__(self, a: str = "answer", b: str | None = None, splits=None, modalities=None,
                 only_differing: bool = True, top: int = 5, plots: bool = True) -> None:
        self.a, self.b, self.splits, self.modalities = a, b, splits, modalities
        self.only_differing, self.top, self.plots = bool(only_differing), int(top), bool(plots)

    @torch.no_grad()
    def __call__(self, ctx: EvalContext) -> dict:
        model = ctx.model.eval()
        require_probe(model, self.name)
        results, rows = {}, []
        for modality, split in ctx.stream_splits(self.modalities, self.splits):
            batches = list(ctx.batches(split, modality))
            b = self.b or default_contrast(batches[0])
            for name in (self.a, b):
                if not has_target(name, batches[0]):
                    target_tokens(name, batches[0])  # raises the one-line error naming the choices
            parts = attributions(model, batches, self.a, b, self.only_differing, desc=f"{self.name} {modality}/{split}")
            if parts is None:
                log.warning("%s %s/%s: no prompt where %s and %s differ; skipped", self.name, modality, split, self.a, b)
                continue
            entry = summarise(parts, self.top)
            entry.update(a=self.a, b=b)
            results.setdefault(modality, {})[split] = entry
            rows += _rows(modality, split, entry)
            ctx.log_scalars(f"logit_attribution/{modality}_{split}", {"total": entry["total"]["mean"]})
        if not results:
            raise LabError(f"logit_attribution: no prompt of any split has {self.a} and {b} as different tokens")
        payload = {"approximation": "final norm scale frozen at the final stream's", "results": results}
        ctx.write_json(self.name, payload)
        ctx.write_csv(self.name, rows)
        if self.plots:
            ctx.save_figure(self.name, _plot(results))
        return payload


@torch.no_grad()
def attributions(model, batches, a: str, b: str, only_differing: bool = True, desc: str = "attribution") -> dict | None:
    """Per-prompt contributions to logit(a) - logit(b) at the answer position:
    ``heads`` [N, L, H], ``attn_bias`` [N, L], ``mlp`` [N, L], ``embed`` / ``constant`` / ``total`` [N]
    (None when no prompt is kept)."""
    L = model.n_layers
    kept = {k: [] for k in ("heads", "attn_bias", "mlp", "embed", "constant", "total")}
    for batch in progress(batches, desc):
        out = model.run(batch, positions=batch.answer_pos, capture=[0], record=["heads", "writes"],
                        record_at=batch.answer_pos)
        ta, tb = target_tokens(a, batch, out.logits), target_tokens(b, batch, out.logits)
        keep = ta != tb if only_differing else torch.ones_like(ta, dtype=torch.bool)
        if not keep.any():
            continue
        rows = torch.arange(len(batch), device=batch.tokens.device)
        h_final = out.stream.h[rows, batch.answer_pos][keep]
        ta, tb = ta[keep], tb[keep]
        readout = frozen_readout(model, h_final)
        diff = lambda x: readout.difference(x[keep], ta, tb).float().cpu()  # noqa: E731
        records = [out.records[l] for l in range(L)]
        kept["heads"].append(torch.stack([diff(r["heads"]) for r in records], 1))
        kept["attn_bias"].append(torch.stack([diff(r["attn_bias"].expand(len(batch), -1)) for r in records], 1))
        kept["mlp"].append(torch.stack([diff(r["mlp"]) for r in records], 1))
        kept["embed"].append(diff(out.captured[0][rows, batch.answer_pos]))
        kept["constant"].append((readout.offset[ta] - readout.offset[tb]).float().cpu())
        logits = out.logits[keep].float()
        kept["total"].append((logits.gather(1, ta[:, None]) - logits.gather(1, tb[:, None]))[:, 0].cpu())
    if not kept["total"]:
        return None
    return {k: torch.cat(v) for k, v in kept.items()}


def summarise(parts: dict, top: int = 5) -> dict:
    """Mean and std over prompts, the heads ranked by |mean|, and how well the parts add up."""
    stat = lambda x: {"mean": x.mean(0).tolist(), "std": x.std(0, unbiased=False).tolist()}  # noqa: E731
    summed = (parts["heads"].sum((1, 2)) + parts["attn_bias"].sum(1) + parts["mlp"].sum(1) + parts["embed"]
              + parts["constant"])
    mean_heads = parts["heads"].mean(0)
    order = mean_heads.abs().flatten().argsort(descending=True)[:top]
    H = mean_heads.shape[1]
    return {
        "n": int(parts["total"].shape[0]),
        "heads": stat(parts["heads"]),
        "attn": stat(parts["heads"].sum(2) + parts["attn_bias"]),
        "attn_bias": stat(parts["attn_bias"]),
        "mlp": stat(parts["mlp"]),
        "embed": stat(parts["embed"]),
        "constant": stat(parts["constant"]),
        "total": stat(parts["total"]),
        "max_sum_error": float((summed - parts["total"]).abs().max()),
        "top_heads": [{"layer": int(i) // H, "head": int(i) % H, "mean": float(mean_heads.flatten()[i])} for i in order],
    }


def _rows(modality: str, split: str, entry: dict) -> list[dict]:
    base = {"modality": modality, "split": split, "a": entry["a"], "b": entry["b"]}
    rows = []
    for layer, (means, stds) in enumerate(zip(entry["heads"]["mean"], entry["heads"]["std"])):
        for head, (m, s) in enumerate(zip(means, stds)):
            rows.append({**base, "component": "head", "layer": layer, "head": head, "mean": m, "std": s})
        for name in ("attn", "attn_bias", "mlp"):
            rows.append({**base, "component": name, "layer": layer, "head": "",
                         "mean": entry[name]["mean"][layer], "std": entry[name]["std"][layer]})
    for name in ("embed", "constant", "total"):
        rows.append({**base, "component": name, "layer": "", "head": "", "mean": entry[name]["mean"],
                     "std": entry[name]["std"]})
    return rows


def _plot(results: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, s) for m, splits in results.items() for s in splits]
    if not panels:
        raise LabError("logit_attribution: nothing to plot")
    first = results[panels[0][0]][panels[0][1]]
    L, H = np.array(first["heads"]["mean"]).shape
    fig, axes = plt.subplots(1, len(panels), figsize=(1.0 + 0.6 * (H + 1) * len(panels) + 1.5 * len(panels), 0.45 * L + 2.0),
                             squeeze=False)
    for ax, (modality, split) in zip(axes[0], panels):
        entry = results[modality][split]
        grid = np.concatenate([np.array(entry["heads"]["mean"]), np.array(entry["mlp"]["mean"])[:, None]], 1)
        bound = max(float(np.abs(grid).max()), 1e-6)
        image = ax.imshow(grid, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
        ax.set(xticks=range(H + 1), yticks=range(L), yticklabels=[f"block {l}" for l in range(L)],
               title=f"{modality} {split}: logit({entry['a']}) - logit({entry['b']})\n"
                     f"total {entry['total']['mean']:.2f}, n={entry['n']}")
        ax.set_xticklabels([f"h{h}" for h in range(H)] + ["MLP"], fontsize=8)
        for (r, c), value in np.ndenumerate(grid):
            ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig
