"""The narrow gate (Serra et al., "The Narrow Gate"): does image information reach the text
through many image tokens or through one?

For image prompts (``[BOS] [IMG] x P [CTX_END] ...``: the ``image`` and ``ctx_end`` roles), with
*text queries* = the attendable positions after ``[CTX_END]``:

- ``profile``: per layer, the attention from text queries to each image-side key category
  (``image_interior``: image tokens but the last; ``image_last``; ``ctx_end``: the token after the
  image), summed over heads and averaged over text queries (``mass``; ``text``: every other key),
  and ``share``: the image-side masses normalised to sum to 1 per layer;
- ``knockout``: attention from text queries to one token's key zeroed post-softmax (no
  renormalisation, as in the paper) in every layer >= w, for w = each window; tokens:
  ``image_last``, ``ctx_end``, ``random_image`` (a random image token per prompt, ``n_random``
  draws) and ``all_image``; accuracy and its drop from the clean run;
- ``patching``: the residual h_l of ``image_last`` / ``ctx_end`` replaced by its state under
  another prompt's image (the batch's images rolled by one; same text), for l = 0..L: the flip
  rate (answer differs from the clean one) and the histogram intersection
  sum_v min(p_patched(v), p_swapped(v)) of the output distribution with that of the whole image
  swapped (1: the token carries everything the image changes); ``full_swap`` gives the reference;
- ``modality_gap``: per layer, the median cosine between image-token and text-token states of the
  same prompt;
- ``gate``: the token and window whose knockout exceeds the random-token knockout's drop the
  most; ``narrow`` when that excess is >= ``threshold``.

Outputs: ``narrow_gate.json``, ``narrow_gate.csv`` (long format: modality, split, measure, layer,
name, value) and ``narrow_gate.png`` (the four measures by layer, per modality and split).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from lab.errors import LabError
from lab.eval.base import EvalContext, Evaluator
from lab.eval.progress import progress
from lab.models.interface import knockout_keys
from lab.models.probe import AttentionScale, require_probe

CATEGORIES = ("image_interior", "image_last", "ctx_end")
TOKENS = ("image_last", "ctx_end")


class NarrowGateEvaluator(Evaluator):
    name = "narrow_gate"

    def __init__(self, splits=None, modalities=None, tokens=TOKENS, windows=None, n_random: int = 3,
                 threshold: float = 0.3, patch_layers=None, max_gap_pairs: int = 200_000, seed: int = 0,
                 plots: bool = True) -> None:
        unknown = [t for t in tokens if t not in TOKENS]
        if unknown:
            raise LabError(f"narrow_gate: unknown token(s) {unknown}; choose from {list(TOKENS)}")
        if n_random < 1:
            raise LabError(f"narrow_gate n_random must be >= 1, got {n_random}")
        self.splits, self.modalities, self.tokens, self.windows = splits, modalities, list(tokens), windows
        self.n_random, self.threshold, self.patch_layers = int(n_random), float(threshold), patch_layers
        self.max_gap_pairs, self.seed, self.plots = int(max_gap_pairs), int(seed), bool(plots)

    @torch.no_grad()
    def __call__(self, ctx: EvalContext) -> dict:
        model = ctx.model.eval()
        streams = image_streams(ctx, self.modalities)
        require_probe(model, self.name)
        L = model.n_layers
        windows = list(range(L)) if self.windows is None else [int(w) for w in self.windows]
        patch_layers = list(range(L + 1)) if self.patch_layers is None else [int(l) for l in self.patch_layers]
        if any(not 0 <= w < L for w in windows) or any(not 0 <= l <= L for l in patch_layers):
            raise LabError(f"narrow_gate: windows must be in 0..{L - 1} and patch_layers in 0..{L}")
        results, rows = {}, []
        for modality in streams:
            for split in ctx.choose_splits(self.splits):
                batches = list(ctx.batches(split, modality))
                desc = f"{self.name} {modality}/{split}"
                entry = {"n": sum(len(b) for b in batches), "windows": windows}
                entry["clean_accuracy"] = _accuracy(model, batches)
                entry["profile"] = profile(model, progress(batches, f"{desc} profile"), L)
                entry["knockout"] = knockout(model, batches, self.tokens, windows, self.n_random, self.seed,
                                             entry["clean_accuracy"], desc)
                entry["patching"] = patching(model, progress(batches, f"{desc} patching"), self.tokens, patch_layers)
                entry["modality_gap"] = modality_gap(model, batches, L, self.max_gap_pairs, self.seed)
                entry["gate"] = decide(entry["knockout"], self.tokens, windows, self.threshold)
                results.setdefault(modality, {})[split] = entry
                rows += _rows(modality, split, entry)
                ctx.log_scalars(f"narrow_gate/{modality}_{split}",
                                {"clean_accuracy": entry["clean_accuracy"], "gate_excess": entry["gate"]["excess"]})
        payload = {"threshold": self.threshold, "windows": windows, "patch_layers": patch_layers, "results": results}
        ctx.write_json(self.name, payload)
        ctx.write_csv(self.name, rows)
        if self.plots:
            ctx.save_figure(self.name, _plot(results))
        return payload


# ------------------------------------------------------------------------------------ positions
def image_streams(ctx: EvalContext, modalities=None) -> list[str]:
    """The data streams whose prompts carry images (one-line error when there is none)."""
    chosen = ctx.choose_modalities(modalities)
    streams = []
    for modality in chosen:
        batch = next(iter(ctx.batches(ctx.choose_splits()[0], modality)), None)
        if batch is not None and batch.has_image and "image" in batch.roles:
            streams.append(modality)
    if not streams:
        raise LabError(f"narrow_gate needs a run with image streams (modality=image or image_text, prompts with "
                       f"image tokens); this run's streams {chosen} have none")
    return streams


def _index(batch) -> torch.Tensor:
    B, T = batch.tokens.shape
    return torch.arange(T, device=batch.tokens.device).expand(B, T)


def token_positions(batch, token: str) -> torch.Tensor:
    """[B] position of ``image_last`` or ``ctx_end`` (the token after the last image token)."""
    last = batch.roles["image"].max(1).values
    if token == "image_last":
        return last
    if "ctx_end" in batch.roles:
        return batch.roles["ctx_end"][:, 0]
    return last + 1


def text_queries(batch) -> torch.Tensor:
    """[B, T] bool: attendable positions after the token that follows the image."""
    return batch.attend & (_index(batch) > token_positions(batch, "ctx_end")[:, None])


def _at(batch, positions: torch.Tensor) -> torch.Tensor:
    return _index(batch) == positions[:, None]


def category_masks(batch) -> dict[str, torch.Tensor]:
    image = batch.role_mask("image")
    last = _at(batch, token_positions(batch, "image_last"))
    ctx_end = _at(batch, token_positions(batch, "ctx_end"))
    masks = {"image_interior": image & ~last, "image_last": last, "ctx_end": ctx_end}
    masks["text"] = batch.attend & ~image & ~ctx_end
    return masks


# ------------------------------------------------------------------------------------- measures
@torch.no_grad()
def _accuracy(model, batches, **run) -> float:
    hits = n = 0
    for batch in batches:
        logits = model.run(batch, positions=batch.answer_pos, **run).logits
        hits += int((logits.argmax(-1) == batch.targets).sum())
        n += len(batch)
    return hits / max(n, 1)


@torch.no_grad()
def profile(model, batches, L: int) -> dict:
    """Attention mass (summed over heads) from text queries to each key category, per layer."""
    names = (*CATEGORIES, "text")
    mass, queries = np.zeros((L, len(names))), 0
    for batch in batches:
        out = model.run(batch, record=["patterns"])
        q = text_queries(batch)
        queries += int(q.sum())
        masks = category_masks(batch)
        for layer in range(L):
            heads = out.records[layer]["patterns"].sum(1)  # [B, T, T]
            for c, name in enumerate(names):
                to_c = (heads * masks[name][:, None, :].to(heads.dtype)).sum(-1)  # [B, T]
                mass[layer, c] += float(to_c[q].sum())
    mass /= max(queries, 1)
    image_side = mass[:, : len(CATEGORIES)]
    share = image_side / np.maximum(image_side.sum(1, keepdims=True), 1e-12)
    return {"categories": list(CATEGORIES),
            "share": {name: share[:, c].tolist() for c, name in enumerate(CATEGORIES)},
            "mass": {name: mass[:, c].tolist() for c, name in enumerate(names)}}


@torch.no_grad()
def knockout(model, batches, tokens, windows, n_random: int, seed: int, clean: float, desc: str) -> dict:
    """Accuracy with text queries' attention to one token (or all image tokens) zeroed in layers >= w."""
    L = model.n_layers
    out = {}
    names = [*tokens, "random_image", "all_image"]
    for name in progress(names, f"{desc} knockout"):
        out[name] = {"accuracy": [], "drop": []}
        for w in windows:
            heads = {layer: None for layer in range(w, L)}
            draws = range(n_random) if name == "random_image" else [None]
            accs = []
            for draw in draws:
                hits = n = 0
                for i, batch in enumerate(batches):
                    keys = _keys(batch, name, None if draw is None else (seed, draw, i))
                    pairs = knockout_keys(batch.attend, keys, text_queries(batch))
                    logits = model.run(batch, positions=batch.answer_pos,
                                       scale=AttentionScale(pairs, 0.0, "post", heads)).logits
                    hits += int((logits.argmax(-1) == batch.targets).sum())
                    n += len(batch)
                accs.append(hits / max(n, 1))
            acc = float(np.mean(accs))
            out[name]["accuracy"].append(acc)
            out[name]["drop"].append(clean - acc)
    return out


def _keys(batch, name: str, draw) -> torch.Tensor:
    if name == "all_image":
        return batch.role_mask("image")
    if name != "random_image":
        return _at(batch, token_positions(batch, name))
    image = batch.roles["image"]
    count = (image >= 0).sum(1)
    seed, index, batch_index = draw
    g = torch.Generator().manual_seed(seed * 1_000_003 + index * 1009 + batch_index)
    pick = (torch.rand(len(batch), generator=g) * count.cpu()).long().clamp(max=image.shape[1] - 1).to(image.device)
    return _at(batch, image[torch.arange(len(batch), device=image.device), pick])


def swap_images(batch):
    """The batch with every prompt's image replaced by the next prompt's (rolled by one)."""
    roll = lambda x: None if x is None else x.roll(1, 0)  # noqa: E731
    return dataclasses.replace(batch, images=roll(batch.images), image_features=roll(batch.image_features))


@torch.no_grad()
def patching(model, batches, tokens, layers) -> dict:
    """Flip rate and histogram intersection when one token's h_l comes from another image."""
    sums = {t: np.zeros((2, len(layers))) for t in tokens}
    full = np.zeros(2)
    n = 0
    for batch in batches:
        if len(batch) < 2:
            continue
        all_layers = range(model.n_layers + 1)
        clean = model.run(batch, positions=batch.answer_pos, capture=all_layers)
        other = model.run(swap_images(batch), positions=batch.answer_pos, capture=all_layers)
        base_pred, p_other = clean.logits.argmax(-1), other.logits.float().softmax(-1)
        full += [float((other.logits.argmax(-1) != base_pred).sum()),
                 float(torch.minimum(clean.logits.float().softmax(-1), p_other).sum())]
        rows = torch.arange(len(batch), device=batch.tokens.device)
        for token in tokens:
            pos = token_positions(batch, token)
            for j, layer in enumerate(layers):
                h = clean.captured[layer].clone()
                h[rows, pos] = other.captured[layer][rows, pos]
                logits = model.run(stream=clean.stream.with_h(h), start=layer, positions=batch.answer_pos).logits
                sums[token][0, j] += float((logits.argmax(-1) != base_pred).sum())
                sums[token][1, j] += float(torch.minimum(logits.float().softmax(-1), p_other).sum())
        n += len(batch)
    if not n:
        raise LabError("narrow_gate patching needs evaluation batches of at least 2 prompts")
    result = {t: {"flip_rate": (s[0] / n).tolist(), "hist_intersection": (s[1] / n).tolist()} for t, s in sums.items()}
    result["full_swap"] = {"flip_rate": float(full[0] / n), "hist_intersection_with_clean": float(full[1] / n)}
    result["layers"] = list(layers)
    return result


@torch.no_grad()
def modality_gap(model, batches, L: int, max_pairs: int, seed: int) -> dict:
    """Median (and mean) cosine between image-token and text-token states of a prompt, per layer."""
    values = [[] for _ in range(L + 1)]
    for batch in batches:
        out = model.run(batch, positions=batch.answer_pos, capture=range(L + 1))
        pairs = batch.role_mask("image")[:, :, None] & text_queries(batch)[:, None, :]
        for layer in range(L + 1):
            h = F.normalize(out.captured[layer].float(), dim=-1)
            values[layer].append((h @ h.transpose(1, 2))[pairs].cpu())
    g = torch.Generator().manual_seed(seed)
    median, mean = [], []
    for per_layer in values:
        v = torch.cat(per_layer)
        if len(v) > max_pairs:
            v = v[torch.randperm(len(v), generator=g)[:max_pairs]]
        median.append(float(v.median()) if len(v) else float("nan"))
        mean.append(float(v.mean()) if len(v) else float("nan"))
    return {"median_cos": median, "mean_cos": mean}


def decide(ko: dict, tokens, windows, threshold: float) -> dict:
    """The token and window whose knockout drop exceeds the random image token's the most."""
    best = None
    for token in tokens:
        for w, drop, random_drop in zip(windows, ko[token]["drop"], ko["random_image"]["drop"]):
            if best is None or drop - random_drop > best["excess"]:
                best = {"token": token, "window": w, "drop": drop, "random_drop": random_drop,
                        "excess": drop - random_drop}
    best["narrow"] = bool(best["excess"] >= threshold)
    return best


# ------------------------------------------------------------------------------------- writing
def _rows(modality: str, split: str, entry: dict) -> list[dict]:
    rows = []

    def add(measure, name, values, layers=None):
        for i, value in enumerate(values):
            rows.append({"modality": modality, "split": split, "measure": measure,
                         "layer": layers[i] if layers else i, "name": name, "value": value})

    for name, values in entry["profile"]["share"].items():
        add("profile_share", name, values)
    for name, values in entry["profile"]["mass"].items():
        add("profile_mass", name, values)
    for name, values in entry["knockout"].items():
        add("knockout_accuracy", name, values["accuracy"], entry["windows"])
        add("knockout_drop", name, values["drop"], entry["windows"])
    patch = entry["patching"]
    for name in (k for k in patch if k not in ("full_swap", "layers")):
        add("patch_flip_rate", name, patch[name]["flip_rate"], patch["layers"])
        add("patch_hist_intersection", name, patch[name]["hist_intersection"], patch["layers"])
    add("modality_gap_median_cos", "image_text", entry["modality_gap"]["median_cos"])
    return rows


def _plot(results: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, s) for m, splits in results.items() for s in splits]
    fig, axes = plt.subplots(len(panels), 4, figsize=(15, 3.0 * len(panels)), squeeze=False)
    for row, (modality, split) in zip(axes, panels):
        entry = results[modality][split]
        title = f"{modality} {split}"
        for name, values in entry["profile"]["share"].items():
            row[0].plot(values, marker="o", label=name)
        row[0].set(title=f"{title}: attention share from text", xlabel="layer", ylim=(-0.02, 1.02))
        for name, values in entry["knockout"].items():
            row[1].plot(entry["windows"], values["drop"], marker="o", label=name)
        row[1].set(title=f"knockout in layers >= w (clean {entry['clean_accuracy']:.2f})", xlabel="w",
                   ylabel="accuracy drop")
        patch = entry["patching"]
        for name in (k for k in patch if k not in ("full_swap", "layers")):
            row[2].plot(patch["layers"], patch[name]["flip_rate"], marker="o", label=name)
        row[2].axhline(patch["full_swap"]["flip_rate"], color="gray", ls="--", label="whole image swapped")
        row[2].set(title="patch h_l from another image", xlabel="layer l", ylabel="flip rate", ylim=(-0.02, 1.02))
        row[3].plot(entry["modality_gap"]["median_cos"], marker="o")
        for ax in row:
            ax.xaxis.get_major_locator().set_params(integer=True)
        row[3].set(title="modality gap", xlabel="layer l (h_l)", ylabel="median cos(image, text)")
        for ax in row[:3]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
