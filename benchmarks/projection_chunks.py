"""Projections per second by chunk size (``project_bytes`` of ``expectation/fine.py::FINE_LIMITS``; issue 5).

``project_gathered`` cuts its rotations into chunks whose projector temporaries hold at most ``max_bytes``; NumPy's
projector is memory-bound, so the chunk size sets its speed. This prints, per image size, projections/s of a phantom's
reference at random rotations for several chunk sizes (CuPy when a GPU is present, else NumPy).

  python benchmarks/projection_chunks.py [--sizes 32 64 128] [--mib 4 8 16 32 4096]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gerelion_dask.backend import gpu_count  # noqa: E402
from gerelion_dask.conventions import euler_to_matrix  # noqa: E402
from gerelion_dask.expectation.fine import project_gathered  # noqa: E402
from gerelion_dask.ops.fourier import likelihood_pixels  # noqa: E402
from gerelion_dask.ops.projector import make_reference  # noqa: E402
from gerelion_dask.simulate import phantom_map  # noqa: E402

COUNT = {32: 8000, 64: 3000, 128: 600, 256: 150}  # rotations per size (a few seconds each on one CPU core)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128], help="projection sizes (px)")
    ap.add_argument("--mib", type=int, nargs="+", default=[4, 8, 16, 32, 4096], help="chunk sizes (MiB)")
    a = ap.parse_args()
    xp = np
    if gpu_count():
        import cupy

        xp = cupy
    rng = np.random.default_rng(0)
    print(f"{'numpy' if xp is np else 'cupy'}; projections/s by chunk size")
    print("| size | " + " | ".join(f"{m} MiB" for m in a.mib) + " |")
    print("|---|" + "---|" * len(a.mib))
    for n in a.sizes:
        R = COUNT.get(n, 100)
        ref = make_reference(phantom_map(2 * n, 4.0), r_max=n // 2)
        if xp is not np:
            from dataclasses import replace

            ref = replace(ref, data=xp.asarray(ref.data))
        A = euler_to_matrix(rng.uniform(-180, 180, R), rng.uniform(0, 180, R), rng.uniform(-180, 180, R))
        mask = likelihood_pixels(n)
        cells = []
        for mib in a.mib:
            t = time.perf_counter()
            project_gathered(ref, A, n, mask, xp, max_bytes=mib << 20)
            if xp is not np:
                xp.cuda.runtime.deviceSynchronize()
            cells.append(f"{R / (time.perf_counter() - t):,.0f}")
        print(f"| {n} px ({R:,}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
