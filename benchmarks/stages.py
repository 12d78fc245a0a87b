"""Per-stage timings of the E-step and M-step on one backend, with useful FLOP/s and evaluations per second (issue 5).

Stages, on a synthetic pool (phantom map, CTFs, random poses; ``--noise`` sets how many samples are significant):
preprocessing, the coarse pass (at ``--coarse`` px), the fine pass (at ``--current`` px), the 3D insertion of
``--slices`` slices, the reconstruction of the padded volume, and the whole E-step of the pool.  Each stage runs once
to warm up (compilation, FFT plans) and is then timed after a device synchronisation.

Useful FLOPs count only the arithmetic of the formulas (no padding, no masked-out samples): the coarse pass does
``B*O*(T*4M + 2M)`` FLOPs (per evaluation the cross term ``Re sum_k Y_k conj(P_k)``: 2 multiply-adds per complex
pixel; per particle and orientation the ``sum w c^2 |P|^2`` term: 1 multiply-add per pixel) for ``B`` particles,
``O`` orientations x ``K`` classes, ``T`` translations and ``M`` likelihood pixels; coarse evaluations =
``B*O*T*K``.  (Before 2026-11-24's fourth session this script counted each multiply-add as 4 FLOPs, twice the
useful count: its earlier TFLOP/s figures in RESULTS.md are halved there.)  The coarse pass is timed as it runs for
every pool after an iteration's first, with the whole-grid projections in the iteration's ProjectionCache; making
them is its own row.

  python benchmarks/stages.py --box 128 --n 256 --coarse 64 --current 96 [--cpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gerelion_dask.backend import gpu_count  # noqa: E402
from gerelion_dask.config import COARSE_PRECISIONS  # noqa: E402
from gerelion_dask.conventions import matrix_to_euler  # noqa: E402
from gerelion_dask.expectation.estep import (EStepModel, EStepSettings, coarse_pass,  # noqa: E402
                                             coarse_projections, expectation_pool, orientation_priors)
from gerelion_dask.expectation.fine import ProjectionCache, fine_limits, fine_pass  # noqa: E402
from gerelion_dask.expectation.grid import OrientationGrid  # noqa: E402
from gerelion_dask.expectation.preprocess import PreprocessSettings, preprocess_pool  # noqa: E402
from gerelion_dask.ops.backprojector import empty_backprojection, insert_slices  # noqa: E402
from gerelion_dask.ops.fourier import likelihood_pixels  # noqa: E402
from gerelion_dask.ops.projector import make_reference, project  # noqa: E402
from gerelion_dask.ops.reconstruct import reconstruct  # noqa: E402
from gerelion_dask.ops.sampling import angular_step, asymmetric_unit_directions  # noqa: E402
from gerelion_dask.simulate import synthetic_pool  # noqa: E402


def timed(xp, f, *a, **k):
    f(*a, **k)  # warm-up
    sync(xp)
    t = time.perf_counter()
    out = f(*a, **k)
    sync(xp)
    return out, time.perf_counter() - t


def sync(xp):
    if xp is not np:
        xp.cuda.runtime.deviceSynchronize()


def peak_bytes(xp):
    return xp.get_default_memory_pool().total_bytes() if xp is not np else 0


def synthetic_estep(xp, n: int, box: int, apix: float, noise: float, order: int, coarse: int, current: int):
    """A synthetic pool and the E-step inputs the per-stage benchmarks use: ``(images, particles, model, settings)``
    with the phantom's reference (on ``xp``'s device), uniform direction priors and a global search at ``order``
    (the particles' previous angles are their true ones: a local search's priors centre on them)."""
    img, parts, A, _, s2, maps = synthetic_pool(n, box, apix, noise, 0)
    parts = replace(parts, angles=np.stack(matrix_to_euler(A), axis=1))
    dirs = asymmetric_unit_directions(order, "C1")
    grid = OrientationGrid(order, dirs.pix, angular_step(order), 5.0, 2.0, 0.25)
    ref = make_reference(maps[0], r_max=current // 2)
    ref = replace(ref, data=xp.asarray(ref.data))
    model = EStepModel([ref], np.ones(1), np.full((1, len(dirs.pix)), 1 / len(dirs.pix)), s2,
                       np.full((1, box // 2 + 1), 10.0), 5.0, np.ones(1))
    st = EStepSettings(PreprocessSettings(box, apix, current, 0.9 * box * apix, do_norm=False), grid, coarse)
    return xp.asarray(img), parts, model, st


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--apix", type=float, default=1.5)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--order", type=int, default=2)
    ap.add_argument("--coarse", type=int, default=64)
    ap.add_argument("--current", type=int, default=0)
    ap.add_argument("--noise", type=float, default=3.0)
    ap.add_argument("--slices", type=int, default=20000)
    ap.add_argument("--cpu", action="store_true", help="NumPy even when a GPU is present")
    ap.add_argument("--coarse_precision", choices=COARSE_PRECISIONS, default="auto",
                    help="the coarse GEMMs' precision (auto: the backend's default, fine.fine_limits)")
    a = ap.parse_args()
    xp = np
    if gpu_count() and not a.cpu:
        import cupy

        xp = cupy
    cur = a.current or a.box
    images, parts, model, st = synthetic_estep(xp, a.n, a.box, a.apix, a.noise, a.order, a.coarse, cur)
    ref, grid = model.refs[0], st.grid
    dtype = np.dtype(fine_limits(xp)["coarse_dtype"] if a.coarse_precision == "auto" else a.coarse_precision)
    st = replace(st, coarse_dtype=dtype.name)
    rows = []
    pre, t = timed(xp, preprocess_pool, images, parts, st.preprocess, model.sigma2_noise)
    rows.append(("preprocess", t, a.n / t, "particles/s", float("nan")))
    pri = orientation_priors(parts, model, st)
    A_all = grid.coarse_matrices()
    mc = xp.asarray(likelihood_pixels(a.coarse))
    _, t = timed(xp, lambda: coarse_projections(xp, project(ref, xp.asarray(A_all), a.coarse)[:, mc], dtype))
    rows.append((f"coarse projections ({len(A_all)} at {a.coarse} px, once per iteration)", t, len(A_all) / t,
                 "projections/s", float("nan")))
    cache = ProjectionCache(1 << 33)
    sig, t = timed(xp, coarse_pass, xp, pre, parts, model, st, pri, cache)
    B, O, T, M = a.n, grid.n_dir * grid.n_psi, len(grid.translations), int(likelihood_pixels(a.coarse).sum())
    flops = 1.0 * B * O * (T * 4 * M + 2 * M)
    rows.append((f"coarse pass ({a.coarse} px, {O}x{T})", t, B * O * T / t, "evaluations/s", flops / t / 1e12))
    (_, res), t = timed(xp, fine_pass, xp, pre, parts, model, st, sig)
    nsig = int(np.median(res.n_significant))
    rows.append((f"fine pass ({cur} px, median {nsig} sig.)", t, a.n / t, "particles/s", float("nan")))
    bp = empty_backprojection(ref.grid, xp)
    rng = np.random.default_rng(1)
    q = rng.normal(size=(a.slices, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    A = np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
                  2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
                  2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], 1).reshape(-1, 3, 3)
    sl = xp.ones((a.slices, cur, cur // 2 + 1), np.complex128)
    wt = xp.ones((a.slices, cur, cur // 2 + 1), np.float64)
    _, t = timed(xp, insert_slices, bp, A, sl, wt)
    rows.append((f"insertion ({a.slices} slices of {cur} px)", t, a.slices / t, "slices/s", float("nan")))
    bp = insert_slices(empty_backprojection(ref.grid, xp), A[:2000], sl[:2000], wt[:2000])
    _, t = timed(xp, reconstruct, bp, tau2=None)
    rows.append((f"reconstruction (box {a.box}, pad 2)", t, 1 / t, "maps/s", float("nan")))
    _, t = timed(xp, expectation_pool, images, parts, model, st)
    rows.append(("whole E-step of the pool, an iteration's first", t, a.n / t, "particles/s", float("nan")))
    _, t = timed(xp, expectation_pool, images, parts, model, st, cache)
    rows.append(("whole E-step of the pool, projections cached", t, a.n / t, "particles/s", float("nan")))
    dev = "numpy (CPU)" if xp is np else f"cupy ({xp.cuda.runtime.getDeviceProperties(0)['name'].decode()})"
    print(f"{dev}; box {a.box}, {a.n} particles, HEALPix order {a.order}, noise {a.noise}, coarse {dtype.name}; "
          f"device pool {peak_bytes(xp) / 2**30:.2f} GiB")
    print("| stage | seconds | rate | unit | useful TFLOP/s |")
    print("|---|---|---|---|---|")
    for name, t, r, unit, tf in rows:
        print(f"| {name} | {t:.3f} | {r:.4g} | {unit} | {'' if np.isnan(tf) else f'{tf:.2f}'} |")


if __name__ == "__main__":
    main()
