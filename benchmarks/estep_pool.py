"""Time the E-step of one pool on NumPy and (if present) CuPy, on synthetic particles; print a table.

Usage: python benchmarks/estep_pool.py [--box 64] [--n 128] [--order 2] [--cpu-n 32] [--maxsig 40] [--profile]
The CPU is timed on --cpu-n particles and reported per particle, so a 2-core machine finishes quickly.
``--profile``: after the timings, the seconds of each stage of one GPU pool (synchronised after each) and the
functions that take the most time under cProfile (GPU work shows where Python waits for it).
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
from gerelion_dask.expectation.estep import EStepModel, EStepSettings, expectation_pool  # noqa: E402
from gerelion_dask.expectation.grid import OrientationGrid  # noqa: E402
from gerelion_dask.expectation.preprocess import PreprocessSettings  # noqa: E402
from gerelion_dask.maximization.schedule import coarse_size  # noqa: E402
from gerelion_dask.ops.projector import make_reference  # noqa: E402
from gerelion_dask.ops.sampling import angular_step, asymmetric_unit_directions  # noqa: E402
from gerelion_dask.simulate import synthetic_pool  # noqa: E402


def make_pool(n, box, apix, noise, seed=0):
    img, parts, A, _, s2, maps = synthetic_pool(n, box, apix, noise, seed)
    return img, parts, maps[0], s2, A


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--apix", type=float, default=3.0)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--cpu-n", type=int, default=16)
    ap.add_argument("--order", type=int, default=2)
    ap.add_argument("--noise", type=float, default=3.0)
    ap.add_argument("--current", type=int, default=0)
    ap.add_argument("--maxsig", type=int, default=-1)
    ap.add_argument("--offset-range", type=float, default=5.0)
    ap.add_argument("--offset-step", type=float, default=2.0)
    ap.add_argument("--fine-max-elems", type=int, default=0, help="E-step chunk budget (0: backend's)")
    ap.add_argument("--no-float64", action="store_true", help="skip the float64 coarse-pass comparison")
    ap.add_argument("--local", type=float, default=0.0, metavar="DEG",
                    help="local searches: Gaussian priors of this sigma (rot/tilt and psi) around the true angles")
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    cur = a.current or a.box
    img, parts, m, s2, A_true = make_pool(a.n, a.box, a.apix, a.noise)
    if a.local:
        from gerelion_dask.conventions import matrix_to_euler

        parts = replace(parts, angles=np.stack(matrix_to_euler(A_true), axis=1))
    dirs = asymmetric_unit_directions(a.order, "C1")
    grid = OrientationGrid(a.order, dirs.pix, angular_step(a.order), a.offset_range, a.offset_step, 0.25)
    ref = make_reference(m, r_max=cur // 2)
    model = EStepModel([ref], np.ones(1), np.full((1, len(dirs.pix)), 1 / len(dirs.pix)), s2,
                       np.full((1, a.box // 2 + 1), 10.0), 5.0, np.ones(1))
    cs = coarse_size(a.box, a.apix, a.order, 0.9 * a.box * a.apix, cur)
    st = EStepSettings(PreprocessSettings(a.box, a.apix, cur, 0.9 * a.box * a.apix, do_norm=False), grid, cs,
                       maxsig=a.maxsig, fine_max_elems=a.fine_max_elems,
                       local_sigma_rot=a.local, local_sigma_psi=a.local)
    rows = []
    k = min(a.cpu_n, a.n)
    if k:
        t = time.perf_counter()
        _, r_cpu = expectation_pool(img[:k], parts.take(slice(0, k)), model, st)
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
        if not a.no_float64:
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
    if a.profile and gpu_count():
        profile_stages(cp.asarray(img), parts, mg, st)
    elif a.profile and k:
        profile_stages(img[:k], parts.take(slice(0, k)), model, st)


def profile_stages(img, parts, model, st) -> None:
    """Seconds per stage of one pool (device synchronised after each), then the top functions under cProfile."""
    import cProfile
    import pstats

    from gerelion_dask.backend import get_xp
    from gerelion_dask.expectation.estep import coarse_pass, orientation_priors
    from gerelion_dask.expectation.fine import fine_pass
    from gerelion_dask.expectation.preprocess import preprocess_pool

    xp = get_xp(img)
    sync = xp.cuda.runtime.deviceSynchronize if xp is not np else (lambda: None)

    def timed(f, *args):
        sync()
        t = time.perf_counter()
        out = f(*args)
        sync()
        return out, time.perf_counter() - t

    pre, t_pre = timed(preprocess_pool, img, parts, st.preprocess, model.sigma2_noise)
    pri, t_pri = timed(orientation_priors, parts, model, st)
    sig, t_coarse = timed(coarse_pass, xp, pre, parts, model, st, pri)
    _, t_fine = timed(fine_pass, xp, pre, parts, model, st, sig, None)
    print(f"stages of {len(parts.index)} particles: preprocess {t_pre:.3f} s, priors {t_pri:.3f} s, coarse pass "
          f"{t_coarse:.3f} s, fine pass {t_fine:.3f} s ({int(sig.n_sig.sum())} "
          "significant samples)")
    prof = cProfile.Profile()
    prof.enable()
    expectation_pool(img, parts, model, st)
    sync()
    prof.disable()
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
