"""Paper scale on a GPU: ``model=paper`` (12 blocks, width 128) trained with the plain recipe and
with ``recipe=free_binding`` side by side, sized to a 10-minute window, curves written under docs/.

    python benchmarks/gpu_paper_scale.py                       # on a machine with one GPU
    python benchmarks/gpu_paper_scale.py --minutes 4 --steps 6000 --trainer cpu --dry   # print the commands

Each arm is a real ``python train.py model=paper trainer=gpu <recipe> ...`` (its own run directory
under ``--root``), stopped by a wall-clock limit (``+trainer.max_time``) of ``--minutes`` each; the
two run one after the other so each has the GPU to itself. From each run's ``metrics.jsonl`` and
``times.jsonl`` it writes ``<out>.md`` (steps, minutes and OOD at the first ID >= 0.9 / 0.99, last
validation) and ``<out>.png`` (ID and OOD accuracy against step, both arms).
The paper's batch and learning rate are kept (batch 64, AdamW lr 1e-3 here as on the CPU, so the
GPU curve is comparable step for step with the CPU runs in docs/learning.md).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from time_to_solve import first_crossing, read_jsonl  # noqa: E402

ARMS = {"plain": ["recipe=plain"], "free_binding": ["recipe=free_binding", "recipe.measured_on=null"]}  # free_binding is measured on model=tiny only: this is the measurement


def summarise(runs: dict[str, Path], out: Path) -> None:
    lines = ["| arm | last step | last ID | last OOD | step ID>=0.9 | min to 0.9 | step ID>=0.99 | min to 0.99 | OOD at 0.99 |",
             "|---|---|---|---|---|---|---|---|---|"]
    curves = {}
    for arm, run_dir in runs.items():
        metrics = read_jsonl(run_dir / "metrics.jsonl")
        times = {t["step"]: t for t in read_jsonl(run_dir / "times.jsonl")}
        curves[arm] = metrics
        last = metrics[-1] if metrics else {}
        cells = [arm, last.get("step", "-"), last.get("val/text_id_acc", "-"), last.get("val/text_ood_acc", "-")]
        for threshold in (0.9, 0.99):
            hit = first_crossing(metrics, times, "val/text_id_acc", "val/text_ood_acc", threshold)
            cells += [hit["step"] or "-", "-" if hit["wall_s"] is None else f"{hit['wall_s'] / 60:.1f}"]
        cells.append("-" if hit["ood"] is None else hit["ood"])
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for arm, metrics in curves.items():
        steps = [m["step"] for m in metrics]
        ax.plot(steps, [m.get("val/text_id_acc") for m in metrics], label=f"{arm} ID")
        ax.plot(steps, [m.get("val/text_ood_acc") for m in metrics], ls="--", label=f"{arm} OOD")
    ax.set(xlabel="step", ylabel="accuracy", ylim=(0, 1), title="model=paper on a GPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=4.5, help="wall-clock limit of each arm")
    parser.add_argument("--steps", type=int, default=20000, help="step cap of each arm (train.max_steps)")
    parser.add_argument("--every", type=int, default=100, help="validate every this many steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trainer", default="gpu")
    parser.add_argument("--arms", default="plain,free_binding")
    parser.add_argument("--root", default=str(ROOT / "checkpoints" / "gpu_paper_scale"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "tables" / "gpu_paper_scale"))
    parser.add_argument("--dry", action="store_true", help="print the commands only")
    args = parser.parse_args()
    runs = {}
    for arm in args.arms.split(","):
        if arm not in ARMS:
            raise SystemExit(f"error: unknown arm {arm!r}; choose from {sorted(ARMS)}")
        run_dir = Path(args.root) / f"{arm}_s{args.seed}"
        seconds = int(args.minutes * 60)
        command = [sys.executable, str(ROOT / "train.py"), "model=paper", f"trainer={args.trainer}", *ARMS[arm],
                   f"seed={args.seed}", f"train.max_steps={args.steps}", f"train.val_every={args.every}",
                   f"+trainer.max_time=00:00:{seconds // 60:02d}:{seconds % 60:02d}",
                   "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}", f"run_name={arm}"]
        print(" ".join(command), flush=True)
        runs[arm] = run_dir
        if args.dry:
            continue
        started = time.time()
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(run_dir.parent / f"{arm}_s{args.seed}.log", "w") as log:
            code = subprocess.call(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        print(f"{arm}: exit {code} after {time.time() - started:.0f} s", flush=True)
    if not args.dry:
        summarise(runs, Path(args.out))


if __name__ == "__main__":
    main()
