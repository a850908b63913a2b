"""Greedy block pruning evaluator: pruning curves by accuracy relevance, cosine, angular, random
and (optionally) persistence.

For each modality and ablation operator (``skip``, ``mean``):

- blocks are scored on the calibration half of ``calibration_split`` (default: the task's
  first split, ``id`` for the retrieval task);
- **iterative**: remove the least relevant block, re-score the pruned model, repeat
  (accuracy: the block whose removal keeps the highest calibration accuracy, ties broken by
  the smaller loss; cosine / angular: the smallest score measured in the pruned model;
  random: a seeded random order, averaged over ``random_repeats`` seeds; persistence: the block
  l -> l + 1 whose zigzag persistence similarity S(l, l + 1) of the final token's k-NN complexes is
  highest, i.e. that changes the topology least, as Gardinazzi et al. prune; see
  :func:`lab.eval.persistence.block_similarity`, which needs the geometry extra);
- **one-shot**: the blocks are ranked once on the full model and removed in that order;
- every pruned model is reported on the *evaluation* halves of all splits (ID and OOD):
  accuracy and loss after each removal (the pruning curve), so selection and reporting never
  share samples.

Candidate removals start from the cached h_l of the current pruned model (prefix caching, see
``lab.eval.relevance.Ablator``). Outputs ``pruning.json`` / ``pruning.csv`` and
``pruning_<modality>_<operator>.png``; schema in docs/layer_relevance.md.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from lab.errors import LabError
from lab.eval.progress import progress
from lab.eval import relevance_plots as plots
from lab.eval.base import EvalContext, Evaluator
from lab.eval.layer_relevance import check_settings
from lab.eval.relevance import Ablator, chance_accuracy, halves, json_clean, similarity_scores

log = logging.getLogger(__name__)

CRITERIA = ("accuracy", "cosine", "angular", "random", "persistence")
DEFAULT_CRITERIA = CRITERIA[:4]  # persistence needs the optional geometry dependencies
MODES = ("iterative", "one_shot")


def _pick(criterion: str, ablator: Ablator, state, calib, remaining: list[int], rng, cosine_score: str,
          angular_n: int) -> tuple[int, dict]:
    """The least relevant remaining block of the pruned model in ``state``, and its scores."""
    if criterion == "random":
        return int(rng.choice(remaining)), {}
    if criterion == "persistence":
        values = _persistence_scores(state, calib)
        best = min(remaining, key=lambda l: (values[l], l))
        return best, {str(l): float(1 - values[l]) for l in remaining}
    if criterion == "accuracy":
        cands = ablator.candidates(state, calib, layers=remaining)
        scores = {l: (cands[l].accuracy, -cands[l].mean_loss) for l in remaining}
        best = max(remaining, key=lambda l: (scores[l], -l))
        return best, {str(l): {"accuracy_without": v[0], "loss_without": -v[1]} for l, v in scores.items()}
    sims = similarity_scores(state, calib, n=angular_n)
    values = sims[cosine_score if criterion == "cosine" else "angular"].mean(0)
    best = min(remaining, key=lambda l: (values[l], l))
    return best, {str(l): float(values[l]) for l in remaining}


def _persistence_scores(state, calib) -> np.ndarray:
    """1 - S(l, l + 1) per block (lower = less relevant); a block whose input layer has no
    complex (repeated states, as h_0) is scored inf: pruned last."""
    from lab.eval.persistence import block_similarity

    return np.nan_to_num(1 - block_similarity(state, calib), nan=np.inf)


def prune_order(model, calib, criterion: str, mode: str, operator: str, n_remove: int, seed: int = 0,
                cosine_score: str = "cosine_all", angular_n: int = 1) -> tuple[list[int], dict, list]:
    """The order in which blocks are removed, the mean updates used, and per-step scores."""
    ablator = Ablator(model, operator, mean_batches=calib)
    rng = np.random.default_rng(seed)
    removed, means, trace = [], {}, []
    state = ablator.prune(calib)
    if mode == "one_shot" and criterion != "random":
        all_layers = list(range(model.n_layers))
        if criterion == "accuracy":
            cands = ablator.candidates(state, calib)
            order = sorted(all_layers, key=lambda l: (-cands[l].accuracy, cands[l].mean_loss, l))
        elif criterion == "persistence":
            values = _persistence_scores(state, calib)
            order = sorted(all_layers, key=lambda l: (values[l], l))
        else:
            sims = similarity_scores(state, calib, n=angular_n)
            values = sims[cosine_score if criterion == "cosine" else "angular"].mean(0)
            order = sorted(all_layers, key=lambda l: (values[l], l))
        removed = order[:n_remove]
        if operator == "mean":
            full_means = ablator.mean_updates(frozenset(), {})
            means = {l: full_means[l] for l in removed}
        return removed, means, [{"order": order}]
    for _ in range(n_remove):
        remaining = [l for l in range(model.n_layers) if l not in removed]
        layer, scores = _pick(criterion, ablator, state, calib, remaining, rng, cosine_score, angular_n)
        if operator == "mean":
            means[layer] = ablator.mean_updates(state.removed, state.means)[layer]
        removed.append(layer)
        trace.append({"removed": layer, "scores": scores, "calibration_accuracy_before": state.outcome.accuracy})
        state = ablator.prune(calib, removed, means, reuse=state)  # h_0..h_layer are unchanged
    return removed, means, trace


class PruningEvaluator(Evaluator):
    """Greedy iterative / one-shot pruning curves (see module docstring)."""

    name = "pruning"

    def __init__(self, criteria=DEFAULT_CRITERIA, modes=MODES, operators=("skip",), calibration_split: str | None = None,
                 calibration_fraction: float = 0.5, max_removed=None, random_repeats: int = 5, seed: int = 0,
                 cosine_score: str = "cosine_all", angular_n: int = 1, splits=None, modalities=None) -> None:
        bad = [c for c in criteria if c not in CRITERIA]
        if bad:
            raise LabError(f"unknown pruning criterion(s) {bad}; choose from {list(CRITERIA)}")
        bad = [m for m in modes if m not in MODES]
        if bad:
            raise LabError(f"unknown pruning mode(s) {bad}; choose from {list(MODES)}")
        if cosine_score not in ("cosine_all", "cosine_last"):
            raise LabError(f"cosine_score must be cosine_all or cosine_last, got {cosine_score!r}")
        if "persistence" in criteria:
            from lab.eval.persistence import _libraries

            _libraries()  # one clear error now if gudhi or dionysus is missing
        check_settings(list(operators), calibration_fraction, 0)
        if random_repeats < 1:
            raise LabError(f"random_repeats must be >= 1, got {random_repeats}")
        self.criteria, self.modes, self.operators = list(criteria), list(modes), list(operators)
        self.calibration_split, self.calibration_fraction = calibration_split, float(calibration_fraction)
        self.max_removed, self.random_repeats, self.seed = max_removed, int(random_repeats), int(seed)
        self.cosine_score, self.angular_n, self.splits, self.modalities = cosine_score, int(angular_n), splits, modalities

    def _n_remove(self, L: int) -> int:
        if self.max_removed is None:
            return L - 1
        value = float(self.max_removed)
        n = int(math.floor(value * L)) if 0 < value < 1 else int(value)
        if not 1 <= n <= L - 1:
            raise LabError(f"max_removed={self.max_removed} must give between 1 and {L - 1} blocks (or a fraction)")
        return n

    def __call__(self, ctx: EvalContext) -> dict:
        ctx.model.eval()
        model, L = ctx.model, ctx.model.n_layers
        n_remove = self._n_remove(L)
        splits = ctx.choose_splits(self.splits)
        calibration_split = self.calibration_split or ctx.task.splits[0]
        if calibration_split not in ctx.task.splits:
            raise LabError(f"calibration_split={calibration_split!r} is not a split of the task ({list(ctx.task.splits)})")
        results, rows = {}, []
        for modality in ctx.choose_modalities(self.modalities):
            calib, _, _ = halves(ctx.batches(calibration_split, modality), self.calibration_fraction)
            eval_sets, chance = {}, {}
            for split in splits:
                _, evaluation, mask = halves(ctx.batches(split, modality), self.calibration_fraction)
                eval_sets[split], chance[split] = evaluation, chance_accuracy(ctx.task, split, mask, False)
            results[modality] = {}
            for op in progress(self.operators, f"pruning {modality}: operators"):
                curves = []
                for criterion in self.criteria:
                    for mode in self.modes:
                        if criterion == "random" and mode == "one_shot":
                            continue  # a random order is the same one-shot or iterative
                        repeats = self.random_repeats if criterion == "random" else 1
                        runs = [self._curve(model, calib, eval_sets, criterion, mode, op, n_remove, self.seed + r)
                                for r in range(repeats)]
                        curve = {"criterion": criterion, "mode": mode, "operator": op,
                                 "calibration_split": calibration_split, "chance": chance,
                                 "removed": runs[0]["removed"], "trace": runs[0]["trace"],
                                 "calibration_accuracy": runs[0]["calibration_accuracy"]}
                        for key in ("accuracy", "loss"):
                            curve[key] = {s: np.mean([r[key][s] for r in runs], 0).tolist() for s in splits}
                        if repeats > 1:
                            curve["accuracy_std"] = {s: np.std([r["accuracy"][s] for r in runs], 0).tolist() for s in splits}
                            curve["removed_all_repeats"] = [r["removed"] for r in runs]
                        curve["summary"] = _summary(curve, splits, L)
                        curves.append(curve)
                        for split in splits:
                            for k, acc in enumerate(curve["accuracy"][split]):
                                rows.append({"modality": modality, "operator": op, "criterion": criterion, "mode": mode,
                                             "calibration_split": calibration_split, "eval_split": split,
                                             "n_removed": k, "removed_block": curve["removed"][k - 1] if k else "",
                                             "accuracy": acc, "loss": curve["loss"][split][k], "chance": chance[split]})
                        ctx.log_scalars(f"pruning/{modality}_{op}_{criterion}_{mode}",
                                        {f"{s}_mean_accuracy": curve["summary"][s]["mean_accuracy"] for s in splits})
                results[modality][op] = curves
                ctx.save_figure(f"{self.name}_{modality}_{op}",
                                plots.pruning_figure(curves, splits, f"{modality} / {op}", L))
        config = {"criteria": self.criteria, "modes": self.modes, "operators": self.operators,
                  "calibration_split": calibration_split, "calibration_fraction": self.calibration_fraction,
                  "n_removed_max": n_remove, "random_repeats": self.random_repeats, "seed": self.seed,
                  "cosine_score": self.cosine_score, "angular_n": self.angular_n}
        ctx.write_json(self.name, json_clean({"config": config, "results": results}))
        ctx.write_csv(self.name, rows)
        return results

    def _curve(self, model, calib, eval_sets, criterion, mode, op, n_remove, seed) -> dict:
        removed, means, trace = prune_order(model, calib, criterion, mode, op, n_remove, seed,
                                            self.cosine_score, self.angular_n)
        ablator = Ablator(model, op)
        out = {"removed": removed, "trace": trace, "accuracy": {}, "loss": {}, "calibration_accuracy": []}
        for k in range(n_remove + 1):
            kept = {l: means[l] for l in removed[:k] if l in means}
            out["calibration_accuracy"].append(ablator.prune(calib, removed[:k], kept).outcome.accuracy)
        for split, batches in eval_sets.items():
            accs, losses = [], []
            for k in range(n_remove + 1):
                kept = {l: means[l] for l in removed[:k] if l in means}
                outcome = ablator.prune(batches, removed[:k], kept).outcome
                accs.append(outcome.accuracy)
                losses.append(outcome.mean_loss)
            out["accuracy"][split], out["loss"][split] = accs, losses
        return out


def _summary(curve: dict, splits: list[str], L: int) -> dict:
    k25 = max(1, int(round(0.25 * L)))
    out = {}
    for s in splits:
        acc = curve["accuracy"][s]
        out[s] = {"mean_accuracy": float(np.mean(acc)),
                  "accuracy_at_25pct": float(acc[k25]) if k25 < len(acc) else math.nan, "k_25pct": k25}
    return out
