"""Seconds per layer of the density_peaks statistics, by part, against a plain baseline.

One "layer" is a point cloud of ``--points`` x ``--dim`` float64 (a Gaussian mixture of
``--components`` blobs with unequal spreads, like a residual stream at 10,000 prompts) with two
label sets: the mixture component and a binary grouping of the components (the binary set needs the
most neighbours for the overlap, 0.3 x 5,000 = 1,500). Timed, in the same process and on the same
data:

- ours: :func:`lab.eval.density_peaks.landscape_statistics` (exact kNN with chunked torch.cdist +
  topk, Gride ID, kNN density, ADP, ARI, overlap), plus the duplicate removal the evaluator does first;
- baseline: the same statistics with the neighbour search done the plain way, a full N x N numpy
  distance matrix (scipy cdist) and a full argsort of every row. The neighbour lists must agree;
- DADApy (optional, only if ``import dadapy`` works): ``Data`` with maxk = 100, Gride at 16/32,
  ``compute_density_kNN(16)``, ``compute_clustering_ADP(Z=1.6, halo=True)`` and
  ``return_label_overlap(class_fraction=0.3)``.

    OMP_NUM_THREADS=1 python benchmarks/density_peaks.py
    OMP_NUM_THREADS=1 python benchmarks/density_peaks.py --points 2000 --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab.eval.density_peaks import ADP_NEIGHBOURS, landscape_statistics, nearest_neighbours, remove_duplicates  # noqa: E402


def mixture(points: int, dim: int, components: int, seed: int = 0):
    """Points of a Gaussian mixture (unequal spreads, well separated) and their label sets."""
    rng = np.random.default_rng(seed)
    component = rng.integers(0, components, points)
    centres = rng.normal(size=(components, dim))
    spreads = rng.uniform(0.15, 0.45, components)
    X = centres[component] + rng.normal(size=(points, dim)) * spreads[component, None]
    return X, {"component": component, "half": (component < components // 2).astype(np.int64)}


def naive_neighbours(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The plain kNN: the full distance matrix and a full sort of every row."""
    from scipy.spatial.distance import cdist

    full = cdist(X, X)
    np.fill_diagonal(full, np.inf)
    indices = np.argsort(full, axis=1)[:, :k]
    return np.take_along_axis(full, indices, 1), indices


def baseline_statistics(X, labels) -> tuple[dict, np.ndarray]:
    """:func:`landscape_statistics` with the naive neighbour search, and the neighbour lists it found."""
    found = {}

    def search(points, k):
        found["distances"], found["neighbours"] = naive_neighbours(points, k)
        return found["distances"], found["neighbours"]

    return landscape_statistics(X, labels, neighbour_search=search), found["neighbours"]


def dadapy_statistics(X, labels) -> dict | None:
    """The same statistics with DADApy, or None when it is not installed."""
    try:
        from dadapy import Data
    except Exception:  # noqa: BLE001 - not installed, or built for another numpy
        return None
    start = time.perf_counter()
    data = Data(coordinates=X, maxk=ADP_NEIGHBOURS, verbose=False, n_jobs=1)
    data.compute_distances(maxk=ADP_NEIGHBOURS)
    ids, _, _ = data.return_id_scaling_gride(range_max=32)
    data.set_id(ids[-1])  # the last scale is n1 = 16, n2 = 32
    data.compute_density_kNN(k=16)
    data.compute_clustering_ADP(Z=1.6, halo=True)
    overlap = {n: data.return_label_overlap(v, class_fraction=0.3) for n, v in labels.items()}
    return {"seconds": time.perf_counter() - start, "intrinsic_dim": float(ids[-1]), "n_peaks": data.N_clusters,
            "overlap": overlap}


def timed(fn):
    start, start_cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - start, time.process_time() - start_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=10000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--components", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-baseline", action="store_true", help="skip the naive full-matrix baseline")
    parser.add_argument("--json", help="write the measurements to this file")
    args = parser.parse_args()
    X, labels = mixture(args.points, args.dim, args.components, args.seed)
    small = {n: v[:300] for n, v in labels.items()}
    landscape_statistics(X[:300], small), baseline_statistics(X[:300], small)  # warm-up: imports, allocator

    (unique, keep), t_dup, c_dup = timed(lambda: remove_duplicates(X))
    stats, t_ours, c_ours = timed(lambda: landscape_statistics(unique, {n: v[keep] for n, v in labels.items()}))
    report = {"points": args.points, "dim": args.dim, "components": args.components,
              "torch_threads": torch.get_num_threads(), "duplicates_s": t_dup,
              "ours_s": t_dup + t_ours, "ours_cpu_s": c_dup + c_ours, "ours_parts_s": stats["timings"],
              "statistics": {k: stats[k] for k in ("n_points", "intrinsic_dim", "n_peaks", "core_fraction",
                                                   "ari", "overlap", "overlap_chance")}}
    print(f"density_peaks statistics of one layer: {args.points} points x {args.dim} dims, float64, "
          f"{args.components}-component Gaussian mixture, torch threads {torch.get_num_threads()}")
    print(f"  ours, total          : {t_dup + t_ours:7.3f} s wall ({c_dup + c_ours:.3f} s CPU)")
    print(f"    remove duplicates  : {t_dup:7.3f} s")
    for part, seconds in stats["timings"].items():
        print(f"    {part:18s} : {seconds:7.3f} s")
    print(f"  result: ID {stats['intrinsic_dim']:.2f}, {stats['n_peaks']} peaks, core {stats['core_fraction']:.3f}, "
          f"ARI {', '.join(f'{n} {v:.3f}' for n, v in stats['ari'].items())}, "
          f"overlap {', '.join(f'{n} {v:.3f}' for n, v in stats['overlap'].items())}")
    if not args.no_baseline:
        (base, base_neighbours), t_base, c_base = timed(
            lambda: baseline_statistics(unique, {n: v[keep] for n, v in labels.items()}))
        _, ours_neighbours = nearest_neighbours(unique, base_neighbours.shape[1])
        agree = float(np.mean(ours_neighbours == base_neighbours))
        report.update(baseline_s=t_dup + t_base, baseline_cpu_s=c_dup + c_base,
                      baseline_neighbours_s=base["timings"]["neighbours"], neighbour_lists_agree=agree,
                      speedup=(t_dup + t_base) / (t_dup + t_ours), speedup_cpu=(c_dup + c_base) / (c_dup + c_ours),
                      neighbours_speedup=base["timings"]["neighbours"] / stats["timings"]["neighbours"])
        print(f"  baseline (full numpy distance matrix + argsort, same statistics): {t_dup + t_base:7.3f} s wall "
              f"({c_dup + c_base:.3f} s CPU), of which neighbours {base['timings']['neighbours']:.3f} s")
        print(f"  speedup              : {report['speedup']:.2f}x wall-clock, {report['speedup_cpu']:.2f}x CPU time; "
              f"neighbour search alone {report['neighbours_speedup']:.2f}x")
        same_peaks = base["n_peaks"] == stats["n_peaks"]
        print(f"  same neighbour lists : {agree:.6f} of entries; same number of peaks: {same_peaks}")
    dadapy = dadapy_statistics(unique, {n: v[keep] for n, v in labels.items()})
    if dadapy is None:
        print("  DADApy               : not importable here, skipped")
    else:
        report["dadapy"] = dadapy
        print(f"  DADApy 0.3           : {dadapy['seconds']:7.3f} s (ID {dadapy['intrinsic_dim']:.2f}, "
              f"{dadapy['n_peaks']} peaks); ratio {dadapy['seconds'] / (t_dup + t_ours):.2f}x")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=float))


if __name__ == "__main__":
    main()
