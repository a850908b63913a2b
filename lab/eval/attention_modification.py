"""Attention modification (Ortu et al., 2024): scale the attention from the last position to one
key group by alpha, in chosen heads, and count which target wins.

For each alpha of a grid, the attention weights from each prompt's answer position to the
positions of ``key_group`` (a token role: ``demo_answer`` for the few-shot and conflict tasks,
``association_item`` for retrieval) are scaled in ``heads`` (``all``, or a list of ``"layer.head"``
/ ``"layer"`` / ``[layer, head]``), the answer is read again, and the evaluator reports the
accuracy, how often each target is the argmax (``wins``: ``a``, ``b`` or ``other``), how often
logit(a) > logit(b), and the mean logit(a) - logit(b). ``mode`` is where alpha acts
(:mod:`lab.models.probe`): ``post`` (default, the paper's choice) multiplies the softmax weights
without renormalising; ``pre`` adds log(alpha) to the scores (renormalised).

Targets as in :mod:`lab.eval.logit_attribution` (``a`` = ``answer``, ``b`` = the prior's answer or
the best other token); with ``only_differing`` prompts whose two targets coincide are left out.

Outputs: ``attention_modification.json`` (per modality, split and alpha), ``.csv`` (one row per
modality, split, alpha) and ``.png`` (accuracy and win rates against alpha).
"""
from __future__ import annotations

import logging

import torch

from lab.errors import LabError
from lab.eval.base import EvalContext, Evaluator
from lab.eval.progress import progress
from lab.eval.targets import default_contrast, target_tokens
from lab.models.interface import knockout_keys
from lab.models.probe import SCALE_MODES, AttentionScale, require_probe

log = logging.getLogger(__name__)

ALPHAS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 10.0)


def parse_heads(heads, n_layers: int) -> dict | None:
    """``all`` -> None (every head); else {layer: [heads] or None (all of that layer's heads)}.
    Items: ``"layer.head"`` (quote it in YAML: 1.10 would read as a number), ``layer`` or
    ``[layer, head]``."""
    if heads is None or heads == "all":
        return None
    chosen: dict[int, list[int] | None] = {}
    for item in [heads] if isinstance(heads, (str, int, float)) else list(heads):
        try:
            parts = [int(p) for p in (str(item).split(".") if isinstance(item, (str, int, float)) else item)]
        except (TypeError, ValueError):
            parts = []
        if not 1 <= len(parts) <= 2 or not 0 <= parts[0] < n_layers:
            raise LabError(f"attention_modification heads: {item!r} is not 'layer.head', 'layer' or [layer, head] "
                           f"with a layer in 0..{n_layers - 1}")
        if len(parts) == 1:
            chosen[parts[0]] = None
        elif chosen.get(parts[0], []) is not None:
            chosen.setdefault(parts[0], []).append(parts[1])
    return chosen


class AttentionModificationEvaluator(Evaluator):
    name = "attention_modification"

    def __init__(self, key_group: str = "demo_answer", heads="all", alphas=ALPHAS, mode: str = "post",
                 a: str = "answer", b: str | None = None, splits=None, modalities=None, only_differing: bool = True,
                 plots: bool = True) -> None:
        if mode not in SCALE_MODES:
            raise LabError(f"attention_modification mode must be one of {list(SCALE_MODES)}, got {mode!r}")
        if not alphas or any(float(x) < 0 for x in alphas):
            raise LabError(f"attention_modification alphas must be a non-empty list of numbers >= 0, got {alphas}")
        self.key_group, self.heads, self.alphas, self.mode = key_group, heads, [float(x) for x in alphas], mode
        self.a, self.b, self.splits, self.modalities = a, b, splits, modalities
        self.only_differing, self.plots = bool(only_differing), bool(plots)

    @torch.no_grad()
    def __call__(self, ctx: EvalContext) -> dict:
        model = ctx.model.eval()
        require_probe(model, self.name)
        heads = parse_heads(self.heads, model.n_layers)
        results, rows = {}, []
        for modality, split in ctx.stream_splits(self.modalities, self.splits):
            batches = list(ctx.batches(split, modality))
            if self.key_group not in batches[0].roles:
                raise LabError(f"attention_modification: key_group={self.key_group!r} is not a token role of task "
                               f"{ctx.task.name!r}; it has {sorted(r for r in batches[0].roles if r != 'noise')}")
            b = self.b or default_contrast(batches[0])
            entry = {"a": self.a, "b": b, "alphas": {}}
            for alpha in progress(self.alphas, f"{self.name} {modality}/{split}"):
                counts = self._count(model, batches, alpha, heads, b)
                if counts is None:
                    break
                entry["alphas"][str(alpha)] = counts
                rows.append({"modality": modality, "split": split, "alpha": alpha, "n": counts["n"],
                             "accuracy": counts["accuracy"], "wins_a": counts["wins"]["a"],
                             "wins_b": counts["wins"]["b"], "wins_other": counts["wins"]["other"],
                             "a_over_b": counts["a_over_b"], "mean_logit_diff": counts["mean_logit_diff"]})
            if not entry["alphas"]:
                log.warning("%s %s/%s: no prompt where %s and %s differ; skipped", self.name, modality, split, self.a, b)
                continue
            entry["n"] = next(iter(entry["alphas"].values()))["n"]
            results.setdefault(modality, {})[split] = entry
            ctx.log_scalars(f"attention_modification/{modality}_{split}",
                            {f"accuracy_alpha{a}": c["accuracy"] for a, c in entry["alphas"].items()})
        if not results:
            raise LabError(f"attention_modification: no prompt of any split has {self.a} and {self.b or 'its contrast'} "
                           "as different tokens")
        payload = {"key_group": self.key_group, "heads": "all" if heads is None else {str(k): v for k, v in heads.items()},
                   "mode": self.mode, "results": results}
        ctx.write_json(self.name, payload)
        ctx.write_csv(self.name, rows)
        if self.plots:
            ctx.save_figure(self.name, _plot(results, self.key_group, self.mode))
        return payload

    def _count(self, model, batches, alpha: float, heads, b: str) -> dict | None:
        n = hits = a_over_b = 0
        wins = {"a": 0, "b": 0, "other": 0}
        diff_sum = 0.0
        for batch in batches:
            clean = model.run(batch, positions=batch.answer_pos).logits if b == "top_other" else None
            ta, tb = target_tokens(self.a, batch, clean), target_tokens(b, batch, clean)
            keep = ta != tb if self.only_differing else torch.ones_like(ta, dtype=torch.bool)
            T = batch.tokens.shape[1]
            last = torch.arange(T, device=batch.tokens.device)[None] == batch.answer_pos[:, None]
            pairs = knockout_keys(batch.attend, batch.role_mask(self.key_group), last)
            logits = model.run(batch, positions=batch.answer_pos,
                               scale=AttentionScale(pairs, alpha, self.mode, heads)).logits[keep].float()
            ta, tb = ta[keep], tb[keep]
            pred = logits.argmax(-1)
            la, lb = logits.gather(1, ta[:, None])[:, 0], logits.gather(1, tb[:, None])[:, 0]
            n += int(keep.sum())
            hits += int((pred == batch.targets[keep]).sum())
            wins["a"] += int((pred == ta).sum())
            wins["b"] += int((pred == tb).sum())
            wins["other"] += int(((pred != ta) & (pred != tb)).sum())
            a_over_b += int((la > lb).sum())
            diff_sum += float((la - lb).sum())
        if not n:
            return None
        return {"n": n, "accuracy": hits / n, "wins": wins, "a_over_b": a_over_b, "mean_logit_diff": diff_sum / n}


def _plot(results: dict, key_group: str, mode: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, s) for m, splits in results.items() for s in splits]
    if not panels:
        raise LabError("attention_modification: nothing to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (modality, split) in zip(axes[0], panels):
        entry = results[modality][split]
        alphas = list(entry["alphas"])
        xs = range(len(alphas))
        get = lambda f: [f(entry["alphas"][a]) for a in alphas]  # noqa: E731
        ax.plot(xs, get(lambda c: c["accuracy"]), marker="o", color="black", ls="--", label="accuracy")
        ax.plot(xs, get(lambda c: c["wins"]["a"] / c["n"]), marker="s", label=f"{entry['a']} wins")
        ax.plot(xs, get(lambda c: c["wins"]["b"] / c["n"]), marker="^", label=f"{entry['b']} wins")
        ax.set(xticks=list(xs), xlabel=f"alpha ({mode}) on attention to {key_group}", ylim=(-0.02, 1.02),
               ylabel="fraction of prompts", title=f"{modality} {split} (n={entry['n']})")
        ax.set_xticklabels(alphas, fontsize=8)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return fig
