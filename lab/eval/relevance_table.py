"""Markdown summary of a run's layer-relevance and pruning outputs (``eval/layer_relevance.json``,
``eval/pruning.csv``): correlation table per split, per-block figures, pruning accuracies.

    python -m lab.eval.relevance_table checkpoints/retrieval/<run> > docs/tables/<name>.md
"""
from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict


def _fmt(value, spec: str = "+.2f") -> str:
    """A number, or n/a where it is undefined (e.g. correlations of a constant relevance at chance)."""
    return "n/a" if value is None else format(value, spec)


def relevance_markdown(run: str) -> str:
    d = json.load(open(f"{run}/eval/layer_relevance.json"))
    out = []
    for modality, splits in d["results"].items():
        for split, r in splits.items():
            out += [f"\n**{modality} / {split}** (full accuracy {r['full']['accuracy']:.3f}, chance {r['chance']:.3f}, "
                    f"{r['n_calibration']} calibration samples)\n",
                    "| operator | score | vs | Pearson R [95% CI] (p) | Spearman rho (p) | Kendall tau (p) | misordered pairs |",
                    "|---|---|---|---|---|---|---|"]
            for op, o in r["operators"].items():
                for score, c in o["correlations"].items():
                    for vs in ("vs_relevance", "vs_loss_increase"):
                        if vs not in c:
                            continue
                        P, S, K = c[vs]["pearson"], c[vs]["spearman"], c[vs]["kendall"]
                        mis = o.get("ranking", {}).get(score, {}).get(vs)
                        ms = "-" if not mis else f"{mis['n_misordered']}/{mis['n_ordered_pairs']} ({mis['n_reference_ties']} ties)"
                        out.append(f"| {op} | {score} | {vs[3:]} | {_fmt(P['r'])} [{_fmt(P.get('ci_low'))}, "
                                   f"{_fmt(P.get('ci_high'))}] ({_fmt(P['p'], '.2g')}) | {_fmt(S['r'])} ({_fmt(S['p'], '.2g')}) | "
                                   f"{_fmt(K['r'])} ({_fmt(K['p'], '.2g')}) | {ms} |")
            skip = r["operators"]["skip"]
            blocks = zip(skip["accuracy_without"], skip["loss_increase"], r["similarity"]["cosine_all"])
            out.append("\nPer block (skip): " + ", ".join(
                f"{i}: acc w/o {a:.3f}, dloss {l:+.3f}, 1-cos {c:.4f}" for i, (a, l, c) in enumerate(blocks)))
    return "\n".join(out) + "\n"


def pruning_markdown(run: str) -> str:
    rows = list(csv.DictReader(open(f"{run}/eval/pruning.csv")))
    groups = defaultdict(list)
    for r in rows:
        groups[(r.get("modality", "text"), r["criterion"], r["mode"], r["eval_split"])].append(r)
    n_blocks = max(int(r["n_removed"]) for r in rows) + 1
    picks = [0, round(n_blocks * 0.25), round(n_blocks * 0.5)]
    out = ["\n| modality | criterion | mode | split | accuracy after removing 0/25/50% of blocks | removal order |",
           "|---|---|---|---|---|---|"]
    for (modality, criterion, mode, split), rs in groups.items():
        by = defaultdict(list)
        for r in rs:
            by[int(r["n_removed"])].append(float(r["accuracy"]))
        accs = " / ".join(f"{sum(by[k]) / len(by[k]):.3f}" if k in by else "-" for k in picks)
        order = [r["removed_block"] for r in sorted(rs, key=lambda r: int(r["n_removed"])) if r["removed_block"]]
        out.append(f"| {modality} | {criterion} | {mode} | {split} | {accs} | {'random' if criterion == 'random' else order} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(relevance_markdown(sys.argv[1]) + pruning_markdown(sys.argv[1]))
