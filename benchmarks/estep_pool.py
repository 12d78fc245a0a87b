"""Time the E-step of one pool on NumPy and (if present) CuPy, on synthetic particles; print a table.

Usage: python benchmarks/estep_pool.py [--box 64] [--n 128] [--order 2] [--cpu-n 32]
The CPU is timed on --cpu-n particles and reported per particle, so a 2-core machine finishes quickly.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gerelion_dask.backend import gpu_count  # noqa: E402
from gerelion_dask.expectation.estep import EStepModel, EStepSettings, expectation_pool  # noqa: E402
from gerelion_dask.expectation.grid import OrientationGrid  # noqa: E402
from gerelion_dask.expectation.preprocess import PreprocessSettings  # noqa: E402
from gerelion_dask.maximization.schedule import coarse_size  # noqa: E402
from gerelion_dask.ops.projector import make_reference  # noqa: E402
from gerelion_dask.ops.sampling import angular_step, asymmetric_unit_directions  # noqa: E402
from gerelion_dask.simulate import synthetic_pool  # noqa: E402


def make_pool(n, box, apix, noise, seed=0):
    img, parts, _, _, s2, maps = synthetic_pool(n, box, apix, noise, seed)
    return img, parts, maps[0], s2


def subset(p, k):
    kw = {f.name: getattr(p, f.name)[:k] for f in fields(p) if isinstance(getattr(p, f.name), np.ndarray)}
    kw["ctf"] = p.ctf.take(slice(0, k))
    return replace(p, **kw)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--apix", type=float, default=3.0)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--cpu-n", type=int, default=16)
    ap.add_argument("--order", type=int, default=2)
    ap.add_argument("--noise", type=float, default=3.0)
    ap.add_argument("--current", type=int, default=0)
    a = ap.parse_args()
    cur = a.current or a.box
    img, parts, m, s2 = make_pool(a.n, a.box, a.apix, a.noise)
    dirs = asymmetric_unit_directions(a.order, "C1")
    grid = OrientationGrid(a.order, dirs.pix, angular_step(a.order), 5.0, 2.0, 0.25)
    ref = make_reference(m, r_max=cur // 2)
    model = EStepModel([ref], np.ones(1), np.full((1, len(dirs.pix)), 1 / len(dirs.pix)), s2,
                       np.full((1, a.box // 2 + 1), 10.0), 5.0, np.ones(1))
    cs = coarse_size(a.box, a.apix, a.order, 0.9 * a.box * a.apix, cur)
    st = EStepSettings(PreprocessSettings(a.box, a.apix, cur, 0.9 * a.box * a.apix, do_norm=False), grid, cs)
    rows = []
    k = min(a.cpu_n, a.n)
    if k:
        t = time.perf_counter()
        _, r_cpu = expectation_pool(img[:k], subset(parts, k), model, st)
        dt = time.perf_counter() - t
        rows.append(("numpy", k, dt, k / dt, float(np.median(r_cpu.n_significant))))
    if gpu_count():
        import cupy as cp

        mg = replace(model, refs=[replace(ref, data=cp.asarray(ref.data))])
        expectation_pool(cp.asarray(img), parts, mg, st)  # warm-up on the whole pool (compilation, plans)
        cp.cuda.runtime.deviceSynchronize()
        t = time.perf_counter()
        _, r_gpu = expectation_pool(cp.asarray(img), parts, mg, st)
        cp.cuda.runtime.deviceSynchronize()
        dt = time.perf_counter() - t
        rows.append((f"cupy/{st.coarse_dtype}", a.n, dt, a.n / dt, float(np.median(r_gpu.n_significant))))
        st64 = replace(st, coarse_dtype="float64")
        expectation_pool(cp.asarray(img), parts, mg, st64)  # warm-up
        cp.cuda.runtime.deviceSynchronize()
        t = time.perf_counter()
        _, r64 = expectation_pool(cp.asarray(img), parts, mg, st64)
        cp.cuda.runtime.deviceSynchronize()
        dt = time.perf_counter() - t
        rows.append(("cupy/float64", a.n, dt, a.n / dt, float(np.median(r64.n_significant))))
        same64 = np.mean((r64.rot == r_gpu.rot) & (r64.tilt == r_gpu.tilt) & (r64.psi == r_gpu.psi))
        print(f"same best pose, float32 vs float64 coarse pass on the GPU, {a.n} particles: {same64:.4f}")
        if k:
            print(f"same best pose CPU vs GPU on {k} particles: {np.mean(r_gpu.rot[:k] == r_cpu.rot):.3f}")
    print(f"box {a.box}, current size {cur}, coarse size {cs}, healpix order {a.order}, "
          f"{len(dirs.pix) * grid.n_psi} coarse orientations x {len(grid.translations)} translations")
    print(f"{'backend':14s} {'particles':>9s} {'seconds':>9s} {'particles/s':>12s} {'median n_sig':>13s}")
    for r in rows:
        print(f"{r[0]:14s} {r[1]:9d} {r[2]:9.2f} {r[3]:12.2f} {r[4]:13.0f}")


if __name__ == "__main__":
    main()
