"""Host time of a pool's orientation priors in local searches, per HEALPix order (issue 5: host time per stage).

The priors are built on the host even in GPU runs (`estep.orientation_priors`, `ops.sampling.local_search_sparse`);
a local search keeps ~30 directions a particle, and since the seventeenth session only those are tested and kept
(before, dense ``(B, K, n_dir)`` arrays: 0.8 s a pool at order 5). This prints, per order, the seconds for one pool
and the directions kept.

  python benchmarks/priors.py [--n 1000] [--orders 3 4 5 6] [--repeat 3] [--sigmas 5 10 20 40] [--gpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gerelion_dask.expectation.estep import orientation_priors  # noqa: E402
from gerelion_dask.expectation.grid import OrientationGrid  # noqa: E402
from gerelion_dask.ops.sampling import angular_step, healpix_directions, local_search_sparse  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="particles in the pool")
    ap.add_argument("--orders", type=int, nargs="+", default=[3, 4, 5, 6])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sigmas", type=float, nargs="*", default=[], metavar="DEG",
                    help="fixed prior widths (one row each per order; default: auto-refine's width at the order)")
    ap.add_argument("--gpu", action="store_true",
                    help="also time the GPU's dense search (local_search_sparse with xp=cupy; the result is on the "
                         "host, so wall time is the stage's time) and check it keeps the same directions")
    a = ap.parse_args()
    xps = [np]
    if a.gpu:
        import cupy

        xps.append(cupy)
    rng = np.random.default_rng(0)
    B = a.n
    ang = np.c_[rng.uniform(-180, 180, B), rng.uniform(0, 180, B), rng.uniform(-180, 180, B)]
    print("| order | directions | psi | sigma (°) | local_search_sparse (s; NumPy / GPU) | orientation_priors (s) | "
          "directions kept/particle |")
    print("|---|---|---|---|---|---|---|")
    for order, sigma in [(o, s) for o in a.orders for s in (a.sigmas or [2.0 * angular_step(o + 1)])]:
        # (default: auto-refine's local sigma at this order)
        rot, tilt = healpix_directions(order)
        step = angular_step(order)
        psi = np.arange(int(round(360.0 / step))) * step
        t_ls, t_op = [], []
        lp = local_search_sparse(ang[:, 0], ang[:, 1], ang[:, 2], sigma, sigma, sigma, rot, tilt, psi)
        for xp in xps:
            search = (lambda xp=xp: local_search_sparse(ang[:, 0], ang[:, 1], ang[:, 2], sigma, sigma, sigma, rot,
                                                         tilt, psi, xp=xp))
            search()  # (a GPU's first call compiles its kernels)
            t_ls.append(min(_timed(search) for _ in range(a.repeat)))
            other = search()
            assert np.array_equal(other.dir_index, lp.dir_index) and np.allclose(other.dir_prior, lp.dir_prior)
        grid = OrientationGrid(order, np.arange(len(rot)), step, 3.0, 1.0)
        parts = NS(index=np.arange(B), angles=ang, offset_px=np.zeros((B, 2)), offset_prior_px=np.zeros((B, 2)),
                   seed_class=None)
        model = NS(refs=[object()], pdf_class=np.array([1.0]), pdf_direction=np.full((1, len(rot)), 1.0 / len(rot)),
                   sigma_offset_angst=3.0)
        st = NS(grid=grid, local_sigma_rot=sigma, local_sigma_psi=sigma, symmetry_operators=None,
                preprocess=NS(pixel_size=1.5))
        for xp in xps:
            t_op.append(min(_timed(lambda xp=xp: orientation_priors(parts, model, st, xp)) for _ in range(a.repeat)))
        print(f"| {order} | {len(rot)} | {len(psi)} | {sigma:g} | {' / '.join(f'{t:.4f}' for t in t_ls)} | "
              f"{' / '.join(f'{t:.4f}' for t in t_op)} | {np.diff(lp.dir_ptr).mean():.1f} |")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
