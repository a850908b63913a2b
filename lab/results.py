"""Aggregate finished runs into a results table: mean +- std and a 95% CI over seeds per regime,
encoder and set of training aids.

``python aggregate.py checkpoints/retrieval/<sweep> [more dirs] --out docs/tables/regimes.md``
finds every run directory (a folder with config.yaml and metrics.json) below the given paths.
``--figure <png>`` plots OOD accuracy per number of objects (one line per group, mean over seeds
with a 95% CI band); ``--compare a:b`` adds Welch's t-test of group ``a`` vs group ``b`` (regime
names, or ``regime@encoder`` / ``regime@aids`` where a regime has several) on every metric. ``--binding`` adds the binding-mechanism table built from each run's
``eval/interventions.json``, ``eval/probes.json`` and ``eval/knockout.json`` (see docs/binding.md).
``--density LABEL=RUN[:SPLIT] ... --density-figure <png>`` draws the density-peak profiles of chosen
runs and splits side by side (e.g. ICL at 0/1/2/5 shots vs SFT; docs/fewshot.md).
"""
from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from scipy import stats

from lab.build import uses_images
from lab.errors import LabError


METRICS = ("val/text_id_acc", "val/text_ood_acc", "val/image_id_acc", "val/image_ood_acc")


def find_runs(paths: list[str]) -> list[Path]:
    runs = []
    for path in map(Path, paths):
        if not path.exists():
            raise LabError(f"{path} does not exist")
        runs += sorted(p.parent for p in path.rglob("config.yaml") if (p.parent / "metrics.json").is_file())
    if not runs:
        raise LabError(f"no finished runs (config.yaml + metrics.json) under {paths}")
    return runs


def run_record(run_dir: Path) -> dict:
    """Regime, encoder, seed and final metrics of one run."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    images = uses_images(cfg)
    return {
        "run": str(run_dir),
        "regime": str(cfg.regime.get("name", "?")),
        "encoder": str(cfg.encoder.name) if images and "encoder" in cfg else "-",
        "aids": training_aids(cfg),
        "seed": int(cfg.seed),
        "steps": int(metrics["step"]),
        **{m: metrics.get(m) for m in METRICS},
        "per_count": {k: v for k, v in metrics.items() if k.startswith("val_n/")},
    }


def intermediate_settings(cfg) -> dict:
    """The intermediate-supervision settings of a saved run config (a DictConfig or plain dict):
    ``objective.intermediate``, or ``train.intermediate`` in configs written before objectives
    became parts."""
    node = (cfg.get("objective") or {}).get("intermediate") or (cfg.get("train") or {}).get("intermediate")
    return dict(node or {})


def training_aids(cfg) -> str:
    """The learning aids a run used (docs/learning.md), e.g. ``shift+mid@2+q4`` or, for images alone,
    ``shift+midx0.3@middle+q4+1hop4`` (intermediate weight when not 1); ``none`` for the paper's plain recipe."""
    aids = []
    init = cfg.model.get("init")
    if init and init != "gpt2":  # runs without the key were initialised the gpt2 way
        aids.append(f"init={init}")
    shift = cfg.model.get("token_shift")
    if shift:
        aids.append("assocshift" if shift == "associations" else "shift")
    if (cfg.get("train") or {}).get("shift_fade"):
        aids[-1] += "~fade"
    if cfg.model.get("pos_encoding") == "learned":
        aids.append("learnedpos")
    mid = intermediate_settings(cfg)
    if mid.get("weight"):
        weight = "" if float(mid["weight"]) == 1.0 else f"x{float(mid['weight']):g}"  # e.g. midx0.3@middle
        aids.append(f"mid{weight}@{'middle' if mid.get('layer') is None else mid.get('layer')}" + ("~anneal" if mid.get("anneal") else ""))
    slot = (cfg.get("objective") or {}).get("slot") or {}
    if slot.get("weight"):
        aids.append(f"slot@{'middle' if slot.get('layer') is None else slot.get('layer')}")
    if int(cfg.task.get("train_queries", 1) or 1) > 1:
        aids.append(f"q{cfg.task.train_queries}")
    one_hop = (cfg.get("objective") or {}).get("one_hop") or {}
    if int(cfg.task.get("one_hop_queries", 0) or 0) > 0 and one_hop.get("weight", 1.0):
        aids.append(f"1hop{cfg.task.one_hop_queries}" + ("~anneal" if one_hop.get("anneal") else ""))
    return "+".join(aids) or "none"


def mean_ci(values) -> tuple[float, float, float]:
    """Mean, standard deviation and the half-width of a 95% t-interval (0 for one value)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float(values.mean()), 0.0, 0.0
    std = float(values.std(ddof=1))
    return float(values.mean()), std, float(stats.t.ppf(0.975, len(values) - 1) * std / np.sqrt(len(values)))


def group_runs(records: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["regime"], r["encoder"], r["aids"])].append(r)
    return dict(sorted(groups.items()))


def aggregate(records: list[dict]) -> list[dict]:
    rows = []
    for (regime, encoder, aids), rs in group_runs(records).items():
        row = {"regime": regime, "encoder": encoder, "aids": aids, "seeds": len(rs),
               "steps": float(np.mean([r["steps"] for r in rs]))}
        for m in METRICS:
            values = [r[m] for r in rs if r[m] is not None]
            row[m] = mean_ci(values) if values else None
        rows.append(row)
    return rows


def to_markdown(rows: list[dict]) -> str:
    head = ["regime", "encoder", "aids", "seeds", "steps", "text ID", "text OOD", "image ID", "image OOD"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["regime"], row["encoder"], row["aids"], str(row["seeds"]), f"{row['steps']:.0f}"]
        for m in METRICS:
            v = row[m]
            cells.append("-" if v is None else f"{100 * v[0]:.1f} +- {100 * v[1]:.1f} [{100 * (v[0] - v[2]):.1f}, {100 * (v[0] + v[2]):.1f}]")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("\nCells: mean +- std over seeds [95% t-interval], in %.")
    return "\n".join(lines) + "\n"


def select_group(records: list[dict], spec: str) -> list[dict]:
    """The runs of one group: ``regime``, or ``regime@key`` where key is an encoder or an aids string
    (``image_text@resnet18``, ``text_only@none``). A name that matches runs of several encoders or
    aid sets is refused: pooling them would mix different experiments in one test."""
    regime, _, key = spec.partition("@")
    runs = [r for r in records if r["regime"] == regime and (not key or key in (r["encoder"], r["aids"]))]
    groups = sorted({(r["encoder"], r["aids"]) for r in runs})
    if not runs:
        known = sorted({r["regime"] for r in records})
        raise LabError(f"--compare: no runs of {spec!r}; regimes found: {', '.join(known)}")
    if len(groups) > 1:
        by_encoder = len({encoder for encoder, _ in groups}) == len(groups)  # else the aids tell them apart
        names = ", ".join(f"{regime}@{encoder if by_encoder else aids}" for encoder, aids in groups)
        raise LabError(f"--compare: {spec!r} matches runs of several encoders or aid sets; name one of: {names}")
    return runs


def compare(records: list[dict], a: str, b: str) -> str:
    """Welch's t-test of group ``a`` against group ``b`` (see ``select_group``) on every metric both have."""
    runs_a, runs_b = select_group(records, a), select_group(records, b)
    lines = [f"\n**{a} vs {b}** (Welch's t-test over seeds)\n", "| metric | mean a - mean b | t | p | seeds a / b |", "|---|---|---|---|---|"]
    for m in METRICS:
        va = [r[m] for r in runs_a if r[m] is not None]
        vb = [r[m] for r in runs_b if r[m] is not None]
        if len(va) < 2 or len(vb) < 2:
            continue
        diff = f"{100 * (np.mean(va) - np.mean(vb)):+.1f}"
        if np.std(va) == 0 and np.std(vb) == 0:  # Welch's t is +-inf (or nan) here: no test to report
            lines.append(f"| {m} | {diff} | - | - (no spread over seeds) | {len(va)} / {len(vb)} |")
            continue
        t, p = stats.ttest_ind(va, vb, equal_var=False)
        lines.append(f"| {m} | {diff} | {t:.2f} | {p:.3g} | {len(va)} / {len(vb)} |")
    return "\n".join(lines) + "\n"


def per_count_figure(records: list[dict], path: Path, split: str = "ood") -> None:
    """Accuracy per number of objects (``split`` prompts), one line per group and modality."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (regime, encoder, aids), rs in group_runs(records).items():
        for modality in ("text", "image"):
            keys = sorted({k for r in rs for k in r["per_count"] if k.startswith(f"val_n/{modality}_{split}_n")})
            if not keys:
                continue
            counts = [int(k.rsplit("_n", 1)[1]) for k in keys]
            stats_ = [mean_ci([r["per_count"][k] for r in rs if k in r["per_count"]]) for k in keys]
            mean = np.array([s[0] for s in stats_])
            half = np.array([s[2] for s in stats_])
            label = f"{regime} ({modality}{'' if encoder == '-' else ', ' + encoder}, {len(rs)} seed{'s' if len(rs) != 1 else ''})"
            line = ax.plot(counts, mean, marker="o", label=label, linestyle="-" if modality == "text" else "--")[0]
            ax.fill_between(counts, mean - half, mean + half, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("number of objects")
    ax.set_ylabel(f"{split.upper()} accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def binding_record(run_dir: Path, split: str = "id", site: str = "final") -> dict | None:
    """The binding evaluators' headline figures for one run (None when they have not been run):
    first causal layer and its mechanism (interventions), the outcome rates there, the best probe
    accuracy above chance per target, and the (layer, group) knockouts that cost the most."""
    paths = {name: run_dir / "eval" / f"{name}.json" for name in ("interventions", "probes", "knockout")}
    if not all(p.is_file() for p in paths.values()):
        return None
    interventions = json.loads(paths["interventions"].read_text())["results"][split]
    summary = interventions["sites"][site]
    first = summary["first_causal_layer"]
    at_first = summary["layers"][first]["rates"] if first is not None else {}
    probes = json.loads(paths["probes"].read_text())["results"]["text"].get(split, {})
    knockout = json.loads(paths["knockout"].read_text())
    # only the reading-position knockout (queries=final) of this split goes in the table
    table = knockout["results"]["text"].get(split, {}).get("layers", {}) if knockout.get("queries") == "final" else {}
    drops = [(v["drop"], layer, group) for layer, groups in table.items() if layer != "all_layers"
             for group, v in groups.items()]
    return {
        "n_used": interventions["n_used"],
        "first_causal_layer": first,
        "mechanism": summary["mechanism_at_first_causal"],
        **{f"at_first_{h}": at_first.get(h) for h in ("positional", "symbolic", "answer_copy")},
        **{f"probe_{t}": max(v["accuracy"]) - v["chance"] for t, v in probes.items()},
        **{f"probe_{t}_layer": int(np.argmax(v["accuracy"])) for t, v in probes.items()},
        "knockouts": ", ".join(f"{group}@{layer} {drop:.2f}" for drop, layer, group in sorted(drops, reverse=True)
                               if drop >= 0.2) if table else "not run",
    }


def _probe(record: dict, target: str) -> str:
    if f"probe_{target}" not in record:
        return "not run"
    return f"{record[f'probe_{target}']:+.2f} ({record[f'probe_{target}_layer']})"


def binding_table(records: list[dict], split: str = "id", site: str = "final") -> str:
    """Markdown table of the binding evaluators per group of runs (one line per run)."""
    head = ["regime", "aids", "seed", "text ID", "pairs used", "first causal layer", "mechanism there",
            "positional / symbolic / copy there", "probe slot (layer)", "probe shape (layer)", "knockouts >= 0.2 (group@block drop)"]
    lines = [f"Interventions at the `{site}` site on {split.upper()} pairs; probes on {split.upper()} prompts "
             "(best held-out accuracy minus chance, and its layer).\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (regime, _, aids), rs in group_runs(records).items():
        for r in sorted(rs, key=lambda r: r["seed"]):
            b = binding_record(Path(r["run"]), split, site)
            if b is None:
                continue
            acc = r["val/text_id_acc"]
            rates = " / ".join("-" if b[f"at_first_{h}"] is None else f"{b[f'at_first_{h}']:.2f}"
                               for h in ("positional", "symbolic", "answer_copy"))
            lines.append("| " + " | ".join([
                regime, aids, str(r["seed"]), "-" if acc is None else f"{acc:.3f}", str(b["n_used"]),
                "none" if b["first_causal_layer"] is None else str(b["first_causal_layer"]), str(b["mechanism"] or "-"), rates,
                _probe(b, "slot"), _probe(b, "shape"),
                b["knockouts"] or "-"]) + " |")
    return "\n".join(lines) + "\n"


def density_profiles(conditions: list[str], path: Path, modality: str = "text") -> None:
    """Density-peak profiles (``eval/density_peaks.json``), one line per ``LABEL=RUN[:SPLIT]``."""
    from lab.eval.density_peaks import profile_figure

    lines = {}
    for condition in conditions:
        label, sep, target = condition.partition("=")
        run, _, split = target.partition(":")
        if not sep or not run:
            raise LabError(f"--density {condition!r}: write LABEL=RUN_DIR[:SPLIT]")
        source = Path(run) / "eval" / "density_peaks.json"
        if not source.is_file():
            raise LabError(f"{source} not found; run python evaluate.py run={run} evaluators=[density_peaks] first")
        results = json.loads(source.read_text())["results"].get(modality, {})
        split = split or next(iter(results), "")
        if split not in results:
            raise LabError(f"{source} has no {modality}/{split!r}; it has {sorted(results)}")
        lines[label] = results[split]
    figure = profile_figure(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")


def phase_rows(run_dir: Path) -> list[dict]:
    """One row per finished phase of a run (phases.json): where it ended and why, its validation
    there, and the binding at the first causal layer of that phase's checkpoint when
    ``evaluate.py checkpoint=phase<i>_<name>`` (or, for the last phase, the run's eval/) holds it."""
    path = run_dir / "phases.json"
    if not path.is_file():
        return []
    phases = json.loads(path.read_text())
    rows = []
    for i, phase in enumerate(phases):
        folder = "eval" if i == len(phases) - 1 else f"eval_phase{phase['phase']}_{phase['name']}"
        rows.append({**phase, "binding": {split: _symbolic_share(run_dir / folder, split) for split in ("id", "ood")}})
    return rows


def _symbolic_share(folder: Path, split: str) -> str:
    path = folder / "interventions.json"
    if not path.is_file():
        return "not run"
    site = json.loads(path.read_text())["results"][split]["sites"]["final"]
    first = site["first_causal_layer"]
    if first is None:
        return "none"
    rates, (low, high) = site["layers"][first]["rates"], site["layers"][first]["ci"]["symbolic"]
    return f"L{first} {rates['symbolic']:.2f} [{low:.2f}, {high:.2f}]"


def phase_table(records: list[dict]) -> str:
    """Markdown table, per run and phase: end step and reason, text/image ID and OOD at the phase's
    end, and the symbolic share at the first causal layer (ID / OOD pairs, Wilson 95% CI)."""
    head = ["regime", "seed", "phase", "steps", "ended", "text ID", "text OOD", "image ID", "image OOD",
            "symbolic at first causal layer, ID", "... OOD"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in sorted(records, key=lambda r: (r["regime"], r["seed"])):
        for p in phase_rows(Path(r["run"])):
            lines.append("| " + " | ".join([
                r["regime"], str(r["seed"]), p["name"], f"{p['start']}-{p['end']}", p["reason"],
                *(fmt(p.get(m)) for m in METRICS), p["binding"]["id"], p["binding"]["ood"]]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", help="run directories or folders holding them")
    parser.add_argument("--out", help="write the markdown table here (and a .csv of every run beside it)")
    parser.add_argument("--figure", help="write the OOD-accuracy-per-object-count plot here (PNG)")
    parser.add_argument("--compare", action="append", default=[], help="a:b, Welch's t-test of two groups: regime, or regime@encoder / regime@aids when a regime has several (repeatable)")
    parser.add_argument("--binding", action="store_true",
                        help="add the binding-mechanism table (runs evaluated with interventions, probes, knockout)")
    parser.add_argument("--phases", action="store_true",
                        help="add the per-phase table (phases.json, and interventions of each phase checkpoint)")
    parser.add_argument("--density", action="append", default=[], metavar="LABEL=RUN[:SPLIT]",
                        help="a line of the density-peak profile figure (repeatable; needs --density-figure)")
    parser.add_argument("--density-figure", help="write the density-peak profiles of the --density runs here (PNG)")
    args = parser.parse_args(argv)
    if args.density or args.density_figure:
        if not (args.density and args.density_figure):
            raise LabError("--density and --density-figure go together")
        density_profiles(args.density, Path(args.density_figure))
        if not args.paths:
            return
    if not args.paths:
        raise LabError("pass run directories (or folders holding them) to aggregate")
    records = [run_record(r) for r in find_runs(args.paths)]
    table = to_markdown(aggregate(records))
    for pair in args.compare:
        a, _, b = pair.partition(":")
        table += compare(records, a, b)
    if args.binding:
        table += "\n" + binding_table(records) + "\n" + binding_table(records, split="ood")
    if args.phases:
        table += "\n" + phase_table(records)
    if args.figure:
        per_count_figure(records, Path(args.figure))
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
        with out.with_suffix(".csv").open("w", newline="") as f:
            fields = [k for k in records[0] if k != "per_count"]
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(records)
