"""Figures of the layer-relevance and pruning evaluators (matplotlib, Agg backend)."""
from __future__ import annotations

import numpy as np

from lab.eval.relevance import SIMILARITY_SCORES
from lab.eval.stats import rank_confusion

_COLORS = {"cosine_all": "tab:blue", "cosine_last": "tab:cyan", "angular": "tab:purple",
           "accuracy": "tab:red", "random": "tab:gray", "cosine": "tab:blue"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def relevance_figure(res: dict, op: str, title: str):
    """Four panels: scores per layer, scatter with correlations, rank confusion, pairwise audit."""
    plt = _plt()
    entry = res["operators"][op]
    rel = np.asarray(entry["relevance"], float)
    L = len(rel)
    layers = np.arange(L)
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))

    ax = axes[0]
    ax.bar(layers, rel, color=_COLORS["accuracy"], alpha=0.35, label="accuracy relevance")
    ax.set(xlabel="block", ylabel="accuracy relevance", title=f"Scores per block ({title})")
    ax.set_xticks(layers)
    ax2 = ax.twinx()
    for score in SIMILARITY_SCORES:
        ax2.plot(layers, res["similarity"][score], marker="o", color=_COLORS[score], label=score)
    ax2.set_ylabel("similarity score")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="upper right")

    ax = axes[1]
    lines = []
    for score in SIMILARITY_SCORES:
        x = np.asarray(res["similarity"][score], float)
        ax.scatter(x, rel, color=_COLORS[score], label=score, s=22)
        c = entry["correlations"][score]["vs_relevance"]
        ci = c["pearson"]
        ci_text = f" [{ci.get('ci_low', np.nan):.2f},{ci.get('ci_high', np.nan):.2f}]" if "ci_low" in ci else ""
        lines.append(f"{score}: R={ci['r']:.2f}{ci_text} rho={c['spearman']['r']:.2f} tau={c['kendall']['r']:.2f}")
    for l in range(L):
        ax.annotate(str(l), (res["similarity"]["cosine_all"][l], rel[l]), fontsize=6, alpha=0.7)
    ax.set(xlabel="similarity score", ylabel="accuracy relevance", title="Score vs relevance")
    ax.text(0.01, 0.99, "\n".join(lines), transform=ax.transAxes, fontsize=6.5, va="top")
    ax.legend(fontsize=7, loc="lower right")

    ax = axes[2]
    cos = np.asarray(res["similarity"]["cosine_all"], float)
    m = rank_confusion(cos, rel)
    ax.imshow(m, cmap="Greys", vmin=0, vmax=1)
    ax.set_xticks(layers), ax.set_yticks(layers)
    ax.set(xlabel="rank by cosine_all (0 = most relevant)", ylabel="rank by accuracy relevance",
           title="Ranking confusion matrix")
    audit = entry["ranking"]["cosine_all"]["vs_relevance"]
    ax.text(0.02, 0.98, f"misordered pairs: {audit['n_misordered']}/{audit['n_ordered_pairs']}"
            f" ({audit['fraction_misordered']:.0%})\nties in relevance: {audit['n_reference_ties']}",
            transform=ax.transAxes, fontsize=7, va="top", color="tab:red")

    ax = axes[3]
    agree = np.full((L, L), np.nan)
    for i in range(L):
        for j in range(L):
            if i != j and abs(rel[i] - rel[j]) > 1e-9 and abs(cos[i] - cos[j]) > 1e-12:
                agree[i, j] = float(np.sign(rel[i] - rel[j]) == np.sign(cos[i] - cos[j]))
    ax.imshow(agree, cmap="RdYlGn", vmin=0, vmax=1)
    ax.set(xlabel="block j", ylabel="block i", title="Pair order: cosine agrees (green) / not (red)")
    ax.set_xticks(layers), ax.set_yticks(layers)
    fig.tight_layout()
    return fig


def pruning_figure(curves: list[dict], splits: list[str], title: str, n_layers: int):
    """Accuracy after each removal, one panel per evaluation split; iterative solid, one-shot dashed."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 4), squeeze=False)
    for ax, split in zip(axes[0], splits):
        for curve in curves:
            ys = np.asarray(curve["accuracy"][split], float)
            xs = np.arange(len(ys))
            style = "-" if curve["mode"] == "iterative" else "--"
            label = f"{curve['criterion']} ({curve['mode']})"
            ax.plot(xs, ys, style, marker="o", ms=3, color=_COLORS.get(curve["criterion"], None), label=label)
            if "accuracy_std" in curve:
                sd = np.asarray(curve["accuracy_std"][split], float)
                ax.fill_between(xs, ys - sd, ys + sd, color=_COLORS["random"], alpha=0.15)
        if curves and "chance" in curves[0]:
            ax.axhline(curves[0]["chance"][split], color="k", lw=0.8, ls=":", label="chance")
        ax.set(xlabel="blocks removed", ylabel="accuracy (evaluation half)", title=f"{title}: {split}",
               ylim=(-0.02, 1.02), xlim=(0, n_layers - 1))
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
