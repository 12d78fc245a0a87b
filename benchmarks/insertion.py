"""NumPy 3D insertion: slices per second by chunk size (``ops.backprojector.NUMPY_CHUNK_BYTES``; issue 5).

The NumPy ``insert_slices`` adds a chunk of pixels at a time with ``np.add.at``; its coordinates, corner indices and
weighted values (~150 bytes a pixel) are temporaries, so the chunk size sets how much of the work stays in the CPU's
caches.  This prints, per slice size, slices/s of random rows at a fine pass's likelihood pixels (``pixels=`` form)
inserted into the padded grid of a ``--box`` volume, for several chunk sizes (NumPy only: CuPy runs one kernel).

  python benchmarks/insertion.py [--box 128] [--sizes 48 96 128] [--mib 1 2 4 8 32] [--slices 1000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gerelion_dask.conventions import euler_to_matrix  # noqa: E402
from gerelion_dask.ops import backprojector  # noqa: E402
from gerelion_dask.ops.fourier import PaddedGrid, likelihood_pixels  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--sizes", type=int, nargs="+", default=[48, 96, 128], help="slice sizes (px)")
    ap.add_argument("--mib", type=float, nargs="+", default=[1, 2, 4, 8, 32], help="chunk sizes (MiB)")
    ap.add_argument("--slices", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each (best printed)")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    A = np.stack([euler_to_matrix(*rng.uniform(0, 360, 3)) for _ in range(a.slices)])
    print(f"numpy insert_slices, box {a.box}, {a.slices} slices at random rotations; slices/s (best of {a.repeat})")
    print("| size | pixels | " + " | ".join(f"{m:g} MiB" for m in a.mib) + " |")
    print("|---" * (len(a.mib) + 2) + "|")
    default = backprojector.NUMPY_CHUNK_BYTES
    try:
        for n in a.sizes:
            grid = PaddedGrid.create(a.box, n // 2)
            mask = likelihood_pixels(n, include_dc=True)
            M = int(mask.sum())
            rows = rng.normal(size=(a.slices, M)) + 1j * rng.normal(size=(a.slices, M))
            wts = rng.uniform(0.1, 1.0, size=(a.slices, M))
            cells = []
            for mib in a.mib:
                backprojector.NUMPY_CHUNK_BYTES = int(mib * 2**20)
                best = np.inf
                for _ in range(a.repeat):
                    bp = backprojector.empty_backprojection(grid)
                    t = time.perf_counter()
                    backprojector.insert_slices(bp, A, rows, wts, pixels=mask)
                    best = min(best, time.perf_counter() - t)
                cells.append(f"{a.slices / best:,.0f}")
            print(f"| {n} | {M} | " + " | ".join(cells) + " |")
    finally:
        backprojector.NUMPY_CHUNK_BYTES = default


if __name__ == "__main__":
    main()
