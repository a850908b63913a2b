"""Time to solve: how many steps, wall seconds and CPU seconds each training recipe needs before
ID accuracy on the evaluation set first reaches 0.9 and 0.99.

    OMP_NUM_THREADS=1 python benchmarks/time_to_solve.py --recipes plain,shift_mid --seeds 0,1,2 --jobs 2

Every run is a real ``python train.py`` through the lab's own training path (its own run directory
under ``--root``), with the recipe's overrides, ``seed=<s>``, ``train.max_steps=<cap>`` and
``train.val_every=<every>``. The figures come from the run's ``metrics.jsonl`` (accuracy per
validation) and ``times.jsonl`` (wall and process CPU seconds spent in ``fit`` up to each
validation, validation included; interpreter start-up and imports are not counted, they are the
same for every recipe). A run that never reaches a threshold within the cap is marked as such.

Rows are appended to ``<out>.csv`` (one per recipe x seed; a rerun of the same recipe, seed and
cap replaces its row) and ``<out>.md`` is rewritten from the whole CSV: one line per run, then one
summary line per recipe (seeds solved, median steps and minutes to 0.99, OOD at solve).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lab.results import intermediate_settings  # noqa: E402

# Named recipes: the paper's plain recipe (conf/recipe/plain.yaml) plus training aids.
# "default" measures whatever conf/ makes the default (conf/recipe/fast.yaml = shift_mid_dense4_anneal).
_SHIFT, _MID = "model.token_shift=true", "objective.intermediate.weight=1"
_TORCH, _ASSOC = "model.init=torch", "model.token_shift=associations"
RECIPES: dict[str, list[str]] = {
    "default": [],
    "plain": ["recipe=plain"],
    "shift": ["recipe=plain", _SHIFT],
    "mid": ["recipe=plain", _MID],
    "dense4": ["recipe=plain", "task.train_queries=4"],
    "shift_mid": ["recipe=plain", _SHIFT, _MID],
    "shift_dense4": ["recipe=plain", _SHIFT, "task.train_queries=4"],
    "mid_dense4": ["recipe=plain", _MID, "task.train_queries=4"],
    "shift_mid_dense4": ["recipe=plain", _SHIFT, _MID, "task.train_queries=4"],
    "shift_mid_dense8": ["recipe=plain", _SHIFT, _MID, "task.train_queries=8"],
    "shift_mid_dense4_lr2e-3": ["recipe=plain", _SHIFT, _MID, "task.train_queries=4", "train.lr=2e-3"],
    "shift_mid_dense4_layer1": ["recipe=plain", _SHIFT, _MID, "task.train_queries=4", "objective.intermediate.layer=1"],
    "shift_mid_dense4_anneal": ["recipe=plain", _SHIFT, _MID, "task.train_queries=4", "objective.intermediate.anneal=[300,600]"],
    # Binding left to the model (docs/learning.md, "Binding left to the model"): no shift on the
    # context. ti_ = model.init=torch, assoc = model.token_shift=associations.
    "default_ti": [_TORCH],
    "default_scaled": ["model.init=scaled"],
    "ti_plain4": ["recipe=plain", _TORCH, "task.train_queries=4"],
    "ti_mid4": ["recipe=plain", _TORCH, _MID, "task.train_queries=4"],
    "ti_assoc4": ["recipe=plain", _TORCH, _ASSOC, "task.train_queries=4"],
    "ti_assoc_mid4": ["recipe=plain", _TORCH, _ASSOC, _MID, "task.train_queries=4"],
    "ti_assoc_mid4_anneal": ["recipe=plain", _TORCH, _ASSOC, _MID, "task.train_queries=4",
                             "objective.intermediate.anneal=[1000,1500]"],
    "sc_assoc_mid4": ["recipe=plain", "model.init=scaled", _ASSOC, _MID, "task.train_queries=4"],
    "free_binding": ["recipe=free_binding"],  # = sc_assoc_mid4 (ti_assoc_mid4 before the init study)
    "positional_control": ["recipe=positional_control"],
    "onehop_ti": ["task=one_hop", "recipe=plain", _TORCH],
    "onehop_scaled": ["task=one_hop", "recipe=plain", "model.init=scaled"],
}
FIELDS = ["recipe", "seed", "cap", "overrides", "solved_0.99", "step_0.99", "wall_s_0.99", "cpu_s_0.99",
          "ood_0.99", "step_0.9", "wall_s_0.9", "cpu_s_0.9", "ood_0.9", "final_step", "final_id", "final_ood"]


def parse_recipe(spec: str) -> tuple[str, list[str]]:
    """``name`` from RECIPES, or ``name:override1,override2`` for an ad-hoc recipe."""
    name, _, extra = spec.partition(":")
    if extra:
        return name, extra.split("+")
    if name not in RECIPES:
        raise SystemExit(f"error: unknown recipe {name!r}; known: {sorted(RECIPES)} (or name:key=value+key=value)")
    return name, RECIPES[name]


def first_crossing(metrics: list[dict], times: dict[int, dict], metric: str, ood: str, threshold: float,
                   from_step: int = 0) -> dict:
    """Step, wall, CPU and OOD accuracy of the first validation at or after ``from_step`` with
    ``metric >= threshold``."""
    for record in metrics:
        if record["step"] >= from_step and record.get(metric, 0.0) >= threshold:
            t = times.get(record["step"], {})
            return {"step": record["step"], "wall_s": t.get("wall_s"), "cpu_s": t.get("cpu_s"), "ood": record.get(ood)}
    return {"step": None, "wall_s": None, "cpu_s": None, "ood": None}


def aid_off_step(run_dir: Path) -> int:
    """First step at which an annealed intermediate supervision is fully off (0 when not annealed):
    accuracy reached while the aid still acts does not count as solving the task."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        return 0
    node = intermediate_settings(yaml.safe_load(config.read_text()))
    return int(node["anneal"][1]) if node.get("weight") and node.get("anneal") else 0


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def run_one(name: str, overrides: list[str], seed: int, args) -> dict:
    run_name = f"{name}_s{seed}_cap{args.cap}"
    run_dir = Path(args.root) / run_name
    started, code = time.time(), 0
    if not args.collect:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        command = [sys.executable, str(ROOT / "train.py"), *overrides, f"seed={seed}", f"train.max_steps={args.cap}",
                   f"train.val_every={args.every}", f"hydra.run.dir={run_dir}", f"run_name={run_name}", *args.extra]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        with open(Path(args.root) / f"{run_name}.log", "w") as log:
            code = subprocess.call(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    times = {t["step"]: t for t in read_jsonl(run_dir / "times.jsonl")}
    if code != 0 or not metrics:
        print(f"{run_name}: train.py exited {code}; see {Path(args.root) / (run_name + '.log')}", flush=True)
    modality = args.modality
    metric, ood = f"val/{modality}_id_acc", f"val/{modality}_ood_acc"
    row = {"recipe": name, "seed": seed, "cap": args.cap, "overrides": " ".join(overrides)}
    for threshold in (0.99, 0.9):
        hit = first_crossing(metrics, times, metric, ood, threshold, aid_off_step(run_dir))
        for key, value in hit.items():
            row[f"{key}_{threshold}"] = value
    row["solved_0.99"] = row["step_0.99"] is not None
    last = metrics[-1] if metrics else {}
    row.update(final_step=last.get("step"), final_id=last.get(metric), final_ood=last.get(ood))
    print(f"{run_name}: {json.dumps({k: row[k] for k in ('step_0.9', 'step_0.99', 'wall_s_0.99', 'ood_0.99', 'final_id')})}"
          f" ({time.time() - started:.0f} s)", flush=True)
    return row


def load_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def _num(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _fmt(value, digits=2):
    v = _num(value)
    return "-" if v is None else (f"{v:.0f}" if float(v).is_integer() and digits == 0 else f"{v:.{digits}f}")


def write_markdown(rows: list[dict], path: Path) -> None:
    lines = ["| recipe | seed | cap | last step | step 0.9 | step 0.99 | wall s 0.99 | CPU s 0.99 | OOD at 0.99 | final ID | final OOD |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['seed']} | {r['cap']} | {_fmt(r['final_step'], 0)} | {_fmt(r['step_0.9'], 0)} | {_fmt(r['step_0.99'], 0)} | "
                     f"{_fmt(r['wall_s_0.99'], 0)} | {_fmt(r['cpu_s_0.99'], 0)} | {_fmt(r['ood_0.99'])} | "
                     f"{_fmt(r['final_id'])} | {_fmt(r['final_ood'])} |")
    lines += ["", "| recipe | seeds solved (0.99) | median steps to 0.99 | median minutes to 0.99 | median CPU minutes to 0.99 | OOD at solve (median) | overrides |",
              "|---|---|---|---|---|---|---|"]
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        group = [r for r in rows if r["recipe"] == recipe]
        solved = [r for r in group if _num(r["step_0.99"]) is not None]
        med = lambda key: statistics.median(_num(r[key]) for r in solved) if solved else None  # noqa: E731
        minutes, cpu = med("wall_s_0.99"), med("cpu_s_0.99")
        lines.append(f"| {recipe} | {len(solved)}/{len(group)} | {_fmt(med('step_0.99'), 0)} | "
                     f"{'-' if minutes is None else f'{minutes / 60:.1f}'} | {'-' if cpu is None else f'{cpu / 60:.1f}'} | "
                     f"{_fmt(med('ood_0.99'))} | `{group[0]['overrides']}` |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="default", help=f"comma-separated names from {sorted(RECIPES)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--cap", type=int, default=3000, help="step cap (train.max_steps)")
    parser.add_argument("--every", type=int, default=50, help="validate every this many steps (train.val_every)")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each by default)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--modality", default="text", help="which validation metric decides: val/<modality>_id_acc")
    parser.add_argument("--root", default=str(ROOT / "checkpoints" / "time_to_solve"), help="where the runs go")
    parser.add_argument("--out", default=str(ROOT / "docs" / "tables" / "time_to_solve"), help="table path without suffix")
    parser.add_argument("extra", nargs="*", help="further overrides for every run (e.g. model=paper)")
    parser.add_argument("--collect", action="store_true",
                        help="train nothing: read the runs already under --root (e.g. finished after an interruption)")
    parser.add_argument("--merge", nargs="*", default=None, help="only merge these CSVs (of earlier invocations) into --out")
    args = parser.parse_args()
    if args.merge is not None:
        rows = [r for path in args.merge for r in load_rows(Path(path))]
        return write_tables(rows, Path(args.out))
    recipes = [parse_recipe(spec) for spec in args.recipes.split(",") if spec]
    seeds = [int(s) for s in args.seeds.split(",")]
    Path(args.root).mkdir(parents=True, exist_ok=True)
    jobs = [(name, overrides, seed) for name, overrides in recipes for seed in seeds]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        new = list(pool.map(lambda job: run_one(*job, args), jobs))

    replaced = {(r["recipe"], str(r["seed"]), str(r["cap"])) for r in new}
    rows = [r for r in load_rows(Path(args.out).with_suffix(".csv")) if (r["recipe"], r["seed"], r["cap"]) not in replaced]
    write_tables(rows + new, Path(args.out))


def write_tables(rows: list[dict], out: Path) -> None:
    """``out``.csv with every row and ``out``.md (per run, then per recipe)."""
    rows = [{k: ("" if v is None else v) for k, v in r.items()} for r in rows]
    csv_path, md_path = out.with_suffix(".csv"), out.with_suffix(".md")
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    write_markdown(rows, md_path)
    print(md_path.read_text())


if __name__ == "__main__":
    main()
