"""Host time of the E-step's orientation bookkeeping (issue 5: "no stage spends more time in Python than on the GPU").

These run on the host in GPU runs too (NumPy), once or more per pool: the coarse matrices of a local-search chunk's
orientations, the fine matrices of a pool's fine orientations (projection of new rows, 3D insertion, best poses),
and the local-search priors.  Prints one table: each function's best time against the plain formula it replaced
(the Euler matrix per orientation; np.unique of the candidate keys), for a pool-sized number of samples.

  python benchmarks/host_work.py [--order 5] [--n-coarse 60000] [--n-fine 45000] [--particles 1000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gerelion_dask.conventions import euler_to_matrix  # noqa: E402
from gerelion_dask.expectation.grid import OrientationGrid  # noqa: E402
from gerelion_dask.ops.indexing import distinct  # noqa: E402
from gerelion_dask.ops.sampling import angular_step, healpix_directions, local_search_sparse  # noqa: E402


def best(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--order", type=int, default=5, help="HEALPix order of the coarse grid (C1)")
    ap.add_argument("--n-coarse", type=int, default=60000, help="coarse orientations of one chunk")
    ap.add_argument("--n-fine", type=int, default=45000, help="fine orientation ids of one pool")
    ap.add_argument("--particles", type=int, default=1000, help="particles of the local-search pool")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    step = angular_step(a.order)
    grid = OrientationGrid(a.order, np.arange(12 * 4**a.order), step, 5.0, 2.0, 0.3)
    rot, tilt = grid.dir_angles
    d, p = rng.integers(0, grid.n_dir, a.n_coarse), rng.integers(0, grid.n_psi, a.n_coarse)
    gid = rng.integers(0, grid.fine_id_bound, a.n_fine)
    rot_f, tilt_f = healpix_directions(a.order + 1)
    child, q = np.divmod(gid, 2 * grid.n_psi)
    psi_f = grid.psi[q // 2] + np.where(q % 2 == 0, -0.25, 0.25) * step
    E = grid._perturb_matrix
    B = a.particles
    ang = np.c_[rng.uniform(-180, 180, B), rng.uniform(0, 180, B), rng.uniform(-180, 180, B)]
    sigma = 2.0 * angular_step(a.order + 1)
    psi = np.arange(int(round(360.0 / step))) * step
    keys = np.sort(rng.integers(0, B, 62000)) * len(rot) + rng.integers(0, len(rot), 62000)
    rows = [
        ("grid.coarse_matrices", f"{a.n_coarse} orientations",
         best(lambda: grid.coarse_matrices(d, p), a.repeat),
         best(lambda: euler_to_matrix(rot[d], tilt[d], grid.psi[p]) @ E, a.repeat)),
        ("grid.fine_matrices_from_ids", f"{a.n_fine} ids",
         best(lambda: grid.fine_matrices_from_ids(gid), a.repeat),
         best(lambda: euler_to_matrix(rot_f[child], tilt_f[child], psi_f) @ E, a.repeat)),
        ("ops.indexing.distinct", "62000 particle-direction keys", best(lambda: distinct(keys), a.repeat),
         best(lambda: np.unique(keys), a.repeat)),
        ("local_search_sparse", f"{B} particles, sigma {sigma:g} deg",
         best(lambda: local_search_sparse(ang[:, 0], ang[:, 1], ang[:, 2], sigma, sigma, sigma, *healpix_directions(
             a.order), psi), a.repeat), float("nan")),
    ]
    print(f"HEALPix order {a.order}, best of {a.repeat} (ms); 'formula': the Euler matrices / np.unique it replaced")
    print("| function | size | ms | formula ms |")
    print("|---|---|---|---|")
    for name, size, t, t0 in rows:
        print(f"| {name} | {size} | {t:.2f} | {'' if np.isnan(t0) else f'{t0:.2f}'} |")


if __name__ == "__main__":
    main()
