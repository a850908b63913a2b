"""DADApy's density-peak pipeline on one point cloud, timed: run by benchmarks/density_peaks.py in
DADApy's own environment (it pins numpy < 2, so it cannot share the lab's):

    python3.11 -m venv /tmp/dadapy-env && /tmp/dadapy-env/bin/pip install dadapy==0.3.4
    OMP_NUM_THREADS=1 /tmp/dadapy-env/bin/python benchmarks/dadapy_pipeline.py X.npy labels.npz out.json

Times, as the lab does them: duplicate removal (np.unique), ``Data(maxk=100)`` +
``compute_distances``, Gride at 16/32 (``return_id_scaling_gride(range_max=32)``), the kNN density
(k = 16), ADP (Z = 1.6, halo on), then ``return_label_overlap(class_fraction=0.3)`` per label set.
Best of ``repeats`` runs (the first argument after the paths), with the outputs of the last.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np


def run(X, labels) -> dict:
    from dadapy import Data

    seconds, cpu = {}, {}
    clock = [time.perf_counter(), time.process_time()]

    def lap(part):
        now = [time.perf_counter(), time.process_time()]
        seconds[part], cpu[part] = now[0] - clock[0], now[1] - clock[1]
        clock[:] = now

    _, keep = np.unique(X, axis=0, return_index=True)
    X, labels = X[np.sort(keep)], {n: v[np.sort(keep)] for n, v in labels.items()}
    lap("duplicates")
    data = Data(coordinates=X, maxk=100, verbose=False, n_jobs=1)
    data.compute_distances(maxk=100, n_jobs=1)
    lap("neighbours")
    ids, errors, _ = data.return_id_scaling_gride(range_max=32)
    data.set_id(ids[-1])  # the last scale is n1 = 16, n2 = 32
    lap("intrinsic_dim")
    data.compute_density_kNN(k=16)
    lap("density")
    clusters = data.compute_clustering_ADP(Z=1.6, halo=True)
    lap("clustering")
    overlap = {}
    for name, values in labels.items():
        overlap[name] = float(data.return_label_overlap(values, class_fraction=0.3))
        lap(f"overlap_{name}")
    return {"seconds": seconds, "cpu": cpu, "intrinsic_dim": float(ids[-1]), "intrinsic_dim_error": float(errors[-1]),
            "n_peaks": int(data.N_clusters), "labels": np.asarray(clusters).astype(int).tolist(), "overlap": overlap}


def main() -> None:
    X_path, labels_path, out_path, repeats = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    X = np.load(X_path)
    labels = dict(np.load(labels_path))
    run(X[:300], {n: v[:300] for n, v in labels.items()})  # warm-up: imports, compiled code
    runs = [run(X, labels) for _ in range(repeats)]
    best = runs[-1]
    for key in ("seconds", "cpu"):
        best[key] = {part: min(r[key][part] for r in runs) for part in best[key]}
    import importlib.metadata

    best["version"] = importlib.metadata.version("dadapy")
    with open(out_path, "w") as f:
        json.dump(best, f)


if __name__ == "__main__":
    main()
