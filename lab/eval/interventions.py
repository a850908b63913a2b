"""Interchange interventions: does the model bind by position or by symbol?

For each counterfactual pair (base prompt B, counterfactual C; ``tasks.retrieval.counterfactual_pairs``)
and each layer l = 0..L, C's residual state h_l is patched into B's at a *site* and B is run on;
its answer is classified by the hypothesis that predicts it:

- ``positional``: B's item at the context slot C's query points to;
- ``symbolic``: B's item bound to the shape of C's queried object;
- ``answer_copy``: C's own answer (the state already held the answer);
- ``no_effect``: B's own answer; ``other``: none of these.

Sites: ``final`` (the last token, which is the query colour and the reading position),
``query_marker`` (the ``[QUE]`` token before it), ``after_context`` (every position after
``[CTX_END]``: associations and query). Patching h_0 at the final token replaces the query colour
itself, so early "other" outcomes mean "B was asked about a colour it does not hold".

Per (split, site, layer): outcome rates with Wilson confidence intervals, the symbolic/positional
ratio, and the symbolic share ``s / (s + p)``. A model that, once disturbed, answers with a random
item of B's prompt hits "positional" or "symbolic" by chance at rate ``guess_rate`` (the mean of
1/N over the pairs); "answer copy" is never a guess (C's answer is not among B's items). Per
(split, site): ``first_causal_layer``, the first layer at which some binding hypothesis
(positional, symbolic, answer copy) has a rate whose lower confidence bound exceeds its guess rate
by more than ``threshold``, and ``mechanism_at_first_causal``, the hypothesis with the largest
excess there (late layers only read out a finished answer, so the first spike is what tells the
mechanism apart).
Only pairs whose two clean prompts the model answers correctly are used (``only_correct``).

Outputs: ``interventions.json``, ``interventions.csv`` (one row per split, site, layer, outcome),
``interventions.png`` (stacked outcome rates vs layer, one panel per split and site).
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

from lab.errors import LabError
from lab.eval.progress import progress
from lab.eval.base import EvalContext, Evaluator
from lab.eval.stats import wilson_interval
from lab.models.interface import ResidualModel
from tasks.retrieval import HYPOTHESES

log = logging.getLogger(__name__)

OUTCOMES = (*HYPOTHESES, "other")
SITES = ("final", "query_marker", "after_context")
BINDING = ("positional", "symbolic", "answer_copy")


class InterventionsEvaluator(Evaluator):
    name = "interventions"
    tasks = ("retrieval",)  # reads the queried object's slot and associations

    def __init__(self, n_pairs: int = 512, splits=None, sites=SITES, modality: str = "text",
                 only_correct: bool = True, threshold: float = 0.2, level: float = 0.95, seed: int = 0,
                 plots: bool = True) -> None:
        unknown = [s for s in sites if s not in SITES]
        if unknown:
            raise LabError(f"unknown intervention site(s) {unknown}; choose from {list(SITES)}")
        if n_pairs < 1:
            raise LabError(f"interventions n_pairs must be >= 1, got {n_pairs}")
        if not 0 <= threshold < 1:
            raise LabError(f"interventions threshold must be in [0, 1), got {threshold}")
        self.n_pairs, self.splits, self.sites, self.modality = int(n_pairs), splits, list(sites), modality
        self.only_correct, self.threshold, self.level = bool(only_correct), float(threshold), float(level)
        self.seed, self.plots = int(seed), bool(plots)

    def __call__(self, ctx: EvalContext) -> dict:
        ctx.model.eval()
        modality = ctx.choose_modalities([self.modality])[0]
        results, rows = {}, []
        for split in ctx.choose_splits(self.splits):
            specs, base, counter = ctx.pairs(split, self.n_pairs, seed=self.seed, modality=modality)
            outcome = intervention_outcomes(ctx.model, base, counter, _predictions(specs, base), self.sites)
            both_correct = outcome["clean_base_correct"] & outcome["clean_counterfactual_correct"]
            keep = both_correct if self.only_correct else torch.ones_like(both_correct)
            split_result = {
                "n_pairs": len(specs),
                "n_used": int(keep.sum()),
                "clean_accuracy": {"base": float(outcome["clean_base_correct"].float().mean()),
                                   "counterfactual": float(outcome["clean_counterfactual_correct"].float().mean())},
                "sites": {},
            }
            if not keep.any():
                log.warning("split %s: the model answers none of the clean pairs; no intervention is interpretable", split)
            guess = float((1.0 / base.n_objects[keep.to(base.n_objects.device)].float()).mean()) if keep.any() else math.nan
            split_result["guess_rate"] = guess
            for site in self.sites:
                site_result = summarise(outcome[site][:, keep], guess, self.threshold, self.level)
                split_result["sites"][site] = site_result
                for layer, entry in enumerate(site_result["layers"]):
                    for name in OUTCOMES:
                        rows.append({"modality": modality, "split": split, "site": site, "layer": layer, "outcome": name,
                                     "rate": entry["rates"][name], "ci_low": entry["ci"][name][0],
                                     "ci_high": entry["ci"][name][1], "n": entry["n"]})
                ctx.log_scalars(f"interventions/{split}_{site}", {
                    "first_causal_layer": site_result["first_causal_layer"] if site_result["first_causal_layer"] is not None else -1})
            results[split] = split_result
        payload = {"modality": modality, "threshold": self.threshold, "level": self.level, "seed": self.seed,
                   "outcomes": list(OUTCOMES), "results": results}
        ctx.write_json(self.name, payload)
        ctx.write_csv(self.name, rows)
        if self.plots:
            ctx.save_figure(self.name, _plot(results, self.sites))
        return payload


def _predictions(specs, base) -> torch.Tensor:
    """[N, 4] answer token each hypothesis predicts, in ``HYPOTHESES`` order."""
    return torch.tensor([[p.predictions[h] for h in HYPOTHESES] for p in specs], device=base.tokens.device)


def site_mask(batch, site: str) -> torch.Tensor:
    """[B, T] bool: the positions patched at ``site``."""
    B, T = batch.tokens.shape
    index = torch.arange(T, device=batch.tokens.device).expand(B, T)
    if site == "final":
        return index == batch.answer_pos[:, None]
    if site == "query_marker":
        return batch.role_mask("query_marker")
    if site == "after_context":
        return batch.attend & (index > batch.roles["ctx_end"][:, :1])
    raise LabError(f"unknown intervention site {site!r}; choose from {list(SITES)}")


@torch.no_grad()
def intervention_outcomes(model: ResidualModel, base, counter, predictions: torch.Tensor, sites) -> dict:
    """Outcome index (into ``OUTCOMES``) of every pair after patching C's h_l into B, for every
    site: ``{site: [L + 1, N] long}``, plus the clean answers' correctness ([N] bool each)."""
    if base.tokens.shape != counter.tokens.shape:
        raise LabError("base and counterfactual prompts must have the same length to patch position by position")
    layers = list(range(model.n_layers + 1))
    clean_base = model.run(base, positions=base.answer_pos, capture=layers)
    clean_counter = model.run(counter, positions=counter.answer_pos, capture=layers)
    result = {
        "clean_base_correct": (clean_base.logits.argmax(-1) == predictions[:, HYPOTHESES.index("no_effect")]).cpu(),
        "clean_counterfactual_correct":
            (clean_counter.logits.argmax(-1) == predictions[:, HYPOTHESES.index("answer_copy")]).cpu(),
    }
    for site in progress(sites, "interventions: sites"):
        mask = site_mask(base, site)
        if not torch.equal(mask, site_mask(counter, site)):
            raise LabError(f"site {site!r} is at different positions in the base and counterfactual prompts")
        per_layer = []
        for layer in layers:
            # B's h_l with C's at the site; blocks below l are unchanged, so the run resumes at l
            patched = torch.where(mask[..., None], clean_counter.captured[layer], clean_base.captured[layer])
            answer = model.run(stream=clean_base.stream.with_h(patched), start=layer, positions=base.answer_pos).logits.argmax(-1)
            match = answer[:, None] == predictions
            # Hypotheses predict pairwise different answers, so at most one matches.
            per_layer.append(torch.where(match.any(1), match.float().argmax(1), len(HYPOTHESES)))
        result[site] = torch.stack(per_layer).cpu()
    return result


def summarise(outcomes: torch.Tensor, guess_rate: float, threshold: float = 0.2, level: float = 0.95) -> dict:
    """Rates, CIs and the first causal layer from outcome indices [L + 1, N] (see module docstring)."""
    chance = {"positional": guess_rate, "symbolic": guess_rate, "answer_copy": 0.0}
    layers = []
    first_causal, dominant = None, None
    for layer, row in enumerate(outcomes):
        n = int(row.numel())
        counts = {name: int((row == i).sum()) for i, name in enumerate(OUTCOMES)}
        rates = {name: counts[name] / n if n else math.nan for name in OUTCOMES}
        s, p = counts["symbolic"], counts["positional"]
        entry = {
            "n": n,
            "counts": counts,
            "rates": rates,
            "ci": {name: list(wilson_interval(counts[name], n, level)) for name in OUTCOMES},
            "symbolic_positional_ratio": s / p if p else (math.inf if s else math.nan),
            "symbolic_share": s / (s + p) if s + p else math.nan,
            "symbolic_share_ci": list(wilson_interval(s, s + p, level)),
        }
        layers.append(entry)
        excess = {h: entry["ci"][h][0] - chance[h] for h in BINDING}
        if first_causal is None and n and max(excess.values()) > threshold:
            first_causal = layer
            dominant = max(BINDING, key=lambda h: rates[h] - chance[h])
    return {
        "layers": layers,
        "first_causal_layer": first_causal,
        "mechanism_at_first_causal": dominant,
        "peak_layer": {name: int(np.argmax([e["rates"][name] for e in layers])) if layers and layers[0]["n"] else None
                       for name in BINDING},
    }


_COLOURS = {"positional": "tab:blue", "symbolic": "tab:orange", "answer_copy": "tab:green",
            "no_effect": "lightgray", "other": "tab:red"}


def _plot(results: dict, sites: list[str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(results)
    fig, axes = plt.subplots(len(splits), len(sites), figsize=(3.6 * len(sites), 2.8 * len(splits)), squeeze=False)
    for r, split in enumerate(splits):
        for c, site in enumerate(sites):
            ax, summary = axes[r][c], results[split]["sites"][site]
            layers = np.arange(len(summary["layers"]))
            bottom = np.zeros(len(layers))
            for name in OUTCOMES:
                values = np.nan_to_num([e["rates"][name] for e in summary["layers"]])
                ax.bar(layers, values, bottom=bottom, color=_COLOURS[name], label=name, width=0.8)
                bottom += values
            if summary["first_causal_layer"] is not None:
                ax.axvline(summary["first_causal_layer"], color="black", ls="--", lw=1)
            ax.set(title=f"{split}, {site} (n={summary['layers'][0]['n']})", xlabel="layer l (patched h_l)",
                   ylabel="outcome rate", ylim=(0, 1), xticks=layers)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig
