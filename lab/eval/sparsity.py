"""Hoyer sparseness of the representations per layer (Tosato et al., "Emergent representations in
networks trained with the Forward-Forward algorithm").

For every stream and split, on the prompts the model answers correctly, at the final token:

- ``residual``: the residual h_l, l = 0..L;
- ``mlp``: block l's MLP hidden activation (the input of its output projection, after the
  non-linearity), l = 0..L-1, read by a forward hook (the lab's models and the Hugging Face
  families the adapter supports);

each example's Hoyer sparseness S(x) = (sqrt(n) - |x|_1 / |x|_2) / (sqrt(n) - 1) (1 for a one-hot
vector, 0 for a constant one; an all-zero vector has none and is left out), averaged over the
correct prompts, and per class of each label set (default: the answer). For scale: a dense
Gaussian vector gives about 1 - sqrt(2/pi) = 0.20 for large n.

Outputs: ``sparsity.json`` (modality -> split -> stream -> mean, std, per class),
``sparsity.csv`` (one row per modality, split, stream, layer and class) and ``sparsity.png``.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch

from lab.errors import LabError
from lab.eval.base import EvalContext, Evaluator
from lab.eval.density_peaks import batch_labels
from lab.eval.geometry import Settings, progress

STREAMS = ("residual", "mlp")
HF_MLP_OUTPUT = {"gpt2": "mlp.c_proj", "gpt_neox": "mlp.dense_4h_to_h"}  # others: mlp.down_proj


def hoyer(x) -> np.ndarray:
    """Hoyer sparseness of each row of ``x`` [..., n]: (sqrt(n) - |x|_1/|x|_2) / (sqrt(n) - 1);
    NaN for an all-zero row (and for n = 1)."""
    x = np.abs(np.asarray(x, dtype=np.float64))
    n = x.shape[-1]
    l1, l2 = x.sum(-1), np.sqrt((x * x).sum(-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(l2 > 0, (math.sqrt(n) - l1 / l2) / (math.sqrt(n) - 1), np.nan)


def mlp_output_layers(model) -> list[torch.nn.Module]:
    """Each block's MLP output projection, whose input is the MLP hidden activation."""
    while hasattr(model, "backbone"):  # image-text models wrap the lab's backbone
        model = model.backbone
    if hasattr(model, "blocks"):
        return [block.mlp[-1] for block in model.blocks]
    if hasattr(model, "layers") and hasattr(model, "model_type"):
        path = HF_MLP_OUTPUT.get(model.model_type, "mlp.down_proj")
        modules = []
        for layer in model.layers:
            for part in path.split("."):
                layer = getattr(layer, part, None)
            modules.append(layer)
        if all(m is not None for m in modules):
            return modules
    raise LabError(f"sparsity cannot find the MLP hidden activations of {type(model).__name__}; "
                   "use evaluators.sparsity.streams=[residual]")


@contextmanager
def mlp_hidden(model, where: dict):
    """While active, ``where["rows"]`` (the answer positions) selects the final token and every
    block's MLP hidden activation there is appended to ``where["mlp"][block]``."""
    handles = []

    def hook(block):
        def keep(module, inputs):
            hidden = inputs[0]
            where["mlp"][block].append(hidden[torch.arange(len(hidden), device=hidden.device), where["rows"]]
                                       .double().cpu().numpy())
        return keep

    modules = mlp_output_layers(model)
    where["mlp"] = [[] for _ in modules]
    try:
        handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(modules)]
        yield
    finally:
        for h in handles:
            h.remove()


class SparsityEvaluator(Evaluator):
    """Hoyer sparseness per layer of the residual stream and the MLP hidden activations, on
    correctly answered prompts, overall and per class (see the module docstring)."""

    name = "sparsity"

    def __init__(self, streams=STREAMS, classes=("answer",), only_correct: bool = True, splits=None,
                 modalities=None, layers=None, plots: bool = True) -> None:
        self.settings = s = Settings(self.name, splits=splits, modalities=modalities, layers=layers,
                                     labels=classes, plots=plots)
        self.streams = s.names("streams", streams, allowed=STREAMS)
        if not self.streams:
            raise LabError("sparsity streams must name at least one of residual, mlp")
        self.only_correct = s.flag("only_correct", only_correct)

    def __call__(self, ctx: EvalContext) -> dict:
        ctx.model.eval()
        layers = self.settings.layers_of(ctx.model.n_layers)
        if "mlp" in self.streams:
            mlp_output_layers(ctx.model)  # refuse a model without them before any work
        streams = ctx.stream_splits(self.settings.modalities, self.settings.splits)
        classes = self.settings.labels or []
        first = batch_labels(ctx.data[streams[0][0]].eval_batches(streams[0][1])[0])
        unknown = [c for c in classes if c not in first]
        if unknown:
            raise LabError(f"sparsity classes {unknown} not provided by the task; it has {sorted(first)}")
        results, rows = {}, []
        for modality, split in progress(streams, self.name, lambda s: "/".join(s)):
            values, labels, correct = self._read(ctx, modality, split, layers)
            entry = {"n_prompts": int(len(correct)), "n_correct": int(correct.sum()),
                     "only_correct": self.only_correct}
            keep = correct if self.only_correct else np.ones_like(correct)
            for stream, per_layer in values.items():
                where = layers if stream == "residual" else [l for l in layers if l < ctx.model.n_layers]
                entry[stream] = _summary(where, per_layer, keep, {c: labels[c] for c in classes})
                for i, layer in enumerate(where):
                    rows.append({"modality": modality, "split": split, "stream": stream, "layer": layer,
                                 "class_set": "", "class": "", "hoyer": entry[stream]["mean"][i],
                                 "std": entry[stream]["std"][i], "n": entry[stream]["n"][i]})
                    for c, per_class in entry[stream]["per_class"].items():
                        for value, curve in per_class.items():
                            rows.append({"modality": modality, "split": split, "stream": stream, "layer": layer,
                                         "class_set": c, "class": value, "hoyer": curve["mean"][i], "std": "",
                                         "n": curve["n"]})
                ctx.log_scalars(f"{self.name}/{modality}_{split}_{stream}",
                                {f"l{l}": v for l, v in zip(where, entry[stream]["mean"]) if v is not None})
            results.setdefault(modality, {})[split] = entry
        payload = {"streams": self.streams, "classes": classes, "only_correct": self.only_correct, "results": results}
        ctx.write_json(self.name, payload)
        ctx.write_csv(self.name, rows)
        if self.settings.plots:
            ctx.save_figure(self.name, sparsity_figure(results, self.streams))
        return payload

    @torch.no_grad()
    def _read(self, ctx, modality, split, layers):
        """Hoyer values per stream and layer [N], the labels and whether each answer is right."""
        values = {s: [[] for _ in layers] for s in self.streams}
        labels, correct, where = {}, [], {"mlp": []}
        hooks = mlp_hidden(ctx.model, where) if "mlp" in self.streams else _nothing()
        with hooks:
            for batch in ctx.batches(split, modality):
                where["rows"] = batch.answer_pos
                out = ctx.model.run(batch, capture=layers, positions=batch.answer_pos)
                correct.append((out.logits.argmax(-1) == batch.targets).cpu().numpy())
                rows = torch.arange(len(batch), device=batch.tokens.device)
                if "residual" in self.streams:
                    for i, layer in enumerate(layers):
                        values["residual"][i].append(hoyer(out.captured[layer][rows, batch.answer_pos].double().cpu()))
                for name, v in batch_labels(batch).items():
                    labels.setdefault(name, []).append(v)
        if "mlp" in self.streams:
            values["mlp"] = [[hoyer(h) for h in where["mlp"][l]] for l in layers if l < ctx.model.n_layers]
        joined = {s: [np.concatenate(v) for v in per_layer] for s, per_layer in values.items()}
        return joined, {n: np.concatenate(v) for n, v in labels.items()}, np.concatenate(correct)


@contextmanager
def _nothing():
    yield


def _summary(layers, per_layer, keep, classes) -> dict:
    """Mean and std of the Hoyer values of the kept prompts per layer, and the mean per class."""
    def mean(values, mask):
        chosen = values[mask & np.isfinite(values)]
        return (float(chosen.mean()), float(chosen.std()), int(len(chosen))) if len(chosen) else (None, None, 0)

    stats = [mean(v, keep) for v in per_layer]
    out = {"layers": list(layers), "mean": [s[0] for s in stats], "std": [s[1] for s in stats],
           "n": [s[2] for s in stats], "per_class": {}}
    for name, labels in classes.items():
        out["per_class"][name] = {}
        for value in np.unique(labels[keep]):
            mask = keep & (labels == value)
            out["per_class"][name][str(value)] = {"mean": [mean(v, mask)[0] for v in per_layer], "n": int(mask.sum())}
    return out


def sparsity_figure(results: dict, streams):
    """Per stream (residual, MLP): mean Hoyer sparseness vs layer, one line per data stream and
    split; the classes of the first class set as faint lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(streams), figsize=(5 * len(streams), 3.4), squeeze=False)
    for ax, stream in zip(axes[0], streams):
        for i, (name, entry) in enumerate((f"{m}/{s}", e) for m, splits in results.items() for s, e in splits.items()):
            part = entry[stream]
            for per_class in list(part["per_class"].values())[:1]:
                for curve in per_class.values():
                    ax.plot(part["layers"], [np.nan if v is None else v for v in curve["mean"]], color=f"C{i}",
                            alpha=0.15, lw=0.8)
            ax.plot(part["layers"], [np.nan if v is None else v for v in part["mean"]], "-o", ms=3, color=f"C{i}",
                    label=f"{name} ({entry['n_correct']} correct)")
        ax.set(title=f"Hoyer sparseness: {'residual h_l' if stream == 'residual' else 'MLP hidden, block l'}",
               xlabel="layer l (final token)", ylim=(0, 1))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
