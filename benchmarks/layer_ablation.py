"""Prefix caching vs naive full forwards for single-block ablation, on a 12-layer model.

A layer-relevance scan needs the full model's answer logits plus the logits with each block
removed. Naively that is 1 + L full forwards (each ablation recomputes blocks 0..l-1).
With prefix caching (``lab.eval.relevance.Ablator``) the full forward captures every h_l once
and the ablation of block l starts from the cached h_l, so it runs only blocks l+1..L-1:
about L + L(L-1)/2 block evaluations instead of L + L(L-1), i.e. ~1.85x fewer for L = 12.
Both paths are run in the same process, on the same batches; logits must agree to float
tolerance, and the speedup is printed.

    OMP_NUM_THREADS=1 python benchmarks/layer_ablation.py                 # random 12-layer paper model
    OMP_NUM_THREADS=1 python benchmarks/layer_ablation.py --run checkpoints/retrieval/<run>
    python benchmarks/layer_ablation.py --pruning   # also time a greedy iterative pruning pass
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab.data.datamodule import TextDataModule  # noqa: E402
from lab.eval.relevance import Ablator  # noqa: E402
from lab.models.backbone import Backbone  # noqa: E402
from tasks.retrieval import RetrievalTask  # noqa: E402


@torch.no_grad()
def naive_scan(model, batches):
    """Full forward + one full forward per removed block (blocks 0..l-1 recomputed each time)."""
    out = {"full": [model.answer_logits(b) for b in batches]}
    for l in range(model.n_layers):
        out[l] = [model.answer_logits(b, skip=[l]) for b in batches]
    return out


@torch.no_grad()
def cached_scan(model, batches):
    """One full forward capturing every h_l; the ablation of block l starts from h_l."""
    ablator = Ablator(model, "skip")
    state = ablator.prune(batches)
    out = {"full": state.logits}
    for l in range(model.n_layers):
        logits = []
        for i, batch in enumerate(batches):
            stream = state.streams[i].with_h(state.states[i][l])
            logits.append(model.run(stream=stream, start=l, skip=[l], positions=batch["answer_pos"]).logits)
        out[l] = logits
    return out


@torch.no_grad()
def naive_pruning(model, batches, steps):
    removed = []
    for _ in range(steps):
        scores = {}
        for l in (x for x in range(model.n_layers) if x not in removed):
            scores[l] = sum(float((model.answer_logits(b, skip=removed + [l]).argmax(-1) == b["targets"]).sum())
                            for b in batches)
        removed.append(max(scores, key=lambda l: (scores[l], -l)))
    return removed


@torch.no_grad()
def cached_pruning(model, batches, steps):
    ablator = Ablator(model, "skip")
    removed, state = [], None
    for _ in range(steps):
        state = ablator.prune(batches, removed, reuse=state)  # shares h_0..h_b with the previous step
        cands = ablator.candidates(state, batches)
        best = max(cands, key=lambda l: (float(cands[l].correct.sum()), -l))
        removed.append(best)
    return removed


def timed(fn, repeats):
    """(result, wall-clock seconds, process CPU seconds). On a shared machine the CPU time of this
    process is the robust measure of work; wall time also counts other users' load."""
    times, cpu, result = [], [], None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            result = fn()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return result, times, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a run directory (default: a randomly initialised 12-layer paper model)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--split", default="ood")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pruning", action="store_true", help="also time greedy iterative pruning (3 steps)")
    parser.add_argument("--json", help="write the measurements to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.run:
        from lab.build import load_trained

        _, task, model, _ = load_trained(args.run)
    else:
        task = RetrievalTask(eval_size=args.samples)
        model = Backbone(len(task.vocab), n_layers=args.layers).eval()
    task.eval_size = args.samples
    batches = list(TextDataModule(task, eval_batch_size=args.batch_size).eval_batches(args.split))
    cached_scan(model, batches[:1]), naive_scan(model, batches[:1])  # warm-up

    naive_times, cached_times, naive_cpu, cached_cpu = [], [], [], []
    for _ in range(args.repeats):  # interleaved, so load changes hit both paths alike
        naive, t, c = timed(lambda: naive_scan(model, batches), 1)
        naive_times += t
        naive_cpu += c
        cached, t, c = timed(lambda: cached_scan(model, batches), 1)
        cached_times += t
        cached_cpu += c
    diff = max(float((a - b).abs().max()) for k in naive for a, b in zip(naive[k], cached[k]))
    scale = max(float(a.abs().max()) for k in naive for a in naive[k])
    naive_t, cached_t = statistics.median(naive_times), statistics.median(cached_times)
    report = {
        "model": args.run or f"random Backbone, {model.n_layers} layers",
        "n_layers": model.n_layers, "samples": sum(len(b["targets"]) for b in batches), "split": args.split,
        "torch_threads": torch.get_num_threads(),
        "naive_s_median": naive_t, "cached_s_median": cached_t, "speedup": naive_t / cached_t,
        "naive_s": naive_times, "cached_s": cached_times, "naive_cpu_s": naive_cpu, "cached_cpu_s": cached_cpu,
        "speedup_cpu_time": statistics.median(naive_cpu) / statistics.median(cached_cpu),
        "max_abs_logit_diff": diff, "max_abs_logit": scale, "identical_within_tolerance": diff <= 1e-4 * max(scale, 1.0),
    }
    print(f"single-block ablation scan, {model.n_layers} layers, {report['samples']} samples ({args.split}):")
    print(f"  naive full forwards : {naive_t:.3f} s (median of {args.repeats})")
    print(f"  prefix-cached       : {cached_t:.3f} s")
    print(f"  speedup             : {naive_t / cached_t:.2f}x wall-clock, "
          f"{report['speedup_cpu_time']:.2f}x process CPU time "
          f"(naive {statistics.median(naive_cpu):.3f} s, cached {statistics.median(cached_cpu):.3f} s)")
    print(f"  max |logit diff|    : {diff:.2e} (max |logit| {scale:.2f})")
    if args.pruning:
        steps = 3
        (naive_removed, t_naive, c_naive), (cached_removed, t_cached, c_cached) = (
            timed(lambda: naive_pruning(model, batches, steps), 1), timed(lambda: cached_pruning(model, batches, steps), 1)
        )
        report["pruning"] = {"steps": steps, "naive_s": t_naive[0], "cached_s": t_cached[0],
                             "naive_cpu_s": c_naive[0], "cached_cpu_s": c_cached[0],
                             "speedup": t_naive[0] / t_cached[0], "speedup_cpu_time": c_naive[0] / c_cached[0],
                             "same_order": naive_removed == cached_removed, "order": cached_removed}
        print(f"greedy iterative pruning ({steps} steps): naive {t_naive[0]:.3f} s, cached {t_cached[0]:.3f} s, "
              f"speedup {t_naive[0] / t_cached[0]:.2f}x wall-clock, {c_naive[0] / c_cached[0]:.2f}x CPU time, "
              f"same removal order: {naive_removed == cached_removed}")
    if not report["identical_within_tolerance"]:
        print("ERROR: cached and naive logits differ", file=sys.stderr)
        sys.exit(1)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
