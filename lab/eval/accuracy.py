"""Accuracy evaluator: ID/OOD accuracy overall and per number of objects, per modality.

Schema of ``accuracy.json``::

    {"info": {...}, "results": {"<modality>": {"<split>": {"accuracy": float, "n": int,
     "chance": float, "per_objects": {"<n_objects>": float}}}}}

``accuracy.csv`` has one row per (modality, split, n_objects).
"""
from __future__ import annotations

from lab.eval.base import EvalContext, Evaluator, answer_predictions


class AccuracyEvaluator(Evaluator):
    name = "accuracy"

    def __call__(self, ctx: EvalContext) -> dict:
        ctx.model.eval()
        results, rows = {}, []
        for modality in ctx.modalities:
            results[modality] = {}
            for split in ctx.task.splits:
                preds, targets, counts = answer_predictions(ctx.model, ctx.batches(split, modality))
                hits = (preds == targets).float()
                per = {int(n): float(hits[counts == n].mean()) for n in counts.unique().tolist()}
                results[modality][split] = {
                    "accuracy": float(hits.mean()),
                    "n": len(hits),
                    "chance": ctx.task.chance_accuracy(ctx.task.eval_set(split, noise=False)),
                    "per_objects": per,
                }
                rows += [{"modality": modality, "split": split, "n_objects": n, "accuracy": a} for n, a in per.items()]
                ctx.log_scalars("accuracy", {f"{modality}_{split}": results[modality][split]["accuracy"]})
        ctx.write_json(self.name, {"results": results})
        ctx.write_csv(self.name, rows)
        ctx.save_figure(self.name, _plot(results, ctx.task))
        return results


def _plot(results: dict, task):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for modality, splits in results.items():
        xs = sorted(n for split in splits.values() for n in split["per_objects"])
        ys = [next(s["per_objects"][n] for s in splits.values() if n in s["per_objects"]) for n in xs]
        ax.plot(xs, ys, marker="o", label=modality)
    if hasattr(task, "id_objects"):
        ax.axvspan(task.id_objects[0] - 0.5, task.id_objects[1] + 0.5, color="tab:green", alpha=0.08, label="ID")
    ax.set(xlabel=getattr(task, "size_label", "number of objects"), ylabel="accuracy", ylim=(0, 1.02), title="Answer accuracy")
    ax.legend()
    return fig
