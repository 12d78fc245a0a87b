"""``gerelion demo``: simulate a small data set (a phantom, or the shipped PDB 1AKE), refine it, compare.

Steps: (1) simulate particles with known poses (RELION-format STAR + MRCS); (2) reconstruct from the true poses
(the best any refinement can do); (3) gold-standard auto-refine from a 30 Å low-pass of the truth; (4) print a
table: resolution of each map against the truth (FSC 0.5) and the refinement's own gold-standard estimate.

Step (3) runs its E-step tasks on a new local Dask cluster of 2 workers by default (``--workers N``; one per GPU is
still capped at the GPUs present), on a running scheduler (``--scheduler-address``/``--scheduler-file``), or in this
process (``--in-process``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .cliargs import ArgumentParser as _OneLineParser

__all__ = ["demo_main"]


def demo_main(argv) -> int:
    p = _OneLineParser(prog="gerelion demo", description=__doc__)
    p.add_argument("--o", default="demo_out", help="output folder")
    p.add_argument("--target", choices=["phantom", "1ake"], default="phantom",
                   help="what to simulate: an asymmetric blob phantom (converges in a few minutes on a laptop CPU) or "
                        "PDB 1AKE (24 kDa: hard from a 30 Å start with few particles)")
    p.add_argument("--n", type=int, default=400, help="number of particles")
    p.add_argument("--box", type=int, default=32)
    p.add_argument("--angpix", type=float, default=4.0)
    p.add_argument("--snr", type=float, default=0.5)
    p.add_argument("--healpix_order", type=int, default=2)
    p.add_argument("--iter_max", type=int, default=8, help="cap on auto-refine iterations (keeps the demo short)")
    p.add_argument("--seed", type=int, default=20261124)
    from .cli import add_dask_flags, run_with_dask_flags

    add_dask_flags(p, default_workers=2)
    ns = p.parse_args(argv)
    from .config import JobConfig
    from .io.mrc import read_map, write_map
    from .job_files import make_writer
    from .ops.fsc import fsc, resolution_at
    from .reconstruct_job import reconstruct_star
    from .simulate import (SimulationSpec, density_from_atoms, default_model_path, phantom_map, read_pdb_atoms,
                           simulate_dataset)

    out = Path(ns.o)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if ns.target == "1ake":
        xyz, z = read_pdb_atoms(default_model_path())
        truth = density_from_atoms(xyz, z, ns.box, ns.angpix)
    else:
        truth = phantom_map(ns.box, ns.angpix, "blobs", seed=0)
    spec = SimulationSpec(n_particles=ns.n, box=ns.box, apix=ns.angpix, snr=ns.snr, seed=ns.seed,
                          ini_lowpass_angst=30.0)
    paths = simulate_dataset([truth], spec, out / "data")
    print(f"[1/3] simulated {ns.n} particles in {time.time() - t0:.1f} s: {paths.particles_star}")
    t1 = time.time()
    vol, apix = reconstruct_star(str(paths.truth_star), ctf=True)
    write_map(out / "truth_poses_reconstruction.mrc", vol, apix)
    print(f"[2/3] reconstruction from the true poses in {time.time() - t1:.1f} s")
    t2 = time.time()
    root = out / "Refine3D" / "run"
    cfg = JobConfig(i=str(paths.particles_star), o=str(root), ref=str(paths.initial_reference), auto_refine=True,
                    split_random_halves=True, ini_high=30.0, particle_diameter=0.85 * ns.box * ns.angpix, ctf=True,
                    ctf_corrected_ref=True, firstiter_cc=True, flatten_solvent=True, zero_mask=True, norm=True,
                    scale=True, healpix_order=ns.healpix_order,
                    offset_range=3.0, offset_step=1.5, low_resol_join_halves=40.0, random_seed=ns.seed, pool=50,
                    auto_iter_max=ns.iter_max, overwrite=True)
    for f in root.parent.glob("run*"):
        f.unlink()
    from .progress import ProgressBar

    res = run_with_dask_flags(ns, cfg, make_writer(str(root)), progress=ProgressBar())
    final_map = root.parent / "run_class001.mrc"
    where = "in process" if ns.in_process else ("on the given scheduler" if ns.scheduler_address or ns.scheduler_file
                                                 else f"on a local Dask cluster (--workers {ns.workers})")
    print(f"[3/3] auto-refine {where}: {len(res.iterations)} iterations in {time.time() - t2:.1f} s -> {final_map}")
    t, _ = read_map(paths.truth_maps[0])
    rows = [("reconstruction from true poses", read_map(out / "truth_poses_reconstruction.mrc")[0]),
            ("initial reference (30 Å low-pass)", read_map(paths.initial_reference)[0]),
            ("auto-refine result", read_map(final_map)[0])]
    print(f"\n{'map':38s} {'FSC=0.5 vs truth (Å)':>22s}")
    for name, m in rows:
        r = resolution_at(fsc(np.asarray(m, np.float64), np.asarray(t, np.float64)), 0.5, ns.box, ns.angpix)
        print(f"{name:38s} {r:22.2f}")
    print(f"{'auto-refine gold-standard estimate':38s} {res.iterations[-1].resolution_angst:22.2f}")
    from .report import write_report

    report = write_report(root)
    print(f"\nmaps: {final_map}; plots: {root.parent}/run_it*_*.png; report: {report}  "
          f"(total {time.time() - t0:.0f} s)")
    return 0
