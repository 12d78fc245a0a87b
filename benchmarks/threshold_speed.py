"""RELION's significance threshold of a flat group's weights: the sort and running sum
(``weights.significance_threshold``) against the bisection over bit patterns
(``weights.significance_threshold_by_bisection``), on the backend present (CuPy on a GPU, else NumPy).

  python benchmarks/threshold_speed.py --rows 21 --width 3100000     (a flat group at HEALPix order 2, 128 px)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gerelion_dask.backend import gpu_count  # noqa: E402
from gerelion_dask.expectation.weights import (significance_threshold,  # noqa: E402
                                               significance_threshold_by_bisection)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=21)
    ap.add_argument("--width", type=int, default=3_100_000)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    xp = np
    if gpu_count():
        import cupy as xp
    sync = xp.cuda.runtime.deviceSynchronize if xp is not np else (lambda: None)
    rng = np.random.default_rng(0)
    w = np.exp(-rng.exponential(2.0, (a.rows, a.width)))  # a flat posterior: weights over a few decades
    w[:, ::4] = 0.0  # children of samples that were not significant
    w = xp.asarray(w)
    s = w.sum(axis=1)
    rows = []
    for name, fn in (("sort", significance_threshold), ("bisection", significance_threshold_by_bisection)):
        fn(w, 0.999, -1, s)  # warm-up: compilation
        times = []
        for _ in range(a.repeat):
            sync()
            t0 = time.perf_counter()
            thr = fn(w, 0.999, -1, s)
            sync()
            times.append(time.perf_counter() - t0)
        rows.append((name, min(times), thr))
    same = bool(np.array_equal(np.asarray(rows[0][2].get() if xp is not np else rows[0][2]),
                               np.asarray(rows[1][2].get() if xp is not np else rows[1][2])))
    print(f"{'cupy' if xp is not np else 'numpy'}; {a.rows} rows x {a.width:,} weights; same thresholds: {same}")
    print("| method | ms (best of %d) |" % a.repeat)
    print("|---|---|")
    for name, t, _ in rows:
        print(f"| {name} | {1e3 * t:.1f} |")


if __name__ == "__main__":
    main()
