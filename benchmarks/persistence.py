"""Seconds of the persistence evaluator's work (k-NN flag complexes + zigzag) by points x layers.

Each "model" is a drifting point cloud: layer 0 a 10-blob Gaussian mixture in 128 dims, each next
layer the previous one plus noise (a tenth of the spread), so neighbourhoods change gradually, as
in a residual stream. k = 5, flag complexes up to dimension 4 (holes of dimension 0..3), one thread.

    OMP_NUM_THREADS=1 python benchmarks/persistence.py
    OMP_NUM_THREADS=1 python benchmarks/persistence.py --points 256 512 --layers 5 --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab.eval.persistence import flag_complex, persistence_summary, zigzag_bars  # noqa: E402


def drifting_layers(points: int, layers: int, dim: int = 128, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(10, dim))[rng.integers(0, 10, points)] + 0.3 * rng.normal(size=(points, dim))
    out = [X]
    for _ in range(layers - 1):
        out.append(out[-1] + 0.03 * rng.normal(size=(points, dim)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--layers", type=int, nargs="+", default=[5, 13])
    parser.add_argument("--max-dim", type=int, default=4)
    parser.add_argument("--json", help="write the measurements to this file")
    args = parser.parse_args()
    rows = []
    print(f"{'points':>7} {'layers':>6} {'simplices':>10} {'complexes s':>12} {'zigzag s':>9} {'total s':>8}")
    for layers in args.layers:
        for points in args.points:
            states = drifting_layers(points, layers)
            start = time.perf_counter()
            complexes = [flag_complex(X, 5, args.max_dim) for X in states]
            built = time.perf_counter()
            bars = zigzag_bars(complexes, args.max_dim)
            persistence_summary(bars, layers, args.max_dim)
            done = time.perf_counter()
            row = {"points": points, "layers": layers, "simplices": int(sum(map(len, complexes))),
                   "complexes_s": built - start, "zigzag_s": done - built, "total_s": done - start}
            rows.append(row)
            print(f"{points:7d} {layers:6d} {row['simplices']:10d} {row['complexes_s']:12.2f} {row['zigzag_s']:9.2f} "
                  f"{row['total_s']:8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
