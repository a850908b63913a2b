"""Seconds per layer of the density_peaks statistics, by part: the lab against DADApy, side by side.

One "layer" is a point cloud of ``--points`` x ``--dim`` float64 (a Gaussian mixture of
``--components`` blobs with unequal spreads, like a residual stream at 10,000 prompts) with two
label sets: the mixture component and a binary grouping of the components (the binary set needs the
most neighbours for the overlap, 0.3 x 5,000 = 1,500). On the same data, one thread, best of
``--repeats`` runs per part:

- lab: duplicate removal, then :func:`lab.eval.density_peaks.landscape_statistics` (the shared
  neighbour search of :mod:`lab.eval.neighbours`, Gride ID, kNN density, ADP, ARI, overlap);
  "core" is the same without label sets (search, ID, density, ADP);
- DADApy (``benchmarks/dadapy_pipeline.py``, in DADApy's own environment, a subprocess):
  ``Data(maxk=100).compute_distances``, Gride at 16/32, ``compute_density_kNN(16)``,
  ``compute_clustering_ADP(Z=1.6, halo=True)``, then ``return_label_overlap(class_fraction=0.3)``
  per label set (DADApy searches again for each k beyond 100);
- previous (``--previous``): the lab's search before the shared one (chunked float64
  ``torch.cdist`` + ``topk`` of every neighbour the overlap needs), the reference the new search
  must equal.

The outputs must agree: same neighbour lists as the previous search, DADApy's number of peaks and
cluster labels, its overlaps, its Gride ID to 1e-4 (its likelihood has N - 1 where ours has N).

    OMP_NUM_THREADS=1 python benchmarks/density_peaks.py --previous
    OMP_NUM_THREADS=1 python benchmarks/density_peaks.py --points 2000 --json out.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lab.eval.density_peaks import (  # noqa: E402
    ADP_NEIGHBOURS,
    advanced_density_peaks,
    gride_id,
    knn_log_density,
    landscape_statistics,
    nearest_neighbours,
    overlap_sizes,
    remove_duplicates,
)

DADAPY_PYTHON = os.environ.get("DADAPY_PYTHON", "/tmp/dadapy-env/bin/python")


def mixture(points: int, dim: int, components: int, seed: int = 0):
    """Points of a Gaussian mixture (unequal spreads, well separated) and their label sets."""
    rng = np.random.default_rng(seed)
    component = rng.integers(0, components, points)
    centres = rng.normal(size=(components, dim))
    spreads = rng.uniform(0.15, 0.45, components)
    X = centres[component] + rng.normal(size=(points, dim)) * spreads[component, None]
    return X, {"component": component, "half": (component < components // 2).astype(np.int64)}


def previous_search(X, k: int, chunk_size: int = 1024):
    """The lab's neighbour search before :mod:`lab.eval.neighbours`: chunked float64 cdist + topk."""
    X = torch.as_tensor(np.asarray(X), dtype=torch.float64)
    X = X - X.mean(0)
    n = X.shape[0]
    distances, indices = torch.empty(n, k, dtype=torch.float64), torch.empty(n, k, dtype=torch.long)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        block = torch.cdist(X[start:stop], X)
        block[torch.arange(stop - start), torch.arange(start, stop)] = math.inf
        distances[start:stop], indices[start:stop] = block.topk(k, dim=1, largest=False, sorted=True)
    return distances.numpy(), indices.numpy()


def best_of(repeats: int, fn):
    """(result of the last run, best wall seconds, best CPU seconds, best timings by part)."""
    walls, cpus, parts = [], [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        (unique, keep), stats = fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - start_cpu)
        parts.append(stats["timings"])
    return (unique, keep, stats), min(walls), min(cpus), {p: min(t[p] for t in parts) for p in parts[0]}


def lab_run(X, labels):
    """The evaluator's work on one layer: duplicate removal, then every statistic."""
    def run():
        start = time.perf_counter()
        unique, keep = remove_duplicates(X)
        duplicates = time.perf_counter() - start
        stats = landscape_statistics(unique, {n: v[keep] for n, v in labels.items()})
        stats["timings"] = {"duplicates": duplicates, **stats["timings"]}
        return (unique, keep), stats
    return run


def lab_clusters(X) -> np.ndarray:
    """The lab's ADP labels (halo on) of distinct points ``X``, as the evaluator finds them."""
    distances, indices = nearest_neighbours(X, ADP_NEIGHBOURS)
    log_density, errors = knn_log_density(distances, 16, gride_id(distances, 16, 32)[0])
    return advanced_density_peaks(log_density, errors, indices, 16, 1.6, True).labels


def dadapy_run(X, labels, repeats: int) -> dict | None:
    """DADApy's timings and outputs from its own environment, or None without one."""
    if not Path(DADAPY_PYTHON).exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        np.save(f"{tmp}/X.npy", X)
        np.savez(f"{tmp}/labels.npz", **labels)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        subprocess.run([DADAPY_PYTHON, str(ROOT / "benchmarks" / "dadapy_pipeline.py"), f"{tmp}/X.npy",
                        f"{tmp}/labels.npz", f"{tmp}/out.json", str(repeats)], check=True, env=env)
        return json.loads(Path(f"{tmp}/out.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=10000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--components", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--previous", action="store_true", help="also time the previous search and compare")
    parser.add_argument("--json", help="write the measurements to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    X, labels = mixture(args.points, args.dim, args.components, args.seed)
    landscape_statistics(X[:300], {n: v[:300] for n, v in labels.items()})  # warm-up: imports, allocator

    (unique, keep, stats), wall, cpu, parts = best_of(args.repeats, lab_run(X, labels))
    _, core_wall, core_cpu, core_parts = best_of(args.repeats, lab_run(X, {}))
    report = {"points": args.points, "dim": args.dim, "components": args.components, "repeats": args.repeats,
              "torch_threads": torch.get_num_threads(), "lab": {"wall_s": wall, "cpu_s": cpu, "parts_s": parts},
              "lab_core": {"wall_s": core_wall, "cpu_s": core_cpu, "parts_s": core_parts},
              "statistics": {k: stats[k] for k in ("n_points", "intrinsic_dim", "n_peaks", "core_fraction",
                                                   "ari", "overlap", "overlap_chance")}}
    print(f"density_peaks statistics of one layer: {args.points} points x {args.dim} dims, float64, "
          f"{args.components}-component Gaussian mixture, one thread, best of {args.repeats}")
    print(f"  lab, all parts       : {wall:7.3f} s wall ({cpu:.3f} s CPU)")
    for part, seconds in parts.items():
        print(f"    {part:18s} : {seconds:7.3f} s")
    print(f"  lab, core (no labels): {core_wall:7.3f} s wall ({core_cpu:.3f} s CPU), neighbours "
          f"{core_parts['neighbours']:.3f} s")
    print(f"  result: ID {stats['intrinsic_dim']:.4f}, {stats['n_peaks']} peaks, core {stats['core_fraction']:.3f}, "
          f"overlap {', '.join(f'{n} {v:.4f}' for n, v in stats['overlap'].items())}")
    if args.previous:
        kept = {n: v[keep] for n, v in labels.items()}
        K = max(ADP_NEIGHBOURS, *(int(overlap_sizes(v, 0.3).max()) for v in kept.values()))
        start = time.process_time()
        _, old = previous_search(unique, K)
        report["previous_neighbours_cpu_s"] = time.process_time() - start
        _, new = nearest_neighbours(unique, ADP_NEIGHBOURS)
        report["same_neighbours_as_previous"] = bool(np.array_equal(new, old[:, :ADP_NEIGHBOURS]))
        print(f"  previous search (K={K}): {report['previous_neighbours_cpu_s']:.3f} s CPU; same neighbour lists: "
              f"{report['same_neighbours_as_previous']}")
    dadapy = dadapy_run(X, labels, args.repeats)
    if dadapy is None:
        print(f"  DADApy               : no environment at {DADAPY_PYTHON} (set DADAPY_PYTHON), skipped")
    else:
        d_core = sum(dadapy["seconds"][p] for p in ("duplicates", "neighbours", "intrinsic_dim", "density", "clustering"))
        d_all = sum(dadapy["seconds"].values())
        d_core_cpu = sum(dadapy["cpu"][p] for p in ("duplicates", "neighbours", "intrinsic_dim", "density", "clustering"))
        d_all_cpu = sum(dadapy["cpu"].values())
        lab_core = sum(core_parts.values())
        lab_all = sum(parts[p] for p in parts if p != "ari")  # DADApy has no ARI
        agree = {"n_peaks": dadapy["n_peaks"] == stats["n_peaks"],
                 "same_cluster_labels": bool(np.array_equal(dadapy["labels"], lab_clusters(unique))),
                 "intrinsic_dim_rel": abs(dadapy["intrinsic_dim"] - stats["intrinsic_dim"]) / dadapy["intrinsic_dim"],
                 "overlap_max_abs": max(abs(dadapy["overlap"][n] - stats["overlap"][n]) for n in labels)}
        report["dadapy"] = {**dadapy, "labels": None, "core_s": d_core, "all_s": d_all, "core_cpu_s": d_core_cpu,
                            "all_cpu_s": d_all_cpu, "agreement": agree,
                            "speedup_core": d_core / lab_core, "speedup_all": d_all / lab_all}
        print(f"  DADApy {dadapy['version']}         : core {d_core:.3f} s wall ({d_core_cpu:.3f} CPU), neighbours "
              f"{dadapy['seconds']['neighbours']:.3f} s; with the overlaps {d_all:.3f} s ({d_all_cpu:.3f} CPU)")
        report["dadapy"].update(speedup_core_cpu=d_core_cpu / core_cpu, speedup_all_cpu=d_all_cpu / cpu)
        print(f"  lab faster by        : {d_core / lab_core:.2f}x core, {d_all / lab_all:.2f}x with the overlaps "
              f"(sums of the best part timings; CPU time: {d_core_cpu / core_cpu:.2f}x, {d_all_cpu / cpu:.2f}x); "
              f"neighbour search alone {dadapy['seconds']['neighbours'] / core_parts['neighbours']:.2f}x")
        print(f"  agreement            : same peaks {agree['n_peaks']}, same cluster labels "
              f"{agree['same_cluster_labels']}, ID rel. diff {agree['intrinsic_dim_rel']:.1e}, "
              f"overlap max diff {agree['overlap_max_abs']:.1e}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=float))


if __name__ == "__main__":
    main()
