"""Flat posteriors' dense blocks on and off (``FINE_LIMITS[backend]["flat_waste"]``): the same ``gerelion refine``
run in process with each setting, E-step seconds per iteration side by side, and whether the runs agree.

  python benchmarks/flat_blocks.py --n 8000 --box 128 --apix 2 --iters 2 --waste 0 4
      (simulated blobs, the twenty-first session's refine flags; on the GPU when one is present)

Each setting runs in its own process (``python -c``), one after the other, on data simulated once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUN = """
import sys
from gerelion_dask.expectation.fine import FINE_LIMITS
for limits in FINE_LIMITS.values():
    limits["flat_waste"] = float(sys.argv[1])
from gerelion_dask.cli import main
sys.exit(main(sys.argv[2:]))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8000)
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--apix", type=float, default=2.0)
    ap.add_argument("--iters", type=int, default=2, help="--auto_iter_max of the refinements")
    ap.add_argument("--pool", type=int, default=0, help="--pool (0: the plan's)")
    ap.add_argument("--waste", type=float, nargs="+", default=[0.0, 4.0], help="flat_waste settings to compare")
    a = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sim = tmp / "sim"
        subprocess.run([sys.executable, "-c", RUN, "0", "simulate", "--o", str(sim), "--n", str(a.n), "--box",
                        str(a.box), "--angpix", str(a.apix), "--phantom", "blobs", "--seed", "1", "--ini_lowpass",
                        "40"], check=True, env=env, stdout=subprocess.DEVNULL)
        flags = ["--i", str(sim / "particles.star"), "--ref", str(sim / "initial_lp40.mrc"), "--ini_high", "40",
                 "--particle_diameter", str(int(0.8 * a.box * a.apix)), "--ctf", "--healpix_order", "2",
                 "--auto_local_healpix_order", "3", "--offset_range", "5", "--offset_step", "2",
                 "--flatten_solvent", "--zero_mask", "--norm", "--scale", "--random_seed", "1", "--in-process",
                 "--auto_iter_max", str(a.iters)] + (["--pool", str(a.pool)] if a.pool else [])
        runs = {}
        for w in a.waste:
            out = tmp / f"w{w:g}"
            subprocess.run([sys.executable, "-c", RUN, str(w), "refine", "--o", str(out / "run")] + flags,
                           check=True, env=env, stdout=subprocess.DEVNULL)
            runs[w] = [json.loads(line) for line in open(out / "run_progress.jsonl")]
    print(f"{a.n} particles, box {a.box}, {a.apix} A/px; E-step s per iteration")
    print("| flat_waste | " + " | ".join(f"it {r['iteration']}" for r in runs[a.waste[0]]) + " |")
    print("|---|" + "---|" * len(runs[a.waste[0]]))
    for w, rows in runs.items():
        print(f"| {w:g} | " + " | ".join(f"{r['seconds']['estep']:.2f}" for r in rows) + " |")
    keys = ("resolution_angst", "changes_orientations_deg", "changes_offsets_angst", "ave_pmax")
    ref = [[round(r[k], 6) for k in keys] for r in runs[a.waste[0]]]
    same = all([[round(r[k], 6) for k in keys] for r in rows] == ref for rows in runs.values())
    print(f"resolution, changes and Pmax the same to 6 decimals in every iteration: {same}")


if __name__ == "__main__":
    main()
