"""Aggregate finished runs into a results table: mean +- std over seeds per regime and encoder.

``python aggregate.py checkpoints/retrieval/<sweep> [more dirs] --out docs/tables/regimes.md``
finds every run directory (a folder with config.yaml and metrics.json) below the given paths.
"""
from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

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
    uses_images = any(
        "image" in str(node.get("_target_", "")).lower()
        for node in [cfg.modality, *(cfg.regime.get("data") or {}).values()]
    )
    return {
        "run": str(run_dir),
        "regime": str(cfg.regime.get("name", "?")),
        "encoder": str(cfg.encoder.name) if uses_images and "encoder" in cfg else "-",
        "seed": int(cfg.seed),
        "steps": int(metrics["step"]),
        **{m: metrics.get(m) for m in METRICS},
    }


def aggregate(records: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["regime"], r["encoder"])].append(r)
    rows = []
    for (regime, encoder), rs in sorted(groups.items()):
        row = {"regime": regime, "encoder": encoder, "seeds": len(rs), "steps": float(np.mean([r["steps"] for r in rs]))}
        for m in METRICS:
            values = [r[m] for r in rs if r[m] is not None]
            row[m] = (float(np.mean(values)), float(np.std(values)), len(values)) if values else None
        rows.append(row)
    return rows


def to_markdown(rows: list[dict]) -> str:
    head = ["regime", "encoder", "seeds", "steps", "text ID", "text OOD", "image ID", "image OOD"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["regime"], row["encoder"], str(row["seeds"]), f"{row['steps']:.0f}"]
        for m in METRICS:
            v = row[m]
            cells.append("-" if v is None else f"{100 * v[0]:.1f} +- {100 * v[1]:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run directories or folders holding them")
    parser.add_argument("--out", help="write the markdown table here (and a .csv of every run beside it)")
    args = parser.parse_args(argv)
    records = [run_record(r) for r in find_runs(args.paths)]
    table = to_markdown(aggregate(records))
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
        with out.with_suffix(".csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
