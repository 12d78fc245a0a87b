"""NumPy fine pass, children's diff2: the per-sample batches against the dense per-particle products.

Synthetic pools shaped like real ones: each particle keeps ``--orient`` coarse orientations x ``--trans`` coarse
translations (``--keep`` of that product), i.e. flat posteriors (thousands of samples a particle, as in early
classification) or peaked ones (a few). Both paths of ``ops.likelihood.children_diff2`` run on the same inputs
(the batches alone by raising ``DENSE_MIN_SAMPLES``); prints seconds, samples per second and the largest
difference.

  OPENBLAS_NUM_THREADS=1 python benchmarks/children_cpu.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gerelion_dask.ops import likelihood as lk  # noqa: E402


def pool(rng, b, n_orient, n_trans, keep, M, n_coarse=4608, n_t=21):
    Z = rng.normal(size=(b, M)) + 1j * rng.normal(size=(b, M))
    V = rng.uniform(0.1, 2.0, (b, M))
    a = rng.uniform(50.0, 100.0, b)
    ph = np.exp(2j * np.pi * rng.uniform(size=(4 * n_t, M)))
    P = rng.normal(size=(8 * n_coarse, M)) + 1j * rng.normal(size=(8 * n_coarse, M))
    js, pr, tr = [], [], []
    for q in range(b):
        o = rng.choice(n_coarse, n_orient, replace=False)
        t = rng.choice(n_t, n_trans, replace=False)
        oo, tt = (x.ravel() for x in np.meshgrid(o, t, indexing="ij"))
        k = rng.uniform(size=oo.size) < keep
        js.append(np.full(int(k.sum()), q))
        pr.append(oo[k, None] * 8 + np.arange(8))
        tr.append(tt[k] * 4)
    perm = rng.permutation(sum(len(x) for x in js))
    return Z, V, a, ph, P, np.concatenate(js)[perm], np.concatenate(pr)[perm], np.concatenate(tr)[perm]


def timed(args, dense: bool, repeat: int):
    old = lk.DENSE_MIN_SAMPLES
    lk.DENSE_MIN_SAMPLES = old if dense else 1 << 62
    try:
        best, out = np.inf, None
        for _ in range(repeat):
            t = time.perf_counter()
            out = lk.children_diff2(*args)
            best = min(best, time.perf_counter() - t)
        return best, out
    finally:
        lk.DENSE_MIN_SAMPLES = old


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--M", type=int, default=220, help="likelihood pixels (220: a 24-px window)")
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    cases = [("flat: 20 particles, 1,000 orient. x 18 transl.", 20, 1000, 18, 0.9),
             ("medium: 100 particles, 60 x 10", 100, 60, 10, 0.7),
             ("peaked: 1,000 particles, 3 x 3", 1000, 3, 3, 0.6)]
    print(f"| pool (M = {a.M}) | samples | batches (s) | dense (s) | speed-up | max rel. diff |")
    print("|---|---|---|---|---|---|")
    for name, b, no, nt, keep in cases:
        args = pool(rng, b, no, nt, keep, a.M)
        t0, ref = timed(args, False, a.repeat)
        t1, got = timed(args, True, a.repeat)
        diff = float(np.abs(got - ref).max() / np.abs(ref).max())
        print(f"| {name} | {len(args[5]):,} | {t0:.3f} | {t1:.3f} | {t0 / t1:.1f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
