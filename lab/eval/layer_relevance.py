"""Layer relevance evaluator: cosine / angular scores vs accuracy-based relevance, per block.

For every modality of the context, every split of the task (ID, OOD) and every ablation
operator (``skip``, ``mean``), on the calibration half of the split's evaluation set:

- similarity scores per block (``lab.eval.relevance.similarity_scores``): ``cosine_all``,
  ``cosine_last``, ``angular`` (n = ``angular_n``);
- accuracy without each block, accuracy relevance
  ``1 - max(Acc(without l) - r, 0) / max(Acc(full) - r, 0)`` with r the task's chance accuracy,
  the raw accuracy drop and the loss increase; removals start from cached prefixes;
- Pearson / Spearman / Kendall correlation of each similarity score with the accuracy relevance
  and with the loss increase, with p-values and percentile bootstrap CIs over samples;
- the ranking audit (fraction of misordered layer pairs, rank confusion matrix);
- the held-out check: the same relevance measured on the evaluation half, and its rank
  correlation with the calibration relevance.

Outputs ``layer_relevance.json`` / ``.csv`` and one PNG per (modality, split, operator); the
schema is documented in docs/layer_relevance.md.
"""
from __future__ import annotations

import logging

import numpy as np

from lab.errors import LabError
from lab.eval.progress import progress
from lab.eval import relevance_plots as plots
from lab.eval.base import EvalContext, Evaluator
from lab.eval.relevance import (OPERATORS, SIMILARITY_SCORES, Ablator, accuracy_relevance, chance_accuracy,
                                halves, json_clean, similarity_scores)
from lab.eval.stats import bootstrap_correlations, correlation, correlations, rank_confusion, ranking_audit

log = logging.getLogger(__name__)


def check_settings(operators, calibration_fraction, n_boot):
    """Refuse ablation settings shared by the relevance and pruning evaluators."""
    bad = [op for op in operators if op not in OPERATORS]
    if bad:
        raise LabError(f"unknown ablation operator(s) {bad}; choose from {list(OPERATORS)}")
    if not 0 < calibration_fraction < 1:
        raise LabError(f"calibration_fraction must be in (0, 1), got {calibration_fraction}")
    if n_boot < 0:
        raise LabError(f"n_boot must be >= 0, got {n_boot}")


def score_split(model, calib, evaluation, chance_calib, chance_eval, operators=OPERATORS, angular_n=1,
                n_boot=1000, seed=0, heldout=True) -> dict:
    """All layer-relevance results of one split (see module docstring); pure function of its inputs."""
    L = model.n_layers
    base = Ablator(model, "skip").prune(calib)
    sims = similarity_scores(base, calib, n=angular_n)
    n = len(base.outcome.correct)
    result = {
        "n_calibration": n,
        "n_evaluation": sum(int(b["targets"].shape[0]) for b in evaluation),
        "chance": chance_calib,
        "chance_evaluation": chance_eval,
        "angular_n": angular_n,
        "full": {"accuracy": base.outcome.accuracy, "loss": base.outcome.mean_loss},
        "similarity": {k: v.mean(0).tolist() for k, v in sims.items()},
        "operators": {},
    }
    for op in progress(operators, "layer_relevance: operators"):
        ablator = Ablator(model, op, mean_batches=calib)
        cands = ablator.candidates(base, calib)
        correct = np.stack([cands[l].correct for l in range(L)], 1).astype(float)  # [N, L]
        loss = np.stack([cands[l].loss for l in range(L)], 1)
        acc_wo = correct.mean(0)
        rel = accuracy_relevance(acc_wo, base.outcome.accuracy, chance_calib)
        loss_inc = loss.mean(0) - base.outcome.mean_loss
        full_correct, full_loss = base.outcome.correct.astype(float), base.outcome.loss
        entry = {
            "accuracy_without": acc_wo.tolist(),
            "relevance": rel.tolist(),
            "accuracy_drop": (base.outcome.accuracy - acc_wo).tolist(),
            "loss_without": loss.mean(0).tolist(),
            "loss_increase": loss_inc.tolist(),
            "correlations": {},
            "ranking": {},
        }
        for score in SIMILARITY_SCORES:
            s = sims[score]

            def rel_pair(idx, s=s):
                acc_full = full_correct[idx].mean()
                return s[idx].mean(0), accuracy_relevance(correct[idx].mean(0), acc_full, chance_calib)

            def loss_pair(idx, s=s):
                return s[idx].mean(0), loss[idx].mean(0) - full_loss[idx].mean()

            x = s.mean(0)
            block = {}
            for target, y, fn in (("relevance", rel, rel_pair), ("loss_increase", loss_inc, loss_pair)):
                c = correlations(x, y)
                if n_boot:
                    ci = bootstrap_correlations(fn, n, n_boot=n_boot, seed=seed)
                    for kind in c:
                        c[kind].update(ci[kind])
                block[f"vs_{target}"] = c
            entry["correlations"][score] = block
            entry["ranking"][score] = {
                "vs_relevance": ranking_audit(x, rel),
                "vs_loss_increase": ranking_audit(x, loss_inc),
                "confusion_vs_relevance": rank_confusion(x, rel).tolist(),
            }
        if heldout:
            ev_state = ablator.prune(evaluation)
            ev = Ablator(model, op, mean_batches=calib)
            ev._means = ablator._means  # mean updates come from the calibration data
            ev_cands = ev.candidates(ev_state, evaluation)
            ev_acc = np.array([ev_cands[l].accuracy for l in range(L)])
            ev_rel = accuracy_relevance(ev_acc, ev_state.outcome.accuracy, chance_eval)
            entry["heldout"] = {
                "full_accuracy": ev_state.outcome.accuracy,
                "accuracy_without": ev_acc.tolist(),
                "relevance": ev_rel.tolist(),
                "spearman_calibration_vs_evaluation": correlation(rel, ev_rel, "spearman")[0],
            }
        result["operators"][op] = entry
    return result


class LayerRelevanceEvaluator(Evaluator):
    """Per-block cosine/angular scores vs accuracy-based relevance (see module docstring)."""

    name = "layer_relevance"

    def __init__(self, operators=("skip", "mean"), angular_n: int = 1, calibration_fraction: float = 0.5,
                 n_boot: int = 1000, seed: int = 0, splits=None, modalities=None, heldout: bool = True,
                 plots: bool = True) -> None:
        check_settings(list(operators), calibration_fraction, n_boot)
        if angular_n < 1:
            raise LabError(f"angular_n must be >= 1, got {angular_n}")
        self.operators, self.angular_n = list(operators), int(angular_n)
        self.calibration_fraction, self.n_boot, self.seed = float(calibration_fraction), int(n_boot), int(seed)
        self.splits, self.modalities, self.heldout, self.plots = splits, modalities, heldout, plots

    def __call__(self, ctx: EvalContext) -> dict:
        ctx.model.eval()
        results, rows = {}, []
        for modality, split in progress(ctx.stream_splits(self.modalities, self.splits), "layer_relevance: streams"):
            calib, evaluation, mask = halves(ctx.batches(split, modality), self.calibration_fraction)
            res = score_split(
                ctx.model, calib, evaluation,
                chance_accuracy(ctx.task, split, mask, True), chance_accuracy(ctx.task, split, mask, False),
                self.operators, self.angular_n, self.n_boot, self.seed, self.heldout,
            )
            results.setdefault(modality, {})[split] = res
            rows += _rows(modality, split, res)
            for op, entry in res["operators"].items():
                ctx.log_scalars(f"layer_relevance/{modality}_{split}_{op}", {
                    f"{score}_{kind}": entry["correlations"][score]["vs_relevance"][kind]["r"]
                    for score in SIMILARITY_SCORES for kind in ("pearson", "spearman", "kendall")
                })
                if self.plots:
                    ctx.save_figure(f"{self.name}_{modality}_{split}_{op}",
                                    plots.relevance_figure(res, op, f"{modality} / {split} / {op}"))
            log.info("layer relevance %s/%s: full accuracy %.3f (chance %.3f)", modality, split,
                     res["full"]["accuracy"], res["chance"])
        config = {"operators": self.operators, "angular_n": self.angular_n,
                  "calibration_fraction": self.calibration_fraction, "n_boot": self.n_boot, "seed": self.seed}
        ctx.write_json(self.name, json_clean({"config": config, "results": results}))
        ctx.write_csv(self.name, rows)
        return results


def _rows(modality: str, split: str, res: dict) -> list[dict]:
    rows = []
    for op, entry in res["operators"].items():
        for l in range(len(entry["relevance"])):
            row = {"modality": modality, "split": split, "operator": op, "layer": l,
                   "accuracy_full": res["full"]["accuracy"], "chance": res["chance"],
                   "accuracy_without": entry["accuracy_without"][l], "relevance": entry["relevance"][l],
                   "accuracy_drop": entry["accuracy_drop"][l], "loss_full": res["full"]["loss"],
                   "loss_without": entry["loss_without"][l], "loss_increase": entry["loss_increase"][l]}
            for score in SIMILARITY_SCORES:
                row[score] = res["similarity"][score][l]
            if "heldout" in entry:
                row["relevance_heldout"] = entry["heldout"]["relevance"][l]
            rows.append(row)
    return rows
