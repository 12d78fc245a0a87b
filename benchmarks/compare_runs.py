"""Two finished runs of the same job, side by side: FSC of their final maps, poses in common (issue 3's CPU/GPU row).

For each of ``run_class001.mrc`` and the two ``run_half*_class001_unfil.mrc`` (those present in both): the lowest FSC
over the shells up to Nyquist, the first shell at or below 0.99, and the largest voxel difference relative to the
first map's maximum; then the particles whose final angles and offsets agree to ``--atol`` in ``run_data.star``.

  python benchmarks/compare_runs.py <cpu run folder> <gpu run folder> [--root run] [--atol 1e-3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gerelion_dask.io.mrc import read_map  # noqa: E402
from gerelion_dask.io.star import read_particles  # noqa: E402
from gerelion_dask.ops.fsc import fsc  # noqa: E402

POSE = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--root", default="run")
    ap.add_argument("--atol", type=float, default=1e-3)
    ns = ap.parse_args(argv)
    print("| map | lowest FSC | first shell <= 0.99 | largest difference / max |\n|---|---|---|---|")
    for name in ("class001.mrc", "half1_class001_unfil.mrc", "half2_class001_unfil.mrc"):
        pa, pb = ns.a / f"{ns.root}_{name}", ns.b / f"{ns.root}_{name}"
        if not (pa.exists() and pb.exists()):
            continue
        m1, m2 = (np.asarray(read_map(p)[0], dtype=np.float64) for p in (pa, pb))
        f = np.asarray(fsc(m1, m2))[1: m1.shape[0] // 2 + 1]
        low = np.nonzero(f <= 0.99)[0]
        print(f"| {pa.name} | {f.min():.6f} | {low[0] + 1 if low.size else 'none'} of {len(f)} | "
              f"{np.abs(m1 - m2).max() / np.abs(m1).max():.2e} |")
    _, da, _ = read_particles(ns.a / f"{ns.root}_data.star")
    _, db, _ = read_particles(ns.b / f"{ns.root}_data.star")
    same = np.all(np.isclose(da[POSE].to_numpy(float), db[POSE].to_numpy(float), atol=ns.atol), axis=1)
    print(f"\nsame pose (to {ns.atol}): {int(same.sum())} / {len(same)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
